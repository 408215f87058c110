"""The root of Dialbox's own errors.

Every package raises a subclass for bad input it can name (a missing store, an unknown site,
a typo in an intervention). Stages turn exactly these into one line on stderr; anything else is a
bug and keeps its traceback."""

from __future__ import annotations


class DialboxError(Exception):
    """Bad input or state that the user can fix; its message says what is wrong and what to do."""


class ConfigError(DialboxError, ValueError):
    """A setting that cannot work: a missing path, an impossible size, options that contradict."""
