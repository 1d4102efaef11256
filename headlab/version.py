"""headlab's version (a leaf module: results and run metadata read it without importing the package)."""

__version__ = "0.1.0"
