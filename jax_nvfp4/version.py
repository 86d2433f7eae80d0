"""The package version (also recorded in converted checkpoints)."""

__version__ = "0.1.0"
