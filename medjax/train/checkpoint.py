"""Orbax checkpoints: the only module that imports orbax.

Two managers live under a work directory:

* ``checkpoints/`` keeps the latest `max_to_keep` states (resume, preemption);
* ``best/`` keeps the single best state by a validation metric (evaluation, export).

Saves are asynchronous; `wait()` before reading what was written or before exit. A save interrupted
half-way leaves a ``*.orbax-checkpoint-tmp*`` folder that is removed on the next start, never read.

A save that cannot be written (a read-only or full disk) raises `CheckpointError` naming the folder
and the complete checkpoints that are kept: the folder is probed before each save, so Orbax never
starts one it cannot finish, and Orbax removes an old checkpoint only after a newer one committed.
A restore onto a different model raises `CheckpointError` listing what differs.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from medjax.errors import CheckpointError


def ensure_writable(folder: str | Path) -> None:
    """Creates `folder` if needed and writes then removes a probe file in it; raises OSError
    naming `folder` when that fails (read-only file system, permissions, full disk)."""
    folder = Path(folder)
    probe = folder / f".medjax-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, f"cannot write in {folder}: {e.strerror or e}") from e
    finally:
        probe.unlink(missing_ok=True)


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
        for path, leaf in flat
    }


def describe_mismatch(saved: Any, target: Any, limit: int = 3) -> str:
    """What differs between a checkpoint's arrays and a restore target's (paths, shapes)."""
    a, b = _shapes(saved), _shapes(target)
    missing = [k for k in b if k not in a]
    extra = [k for k in a if k not in b]
    shapes = [f"{k} saved {a[k]} vs model {b[k]}" for k in b if k in a and a[k] != b[k]]
    parts = []
    for what, items in (
        ("arrays this model has and the checkpoint lacks", missing),
        ("arrays the checkpoint has and this model lacks", extra),
        ("arrays of another shape", shapes),
    ):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > limit else ""
            parts.append(f"{what}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts) or "the array trees differ"


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `state`: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _saved_tree(mngr: Any, step: int) -> Any:
    """The saved item's tree of array metadata (paths, shapes), or None where it cannot be
    read (the restore then decides)."""
    try:
        saved = mngr.item_metadata(step)
    except Exception:  # noqa: BLE001 - the restore reports what is wrong with the checkpoint
        return None
    return getattr(saved, "tree", saved)


def _misfit(mngr: Any, step: int, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint step {step} in {Path(mngr.directory)} does not fit this config's model "
        f"({why}); restore it with the config it was trained with"
    )


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
            item_handlers=ocp.StandardCheckpointHandler(),  # item_metadata: the saved tree
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
                item_handlers=ocp.StandardCheckpointHandler(),
            )

    # -- queries -------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        return None if self._best is None else self._best.best_step()

    def all_steps(self) -> list[int]:
        return list(self._latest.all_steps())

    # -- writes --------------------------------------------------------------------------------
    def _failed(self, what: str, mngr: Any, error: BaseException) -> CheckpointError:
        folder = Path(mngr.directory)
        try:
            kept = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
        except OSError:
            kept = []
        return CheckpointError(
            f"{what} in {folder} failed: {error}; the complete checkpoints {kept} in {folder} "
            "are kept (free space or make the folder writable, then relaunch to resume)"
        )

    def _save(self, mngr: Any, step: int, state: Any, what: str, **kwargs: Any) -> bool:
        try:
            mngr.wait_until_finished()  # a failure of the previous (async) save surfaces here
            if jax.process_index() == 0:
                ensure_writable(mngr.directory)
            return mngr.save(step, args=ocp.args.StandardSave(state), **kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            raise self._failed(what.format(step=step), mngr, e) from e

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves `state` as step `step` in `checkpoints/`; returns whether a save started."""
        if step in self._latest.all_steps():
            return False
        return self._save(self._latest, step, state, "saving step {step}", force=force)

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
        return self._save(
            self._best, step, state, "saving best step {step}", metrics=scalars, force=True
        )

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
        # The saved tree's paths and shapes are compared first: a restore that fails midway
        # leaves Orbax's pending reads to an event loop that is closed by then.
        saved = _saved_tree(mngr, step)
        if saved is not None and _shapes(saved) != _shapes(abstract):
            raise _misfit(mngr, step, describe_mismatch(saved, abstract))
        try:
            return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        except (ValueError, KeyError, TypeError) as e:
            raise _misfit(mngr, step, str(e).splitlines()[0] if str(e) else repr(e)) from e

    def wait(self) -> None:
        """Waits for the saves in flight; raises `CheckpointError` when one failed."""
        for mngr in (self._latest, self._best):
            if mngr is None:
                continue
            try:
                mngr.wait_until_finished()
            except (OSError, RuntimeError, ValueError) as e:
                raise self._failed("a checkpoint save", mngr, e) from e

    def close(self) -> None:
        self.wait()
        self._latest.close()
        if self._best is not None:
            self._best.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
