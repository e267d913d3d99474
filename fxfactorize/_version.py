"""The package version, in a leaf module so any module can import it without an import circle."""

__version__ = "0.1.0"
