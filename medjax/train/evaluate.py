"""Evaluate, predict and sample with a finished run, for every task, through the task contract.

* `evaluate_workdir`: restores the best (or latest) checkpoint, reads a split of the run's data
  or of ANY folder in the same layout (`task.load_eval`), scores it (`task.evaluate`) and writes
  `metrics.csv` (one row per case), `summary.json` and `overlays/<name>.png` into a new folder.
* `predict_workdir`: prediction files for inputs the run never saw (`task.predict_files`).
* `sample_workdir`: generated or translated examples (`task.sample`) as `.npz`, a grid, and one
  PNG (2D) or NIfTI (3D) per sample.

Outputs are written to a temporary folder and renamed into place, and an existing output is
never replaced unless `overwrite`.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from medjax import visualize
from medjax.train import loop
from medjax.train.loop import load_run_config

__all__ = [
    "apply_overrides",
    "evaluate_workdir",
    "load_run_config",
    "parse_override",
    "predict_workdir",
    "sample_workdir",
    "write_csv",
]


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def parse_override(text: str) -> tuple[str, Any]:
    """`"data.region=TC"` -> ("data.region", "TC"); values are Python literals when they parse
    (`64`, `(64, 64)`, `True`), strings otherwise; an empty value is `()` (i.e. "off")."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} must look like key.sub=value")
    value = value.strip()
    if not value:
        return key.strip(), ()
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def apply_overrides(config: Any, overrides: Sequence[str]) -> None:
    """Sets `key.sub=value` entries on a run's config; an unknown key is an error naming it."""
    for text in overrides:
        key, value = parse_override(text)
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node:
                raise KeyError(
                    f"override {text!r}: the run config has no key {'.'.join(parents[: i + 1])!r}"
                )
            node = node[part]
        if leaf not in node:
            raise KeyError(f"override {text!r}: the run config has no key {key!r}")
        node[leaf] = value


class _Staging:
    """A temporary sibling folder that replaces `final` on success (never a half-written one).

    On many processes only process 0 publishes; the others write to a private temporary folder
    that is dropped (every process computes the same result)."""

    def __init__(self, final: Path, overwrite: bool):
        self.final = final
        self.publish = jax.process_index() == 0
        if final.exists() and any(final.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{final} already holds results; pass --overwrite to replace them or choose "
                "another --out_dir"
            )
        self.tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"

    def __enter__(self) -> Path:
        if not self.publish:
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.final.name}."))
            return self.tmp
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None or not self.publish:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _restore(workdir: Path, checkpoint: str, overrides: Sequence[str] = ()):
    if checkpoint not in ("best", "latest"):
        raise ValueError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}")
    config = load_run_config(workdir)
    apply_overrides(config, overrides)
    return loop.restore(config, workdir, best=checkpoint == "best")


def default_out_dir(workdir: Path, checkpoint: str, split: str, data_dir: Any) -> Path:
    """`<workdir>/eval/<checkpoint>-<split>` for the run's own data, or
    `<workdir>/eval/<checkpoint>-<folder name>-<hash>-<split>` for another folder: the hash of
    its absolute path keeps `a/validation` and `b/validation` apart."""
    if not data_dir:
        return workdir / "eval" / f"{checkpoint}-{split}"
    folder = Path(data_dir).resolve()
    tag = hashlib.sha1(str(folder).encode()).hexdigest()[:6]
    return workdir / "eval" / f"{checkpoint}-{folder.name}-{tag}-{split}"


def evaluate_workdir(
    workdir: str | Path,
    *,
    data_dir: str | Path | None = None,
    split: str = "val",
    checkpoint: str = "best",
    out_dir: str | Path | None = None,
    pictures: int = 8,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, float], Path]:
    """Scores a run on `split` ("train", "val", "test") of its own data, or of `data_dir`.

    Args:
      workdir: the run folder (holds `config.json` and checkpoints).
      data_dir: a dataset folder in the layout of the run's data; its `split` folder is read when
        it has split folders, else the whole folder.
      split: which split.
      checkpoint: "best" (by the run's `best_metric`; latest if none was kept) or "latest".
      out_dir: where to write (default `default_out_dir`); an existing non-empty folder is
        refused unless `overwrite`.
      pictures: how many pictures (per-case overlays, a sample grid) to write.
      overrides: `key.sub=value` changes to the run's config for this evaluation only, e.g.
        `data.slice_crop=` to score a crop-trained 2D model on whole slices.

    Returns (rows, summary, output folder).
    """
    workdir = Path(workdir)
    out = Path(out_dir) if out_dir else default_out_dir(workdir, checkpoint, split, data_dir)
    staging = _Staging(out, overwrite)  # refuse before any computation
    trainer, state = _restore(workdir, checkpoint, overrides)
    task = trainer.task
    eval_set = task.load_eval(data_dir, split)
    ev = trainer.evaluate(state, eval_set, num_pictures=pictures)
    summary = {k: float(v) for k, v in ev.summary.items()}
    summary["step"] = trainer.step_of(state)
    summary.setdefault("cases", len(ev.rows) or 1)
    rows = ev.rows or [{"id": split, **summary}]
    summary_file = {**summary, "data_dir": str(Path(data_dir).resolve()) if data_dir else ""}
    summary_file.update(split=split, checkpoint=checkpoint)
    with staging as tmp:
        write_csv(tmp / "metrics.csv", rows)
        (tmp / "summary.json").write_text(json.dumps(summary_file, indent=2, sort_keys=True))
        for name, picture in list(ev.pictures.items())[: max(pictures, 0)]:
            visualize.save_png(tmp / "overlays" / f"{name}.png", picture)
    return rows, summary, out


def predict_workdir(
    workdir: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    checkpoint: str = "best",
    overwrite: bool = False,
    replica: int = 0,
) -> list[Path]:
    """One prediction file per input case / image of `inputs` (`task.predict_files`): label
    maps for segmentation runs, translated images or volumes for translation runs; of model
    `replica` of a run that trained several (`config.replicas`)."""
    trainer, state = _restore(Path(workdir), checkpoint)
    state = trainer.replica(state, replica)
    if jax.process_index() == 0:
        return trainer.task.predict_files(trainer, state, inputs, out_dir, overwrite=overwrite)
    # Other processes compute the same predictions (the model runs on every device) and drop
    # their copy: only process 0 writes.
    with tempfile.TemporaryDirectory() as tmp:
        trainer.task.predict_files(trainer, state, inputs, tmp, overwrite=True)
    return []


def sample_workdir(
    workdir: str | Path,
    out_dir: str | Path,
    *,
    num: int = 64,
    seed: int | None = None,
    checkpoint: str = "latest",
    overwrite: bool = False,
    replica: int = 0,
) -> dict[str, Path]:
    """Writes `num` samples of a generator run (`task.sample`): `samples.npz` (every array the
    task returns, e.g. `samples`, `source`, `label`), `grid.png` and one PNG (2D) or NIfTI (3D,
    identity affine, 1 mm) per sample, into `out_dir` (refused when it holds files, unless
    `overwrite`: then it is replaced whole, so no stale sample stays); of model `replica` of a
    run that trained several."""
    from medjax.data import io

    workdir, out_dir = Path(workdir), Path(out_dir)
    staging = _Staging(out_dir, overwrite)
    trainer, state = _restore(workdir, checkpoint)
    arrays = trainer.task.sample(trainer, trainer.replica(state, replica), num, seed)
    samples = np.asarray(arrays["samples"])
    if len(samples) != num:
        raise ValueError(f"asked for {num} samples; the run can make {len(samples)}")
    if samples.shape[-1] > 3:  # class probabilities: show the label map
        samples = samples.argmax(-1)[..., None].astype(np.float32)
    with staging as tmp:
        np.savez_compressed(tmp / "samples.npz", **arrays)
        visualize.save_png(tmp / "grid.png", visualize.sample_grid(samples[..., :1]))
        for i, s in enumerate(samples):
            if s.ndim == 4:
                io.write_nifti(
                    tmp / f"sample_{i:04d}.nii.gz", s[..., 0], io.Geometry.identity(s.shape[:3])
                )
            else:
                visualize.save_png(
                    tmp / f"sample_{i:04d}.png", visualize.to_uint8(s[..., 0], lo=-1, hi=1)
                )
    written = {"npz": out_dir / "samples.npz", "grid": out_dir / "grid.png"}
    suffix = ".nii.gz" if samples.ndim == 5 else ".png"
    written.update(
        {f"sample_{i}": out_dir / f"sample_{i:04d}{suffix}" for i in range(len(samples))}
    )
    return written
