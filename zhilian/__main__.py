from zhilian.cli import main

main()
