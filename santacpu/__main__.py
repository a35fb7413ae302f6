"""`python -m santacpu` runs the command line.

May import: `santacpu.cli`.
"""

from .cli import main

main()
