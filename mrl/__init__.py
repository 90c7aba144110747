"""The ``mrl`` command: one entry point for every stage of mrl-retrieval."""

__version__ = "0.1.0"
