"""`python -m santacpu` runs the command line."""

from .cli import main

main()
