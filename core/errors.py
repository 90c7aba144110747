"""The usage error every stage raises for options or settings that cannot work.

It imports nothing, so any stage (training, index, service, benchmarks) can raise it;
``mrl`` prints it, like the other project errors, as one line with exit code 2. It is a
``ValueError`` so callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid options or settings; the message names the option, in one line."""


class ModelError(ValueError):
    """A model could not be found or loaded."""
