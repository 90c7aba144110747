"""The project's errors: one base, :class:`MrlError`, for every failure a user can act on.

Each stage raises a subclass (bad options, bad data, a model that cannot be loaded, a wrong
dimension, an index that cannot be read or written, a server that did not start); ``mrl``
catches the base and prints the message as one line with exit code 2. This module imports
nothing, so any stage can use it. The usage errors are also ``ValueError`` so callers that
catch ``ValueError`` keep working.
"""

from __future__ import annotations


class MrlError(Exception):
    """A failure the user can act on: its message says what and where, in one line (no traceback)."""


class ConfigError(MrlError, ValueError):
    """Invalid options or settings; the message names the option, in one line."""


class ModelError(MrlError, ValueError):
    """A model could not be found or loaded."""


class OutputExistsError(MrlError, FileExistsError):
    """An output folder exists and replacing it was not asked for."""
