"""The version of hesslens, in one place every layer may read (the package root imports it)."""

__version__ = "0.1.0"
