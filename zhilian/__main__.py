import sys

from zhilian.entry import main

sys.exit(main())
