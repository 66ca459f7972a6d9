"""The project's error type for configuration values that cannot work.

The ``lightning-distill`` CLI reports a :class:`ConfigError` (like ``TeacherError``, ``DataError`` and
``NonFiniteLossError``) as one line naming the problem and exits with status 2; any other exception
keeps its traceback, because it is a bug rather than bad input.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting whose value cannot work; the message names the value and the valid choices.

    It subclasses ValueError, so code and tests that expect a ValueError for a bad setting still do.

    Example::

        >>> if not 0.0 <= decay < 1.0:
        ...     raise ConfigError(f"EMA decay must lie in [0, 1), got {decay}")
    """


class MissingInputError(ConfigError, FileNotFoundError):
    """A path given in the configuration (``init_from``, a student folder) does not exist."""


__all__ = ["ConfigError", "MissingInputError"]
