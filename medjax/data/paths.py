"""The one place that knows where the shared real data lives.

Tests, benchmarks and configs call `data_dir("isbi2012_em_membrane")`. The root is
`$MEDJAX_DATA_DIR` when set, else `<repo>/../shared/data` (a developer checkout and CI).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "MEDJAX_DATA_DIR"


def data_root() -> Path:
    """The root folder holding one sub-folder per dataset."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return (Path(__file__).resolve().parents[2].parent / "shared" / "data").resolve()


def data_dir(name: str = "", *, must_exist: bool = True) -> Path:
    """`data_root() / name`; raises FileNotFoundError naming the path and the override variable."""
    path = data_root() / name if name else data_root()
    if must_exist and not path.exists():
        raise FileNotFoundError(
            f"dataset folder {path} does not exist; set ${ENV_VAR} to the folder that holds "
            f"the medjax datasets (expected a sub-folder {name!r})"
        )
    return path
