"""The package version, in a module of its own so that every module can read it without importing the package's
lazy entry points (qvlquant/__init__.py)."""

__version__ = "0.1.0"
