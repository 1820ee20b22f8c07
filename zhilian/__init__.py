"""Composition layer: the `zhilian` command, the demo, process helpers. The only package importing every part."""
