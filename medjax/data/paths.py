"""The one place that knows where the shared real data lives.

Tests, benchmarks and configs call `data_dir("isbi2012_em_membrane")`. The root is
`$MEDJAX_DATA_DIR` when set, else `<repo>/../shared/data` (a developer checkout and CI).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


# config keys of each split's folder, and the default sub-folder of a shared dataset folder
SPLIT_KEYS = {"train": "directory", "val": "val_directory", "test": "test_directory"}
_DEFAULT_SUB = {"train": "train", "val": "validation", "test": "test"}


def _shared_split(cfg: Mapping[str, Any], which: str) -> Path | None:
    if not cfg.get("shared_folder"):
        return None
    sub = cfg.get(f"{which}_split") or _DEFAULT_SUB[which]
    return data_dir(str(cfg["shared_folder"]), must_exist=which == "train") / str(sub)


def split_dir(cfg: Mapping[str, Any], which: str) -> Path:
    """The folder of split `which` ("train", "val", "test") of a config's `data` block.

    `data.directory` / `data.val_directory` / `data.test_directory` when set, else
    `<shared data>/<data.shared_folder>/<data.{which}_split>` (default sub-folders `train`,
    `validation`, `test`), else (val / test) `data.directory` itself: one dataset folder that
    holds every split (an nnU-Net or MSD folder, a folder with split sub-folders).
    """
    if which not in SPLIT_KEYS:
        raise ValueError(f"split must be one of {list(SPLIT_KEYS)}, got {which!r}")
    key = SPLIT_KEYS[which]
    if cfg.get(key):
        return Path(str(cfg[key]))
    shared = _shared_split(cfg, which)
    if shared is not None:
        return shared
    if cfg.get("directory"):
        return Path(str(cfg["directory"]))
    raise ValueError(
        f"config.data.{key} is empty and config.data.shared_folder is not set: no {which} data"
    )


def has_split_dir(cfg: Mapping[str, Any], which: str) -> bool:
    """True when split `which` has a folder of its own (`data.<split>_directory`, or an
    existing `<split>` sub-folder of the shared dataset folder)."""
    if cfg.get(SPLIT_KEYS[which]):
        return True
    shared = _shared_split(cfg, which)
    return shared is not None and shared.is_dir()
