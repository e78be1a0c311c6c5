"""The one exception family `sfi` raises for problems a user can fix.

The CLI catches `SfiError` in one place and turns it into a message and an exit code; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SfiError(Exception):
    """A problem the user can fix; `exit_code` is what the CLI exits with."""

    exit_code: int = 1


class ConfigError(SfiError):
    """Bad options, recipe or override."""


class ModelError(SfiError):
    """A model that cannot be found, read or is not supported."""


class JobInputError(SfiError):
    """The jobs file as a whole cannot be used (unreadable, or bad lines under --strict)."""


class OutputError(SfiError):
    """The output file cannot be written: locked by another run, unreadable, not a results file."""
