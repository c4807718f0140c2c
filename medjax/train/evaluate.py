"""Evaluate a trained run's checkpoint on any data directory of its dataset's layout.

`evaluate_workdir` restores the best (or latest) checkpoint of a run, predicts every case, scores
each at its original resolution with the task's `case_metrics` and writes, under `out_dir`:
`metrics.csv` (one row per case), `summary.json` (means over cases, NaNs skipped) and
`overlays/<id>.png` (image | truth | prediction).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from medjax import visualize
from medjax.data import datasets
from medjax.train import loop


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a medjax run folder?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def summarize_rows(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean (NaN-skipping) of every numeric column; `<col>_n` counts the defined values."""
    out: dict[str, float] = {"cases": len(rows)}
    for key in rows[0]:
        vals = [r[key] for r in rows if isinstance(r.get(key), int | float)]
        if not vals:
            continue
        finite = [v for v in vals if math.isfinite(v)]
        out[key] = float(np.mean(finite)) if finite else float("nan")
        if len(finite) != len(vals):
            out[f"{key}_n"] = len(finite)
    return out


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def evaluate_workdir(
    workdir: str | Path,
    *,
    data_dir: str | None = None,
    checkpoint: str = "best",
    out_dir: str | Path | None = None,
    pictures: int = 8,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Scores a run on its validation split, or on EVERY case of `data_dir` when given.

    Args:
      workdir: the run folder (holds `config.json` and checkpoints).
      data_dir: a dataset folder in the layout of the run's `config.data.source`.
      checkpoint: "best" (by the run's `best_metric`; latest if none was kept) or "latest".
      out_dir: where to write; default `workdir/eval/<checkpoint>-<folder name>`.
      pictures: how many overlay PNGs to write.
    """
    if checkpoint not in ("best", "latest"):
        raise ValueError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}")
    workdir = Path(workdir)
    config = load_run_config(workdir)
    if data_dir:
        config.data.directory = str(data_dir)
    trainer = loop.Trainer(config)
    task = trainer.task
    source = datasets.get_source(config.data.source)
    directory = datasets.resolve_directory(config.data)
    raw = source.load(directory)
    task.class_names = tuple(source.class_names)
    if data_dir:
        cases = raw
    else:
        # The split reads only ids, slice indices and order: the same split as in training.
        _, cases = datasets.split(raw, config.data, int(config.seed))
    images = [datasets.preprocess(ex, config.data)["image"] for ex in cases]
    spec = {"image": jax.ShapeDtypeStruct((trainer.eval_batch_size, *images[0].shape), np.float32)}
    trainer, state = loop.restore(
        config, workdir, best=checkpoint == "best", trainer=trainer, batch_spec=spec
    )
    # Cases of another size than the training data (a user's own folder) are predicted in
    # groups of equal input shape: the network is fully convolutional.
    logits: list[np.ndarray] = [np.empty(0)] * len(cases)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    for idx in groups.values():
        pred = trainer.predict_all(state, np.stack([images[i] for i in idx]))
        for i, lg in zip(idx, pred, strict=True):
            logits[i] = lg
    out_path = (
        Path(out_dir)
        if out_dir
        else workdir / "eval" / f"{checkpoint}-{Path(directory or 'embedded').name}"
    )
    rows = []
    for i, (ex, lg) in enumerate(zip(cases, logits, strict=True)):
        row, pred = task.case_metrics(ex, lg)
        rows.append(row)
        if i < pictures:
            panel = visualize.segmentation_panel(ex["image"], ex["label"], pred)
            visualize.save_png(out_path / "overlays" / f"{ex['id']}.png", panel)
    summary = summarize_rows(rows)
    summary["step"] = int(state.step)
    write_csv(out_path / "metrics.csv", rows)
    (out_path / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return rows, summary
