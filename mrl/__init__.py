"""The ``mrl`` command: one entry point for every stage of mrl-retrieval."""

from core import __version__

__all__ = ["__version__"]
