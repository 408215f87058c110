"""Files replaced in one rename: a reader, or a stage started again after a kill, sees the old file or the
new one, never half of one.

    with replacing(path) as tmp:      # write tmp however you like (torch.save, pq.write_table, ...)
        torch.save(state, tmp)
    write_text(path, text)

The temporary file sits beside its target (a rename is atomic only within one filesystem) and is named
for the process and thread writing it, so writers at once (split label jobs merging the same site) never
share one. On an error it is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator


def temporary_beside(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path to write, renamed over `path` when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)
