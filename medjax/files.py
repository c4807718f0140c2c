"""Writing files so that a kill never leaves half of one: write a temporary sibling, then rename.

`os.replace` within one folder is atomic on POSIX file systems, so a reader (or a relaunched run)
sees either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["replacing", "write_json"]


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside `path` (ending in `suffix`, for writers that pick the
    format from it); on success it is renamed onto `path`, on error removed. The parent folder
    is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """`obj` as indented, key-sorted JSON at `path`, atomically."""
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
