"""`python -m kvcli`: the same command line as the `kvcli` script."""

from .cli import main

main()
