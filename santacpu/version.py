"""santacpu's version, in a module of its own so that the converter (below the API) can record it
in a file's provenance without importing the package's API.

May import: nothing.
"""

__version__ = "0.1.0"
