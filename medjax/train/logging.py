"""Run logs: a JSONL metrics file, TensorBoard scalars and images, PNGs, and a progress line.

Only process 0 writes. TensorBoard events go through `tf.summary` (TensorFlow is part of the `data`
extra); pass `tensorboard=False` to skip it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from medjax import files, visualize


def _scalar(v: Any) -> float:
    return float(np.asarray(v))


def resume_rows(path: Path, start_step: int) -> tuple[list[str], dict[str, float]]:
    """The lines of a `metrics.jsonl` that a run resumed at `start_step` keeps (training rows up
    to it, evaluation rows before it: the rest is redone), and the last kept training row."""
    kept, last = [], {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        step, split = int(row.get("step", 0)), row.get("split")
        if step < start_step or (step == start_step and split == "train"):
            kept.append(line)
            if split == "train":
                last = row
    return kept, last


class MetricWriter:
    """Writes `{"step": s, "split": ..., **scalars}` to `workdir/metrics.jsonl` and TensorBoard.

    `start_step`: a resumed run's step. Rows the killed process wrote after it (which the
    resumed run redoes) are dropped, so every step is logged once; `resumed` is the last kept
    training row (e.g. its `train_seconds`, which the resumed run continues from)."""

    def __init__(self, workdir: str | Path, *, tensorboard: bool = True, start_step: int = 0):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        self.resumed: dict[str, float] = {}
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "metrics.jsonl"
        if path.exists():
            kept, self.resumed = resume_rows(path, start_step)
            with files.replacing(path) as tmp:
                tmp.write_text("".join(f"{line}\n" for line in kept))
        self._jsonl = open(path, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            import tensorflow as tf

            tf.config.set_visible_devices([], "GPU")
            self._tb = tf.summary.create_file_writer(str(self.workdir / "tensorboard"))

    def scalars(self, step: int, values: Mapping[str, Any], *, split: str = "train") -> None:
        if not self.enabled:
            return
        vals = {k: _scalar(v) for k, v in values.items()}
        row = {
            "step": int(step),
            "split": split,
            **{k: v if math.isfinite(v) else None for k, v in vals.items()},
        }
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default(step=int(step)):
                for k, v in vals.items():
                    tf.summary.scalar(f"{split}/{k}", v)

    def image(
        self, step: int, name: str, rgb: np.ndarray, *, png_dir: str | None = "images"
    ) -> Path | None:
        """Logs an RGB uint8 image to TensorBoard and to `workdir/<png_dir>/<name>_<step>.png`."""
        if not self.enabled:
            return None
        path = None
        if png_dir:
            path = visualize.save_png(self.workdir / png_dir / f"{name}_{int(step):06d}.png", rgb)
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default(step=int(step)):
                tf.summary.image(name, np.asarray(rgb, np.uint8)[None], max_outputs=1)
        return path

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """One log line every `every` steps: step/total, it/s over the last window, ETA, and metrics."""

    def __init__(
        self, total: int, *, start: int = 0, every: int = 10, stream: TextIO | None = None
    ):
        self.total, self.every = total, max(1, every)
        self.stream = stream or sys.stdout
        self.enabled = jax.process_index() == 0
        self._tw = time.perf_counter()
        self._start = self._sw = start

    def update(
        self, step: int, metrics: Mapping[str, Any] | None = None, *, force: bool = False
    ) -> None:
        if not self.enabled or not (force or step % self.every == 0 or step == self.total):
            return
        now = time.perf_counter()
        rate = (step - self._sw) / max(now - self._tw, 1e-9)
        self._tw, self._sw = now, step
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        parts = [f"step {step}/{self.total}", f"{rate:.2f} it/s", f"ETA {_fmt_time(eta)}"]
        parts += [f"{k} {_scalar(v):.4f}" for k, v in (metrics or {}).items()]
        print(" | ".join(parts), file=self.stream, flush=True)
