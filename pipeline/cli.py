"""What every stage's entry point shares: Dialbox's own errors become one line, bugs keep their traceback."""

from __future__ import annotations

import contextlib
import sys

from activations.errors import DialboxError


@contextlib.contextmanager
def one_line_errors(stage: str):
    """Bad input (any DialboxError) becomes one line on stderr and exit code 2."""
    try:
        yield
    except DialboxError as e:
        print(f"{stage}: error: {e}", file=sys.stderr)
        sys.exit(2)
