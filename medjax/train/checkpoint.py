"""Orbax checkpoints: the only module that imports orbax.

Two managers live under a work directory:

* ``checkpoints/`` keeps the latest `max_to_keep` states (resume, preemption);
* ``best/`` keeps the single best state by a validation metric (evaluation, export).

Saves are asynchronous; `wait()` before reading what was written or before exit. A save interrupted
half-way leaves a ``*.orbax-checkpoint-tmp*`` folder that is removed on the next start, never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `state`: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class Checkpointer:
    """Latest-N and best-by-metric Orbax checkpoints of one train state pytree.

    Args:
      workdir: the run's folder; checkpoints go to `workdir/checkpoints` and `workdir/best`.
      max_to_keep: how many of the latest checkpoints to keep.
      best_metric: key of the eval metrics dict that ranks `best/` checkpoints (None: no best).
      best_mode: "max" (Dice) or "min" (a loss).
      async_save: write in a background thread (the arrays are copied to host first).
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        max_to_keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        root = Path(workdir).resolve()
        self.best_metric = best_metric
        common = dict(
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
        )
        self._latest = ocp.CheckpointManager(
            root / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, **common),
        )
        self._best = None
        if best_metric:
            self._best = ocp.CheckpointManager(
                root / "best",
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    best_fn=lambda m: float(m[best_metric]),
                    best_mode=best_mode,
                    keep_checkpoints_without_metrics=False,
                    **common,
                ),
            )

    # -- queries -------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        return None if self._best is None else self._best.best_step()

    def all_steps(self) -> list[int]:
        return list(self._latest.all_steps())

    # -- writes --------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves `state` as step `step` in `checkpoints/`; returns whether a save started."""
        if step in self._latest.all_steps():
            return False
        return self._latest.save(step, args=ocp.args.StandardSave(state), force=force)

    def save_best(self, step: int, state: Any, metrics: dict[str, float]) -> bool:
        """Offers `state` to `best/`: kept only if `metrics[best_metric]` beats the best so far."""
        if self._best is None:
            return False
        if self.best_metric not in metrics:
            raise KeyError(
                f"best_metric {self.best_metric!r} is not among the eval metrics {sorted(metrics)}"
            )
        value = float(metrics[self.best_metric])
        if value != value:  # NaN never ranks as best
            return False
        if step in self._best.all_steps():
            return False
        scalars = {k: float(v) for k, v in metrics.items()}
        return self._best.save(step, args=ocp.args.StandardSave(state), metrics=scalars, force=True)

    def reached_preemption(self, step: int) -> bool:
        """True when the job is being preempted (SIGTERM sync point): save now and exit."""
        return self._latest.reached_preemption(step)

    # -- reads ---------------------------------------------------------------------------------
    def restore(self, target: Any, step: int | None = None, *, best: bool = False) -> Any:
        """Restores onto `target` (a state or its `abstract_like`; shardings are honoured)."""
        mngr = self._best if best else self._latest
        if mngr is None:
            raise ValueError("no best checkpoints are kept: config.best_metric is unset")
        if step is None:
            step = mngr.best_step() if best else mngr.latest_step()
        if step is None:
            where = "best" if best else "checkpoints"
            raise FileNotFoundError(f"no checkpoint found in {Path(mngr.directory) / ''} ({where})")
        abstract = abstract_like(target)
        return mngr.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self._latest.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._latest.close()
        if self._best is not None:
            self._best.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
