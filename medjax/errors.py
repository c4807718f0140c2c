"""Errors whose message says everything a user needs (which file or key, what was expected).

The command line prints them as one `medjax <command>: error: ...` block without a traceback and
exits with status 2; library callers catch them as the built-in types they also are
(`ConfigError` is a `ValueError`, `CheckpointError` an `OSError`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CheckpointError", "ConfigError", "MedjaxError", "WorkdirError"]


class MedjaxError(Exception):
    """Base of the errors the command line reports without a traceback."""


class ConfigError(MedjaxError, ValueError):
    """One or more invalid config values; `problems` holds one line per key."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(f"invalid config: {self.problems[0]}")
        else:
            body = "".join(f"\n  {p}" for p in self.problems)
            super().__init__(f"invalid config ({len(self.problems)} problems):{body}")


class WorkdirError(MedjaxError, ValueError):
    """A work directory that cannot be used as asked (foreign, mismatched, unwritable)."""


class CheckpointError(MedjaxError, OSError):
    """A checkpoint that cannot be written or restored; the message names its folder."""
