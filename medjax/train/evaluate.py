"""Evaluate a trained run's checkpoint on any data directory of its dataset's layout.

`evaluate_workdir` restores the best (or latest) checkpoint of a run, predicts every case, scores
each at its original resolution with the task's `case_metrics` and writes, under `out_dir`:
`metrics.csv` (one row per case), `summary.json` (means over cases, NaNs skipped) and
`overlays/<id>.png` (image | truth | prediction).
"""

from __future__ import annotations

import ast
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


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
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


def _out_path(workdir: Path, checkpoint: str, directory: Any, out_dir: Any) -> Path:
    if out_dir:
        return Path(out_dir)
    return workdir / "eval" / f"{checkpoint}-{Path(str(directory or 'embedded')).name}"


def _restore_for(workdir: Path, config: Any, trainer: loop.Trainer, checkpoint: str, spec: Any):
    if checkpoint not in ("best", "latest"):
        raise ValueError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}")
    return loop.restore(
        config, workdir, best=checkpoint == "best", trainer=trainer, batch_spec=spec
    )


def _volume_cases(task: Any, config: Any, inputs: Sequence[str | Path]) -> list[Any]:
    """Cases of every input folder: a dataset folder in the run's layout, or one case folder."""
    out = []
    for path in (Path(p) for p in inputs):
        try:
            out.extend(task.cases(path))
        except FileNotFoundError as as_dataset:
            # not a dataset folder: maybe ONE case folder of a dataset in this layout
            try:
                found = [c for c in task.cases(path.parent) if c.id == path.name]
            except FileNotFoundError:
                found = []
            if not found:
                raise FileNotFoundError(
                    f"{path} is neither a {config.data.layout} dataset folder nor one of its case "
                    f"folders ({as_dataset})"
                ) from as_dataset
            out.extend(found)
    return out


def evaluate_volumes(
    workdir: Path,
    config: Any,
    *,
    data_dir: str | None,
    checkpoint: str,
    out_dir: str | Path | None,
    pictures: int,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """`evaluate_workdir` for volume runs: whole-volume sliding-window predictions scored on the
    original grid per BraTS region."""
    from medjax.train.tasks.volume_segmentation import resolve_split_dir

    trainer = loop.Trainer(config)
    task = trainer.task
    directory = data_dir or resolve_split_dir(config.data, "val")
    cases = _volume_cases(task, config, [directory])
    spec = task.batch_spec(int(config.batch_size))
    trainer, state = _restore_for(workdir, config, trainer, checkpoint, spec)
    out_path = _out_path(workdir, checkpoint, directory, out_dir)
    rows = []
    for i, case in enumerate(cases):
        if case.label is None:
            raise ValueError(f"case {case.id} has no label map to score against ({case.images})")
        prepared = task.prepare(case)
        pred = task.predict_case(trainer, state, prepared)
        rows.append(task.case_row(prepared, pred))
        if i < pictures:
            visualize.save_png(out_path / "overlays" / f"{case.id}.png", task.panel(prepared, pred))
    summary = task.summarize_rows(rows)
    summary["step"] = int(state.step)
    write_csv(out_path / "metrics.csv", rows)
    (out_path / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return rows, summary


def predict_volumes(
    workdir: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    checkpoint: str = "best",
    overwrite: bool = False,
    suffix: str = ".nii.gz",
) -> list[Path]:
    """Writes one label-map NIfTI per case of `inputs` (dataset or case folders) to `out_dir`.

    Labels are in the case's own convention (e.g. BraTS 0/1/2/4), on the input's grid, with the
    input's affine and orientation: the file overlays the input exactly in any viewer. Existing
    files are never replaced unless `overwrite`; the check happens before any computation.
    """
    from medjax.data import io, volumes

    workdir = Path(workdir)
    config = load_run_config(workdir)
    trainer = loop.Trainer(config)
    task = trainer.task
    if not hasattr(task, "predict_case"):
        raise ValueError(f"{workdir} is a {config.task!r} run; predict.py needs a volume run")
    cases = _volume_cases(task, config, inputs)
    out_dir = Path(out_dir)
    targets = [out_dir / f"{c.id}{suffix}" for c in cases]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} prediction(s) already exist, e.g. {existing[0]}; pass --overwrite "
            "to replace them or choose another --output"
        )
    trainer, state = _restore_for(
        workdir, config, trainer, checkpoint, task.batch_spec(int(config.batch_size))
    )
    written = []
    for case, target in zip(cases, targets, strict=True):
        prepared = task.prepare(case)
        pred = task.predict_case(trainer, state, prepared)
        native = volumes.to_native(pred, prepared["label_scheme"])
        written.append(
            io.write_nifti(
                target, native, prepared["geometry"], dtype=np.uint8, overwrite=overwrite
            )
        )
    return written


def evaluate_workdir(
    workdir: str | Path,
    *,
    data_dir: str | None = None,
    checkpoint: str = "best",
    out_dir: str | Path | None = None,
    pictures: int = 8,
    overrides: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Scores a run on its validation split, or on EVERY case of `data_dir` when given.

    Args:
      workdir: the run folder (holds `config.json` and checkpoints).
      data_dir: a dataset folder in the layout of the run's data (`config.data.source` or
        `config.data.layout`).
      checkpoint: "best" (by the run's `best_metric`; latest if none was kept) or "latest".
      out_dir: where to write; default `workdir/eval/<checkpoint>-<folder name>`.
      pictures: how many overlay PNGs to write.
      overrides: `key.sub=value` changes to the run's config for this evaluation only, e.g.
        `data.slice_crop=` to score a crop-trained 2D model on whole slices.
    """
    workdir = Path(workdir)
    config = load_run_config(workdir)
    apply_overrides(config, overrides)
    if config.task in ("dcgan", "wgan_gp", "pix2pix", "cyclegan"):
        return evaluate_task(workdir, config, checkpoint=checkpoint, out_dir=out_dir)
    if config.task == "volume_segmentation":
        return evaluate_volumes(
            workdir, config, data_dir=data_dir, checkpoint=checkpoint, out_dir=out_dir,
            pictures=pictures,
        )  # fmt: skip
    if data_dir:
        config.data.directory = str(data_dir)
    trainer = loop.Trainer(config)
    task = trainer.task
    source = datasets.get_source(config.data.source)
    directory = datasets.resolve_directory(config.data)
    task.class_names = tuple(source.class_names)
    if data_dir:
        cases = source.load(directory, config.data)
    elif datasets.resolve_val_directory(config.data):
        cases = source.load(datasets.resolve_val_directory(config.data), config.data)
    else:
        # The split reads only ids, slice indices and order: the same split as in training.
        _, cases = datasets.split(
            source.load(directory, config.data), config.data, int(config.seed)
        )
    images = [datasets.preprocess(ex, config.data)["image"] for ex in cases]
    spec = {"image": jax.ShapeDtypeStruct((trainer.eval_batch_size, *images[0].shape), np.float32)}
    trainer, state = _restore_for(workdir, config, trainer, checkpoint, spec)
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
    out_path = _out_path(workdir, checkpoint, directory, out_dir)
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


def evaluate_task(
    workdir: Path, config: Any, *, checkpoint: str, out_dir: str | Path | None
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """A run whose task scores itself (`task.evaluate(trainer, state, data)`: the GAN tasks) on
    its validation data: writes `summary.json` and the task's picture under `out_dir`."""
    trainer = loop.Trainer(config)
    task = trainer.task
    data = task.load_data()
    spec = loop.batch_spec_of(task, data, int(config.batch_size))
    trainer, state = _restore_for(workdir, config, trainer, checkpoint, spec)
    summary, picture = task.evaluate(trainer, state, data)
    summary = {k: float(v) for k, v in summary.items()}
    summary["step"] = int(state.step)
    summary["cases"] = 1
    out_path = Path(out_dir) if out_dir else workdir / "eval" / f"{checkpoint}-validation"
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    if picture is not None:
        visualize.save_png(out_path / "picture.png", picture)
    row = {"id": "validation", **summary}
    write_csv(out_path / "metrics.csv", [row])
    return [row], summary


def sample_workdir(
    workdir: str | Path,
    out_dir: str | Path,
    *,
    num: int = 64,
    seed: int | None = None,
    checkpoint: str = "latest",
    overwrite: bool = False,
) -> dict[str, Path]:
    """Writes `num` samples of a GAN run: `samples.npz`, `grid.png` and one PNG (2D) or NIfTI
    (3D, identity affine, 1 mm) per sample under `out_dir`.

    Unconditional runs (`dcgan`, `wgan_gp`) draw from the latent seed `seed` (default: the fixed
    evaluation noise, `config.seed + 1`). Conditional runs (`pix2pix`, `cyclegan`) translate the
    first `num` validation inputs; the .npz then also holds the inputs (`source`) and, where the
    data has them, the true targets. Existing files are refused unless `overwrite`, before any
    computation.
    """
    from medjax.data import io

    workdir, out_dir = Path(workdir), Path(out_dir)
    config = load_run_config(workdir)
    trainer = loop.Trainer(config)
    task = trainer.task
    if not hasattr(task, "generate") and config.task not in ("pix2pix", "cyclegan"):
        raise ValueError(f"{workdir} is a {config.task!r} run; sample.py needs a GAN run")
    npz, grid_png = out_dir / "samples.npz", out_dir / "grid.png"
    if not overwrite:
        for p in (npz, grid_png):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass --overwrite to replace it")
    data = task.load_data()
    spec = loop.batch_spec_of(task, data, int(config.batch_size))
    trainer, state = _restore_for(workdir, config, trainer, checkpoint, spec)
    arrays: dict[str, np.ndarray] = {}
    if hasattr(task, "generate"):
        arrays["samples"] = task.generate(trainer, state, num, seed)
    elif "eval_volumes" in data:
        vols = data["eval_volumes"][:num]
        arrays["samples"] = np.stack([trainer.sliding_window(state, v["image"]) for v in vols])
        arrays["source"] = np.stack([v["image"] for v in vols])
    else:
        inputs = data["eval"]["image"][:num]
        arrays["samples"] = trainer.predict_all(state, inputs)
        arrays["source"] = inputs
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "samples.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(npz)
    samples = arrays["samples"]
    if samples.shape[-1] > 3:  # class probabilities: show the label map
        samples = samples.argmax(-1)[..., None].astype(np.float32)
    visualize.save_png(grid_png, visualize.sample_grid(samples[..., :1]))
    written = {"npz": npz, "grid": grid_png}
    for i, s in enumerate(samples):
        if s.ndim == 4:
            path = out_dir / f"sample_{i:04d}.nii.gz"
            io.write_nifti(path, s[..., 0], io.Geometry.identity(s.shape[:3]), overwrite=overwrite)
        else:
            path = out_dir / f"sample_{i:04d}.png"
            visualize.save_png(path, visualize.to_uint8(s[..., 0], lo=-1, hi=1))
        written[f"sample_{i}"] = path
    return written
