"""The training loop: the one place with `jax.jit`, shardings, the step loop, eval and checkpoints.

`run(config, workdir)` looks the task up by module name (`medjax.train.tasks.<config.task>`),
builds the mesh, initialises (or resumes) the state on its shardings, and trains for
`config.num_steps` steps, evaluating every `eval_every`, checkpointing every `checkpoint_every`
and on preemption (SIGTERM), logging to `workdir/metrics.jsonl`, TensorBoard and PNGs.

A resumed run continues the same run: the state holds the step, optimizer state and base PRNG key,
step keys are `fold_in(key, step)` and the data order is a pure function of `(seed, step)`.
"""

from __future__ import annotations

import functools
import importlib
import json
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from medjax import inference, parallel
from medjax.data import pipeline
from medjax.train.checkpoint import Checkpointer
from medjax.train.logging import MetricWriter, Progress

# Config keys that may change between a run and its resumption (schedule-independent bookkeeping).
RESUMABLE_CHANGES = (
    "num_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "data.directory",
    "data.val_directory",
)


def get_task(config: Any) -> Any:
    """`medjax.train.tasks.<config.task>.Task(config)`: a new task is one new file, no registry."""
    name = config.task
    try:
        module = importlib.import_module(f"medjax.train.tasks.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"medjax.train.tasks.{name}":
            raise
        raise ValueError(f"config.task={name!r}: no module medjax/train/tasks/{name}.py") from e
    return module.Task(config)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process (gathering across hosts when needed)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _config_dict(config: Any) -> dict[str, Any]:
    return (
        json.loads(config.to_json_best_effort())
        if hasattr(config, "to_json_best_effort")
        else dict(config)
    )


def check_workdir_config(config: Any, workdir: Path) -> None:
    """Refuses to resume a run in `workdir` whose saved config differs in a way that would make
    its checkpoints incompatible; writes `config.json` for a new run."""
    path = workdir / "config.json"
    new = _config_dict(config)
    if path.exists():
        old = json.loads(path.read_text())
        a, b = _flatten(old), _flatten(new)
        diff = sorted(
            k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES
        )
        if diff and (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
            details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
            raise ValueError(
                f"{workdir} holds checkpoints of a run with a different config ({details}); "
                "use a new --workdir (nothing in the old one is overwritten)"
            )
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(new, indent=2, sort_keys=True))


class StopSignal:
    """Turns SIGTERM (a preemption notice, `kill`, a scheduler's time limit) into a flag.

    Single-process runs check the flag after each step, save and exit cleanly. Multi-process runs
    rely on Orbax's preemption sync point instead, so every host stops at the same step.
    """

    def __init__(self) -> None:
        self.received = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = True

    def stop_now(self, ckpt: Checkpointer, step: int) -> bool:
        if jax.process_count() > 1:
            return ckpt.reached_preemption(step)
        return self.received or ckpt.reached_preemption(step)

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class Trainer:
    """Compiled task functions on a mesh: what `run`, evaluation scripts and notebooks share."""

    def __init__(self, config: Any, *, task: Any | None = None, mesh: Any | None = None):
        self.config = config
        self.task = task if task is not None else get_task(config)
        self.mesh = mesh if mesh is not None else parallel.make_mesh(config.get("num_devices"))
        self.rep = parallel.replicated(self.mesh)
        self.data_sh = parallel.data_sharding(self.mesh)
        self._compiled: dict[str, Callable[..., Any]] = {}  # `compiled(method)` cache

    def init_state(self, batch_spec: Mapping[str, jax.ShapeDtypeStruct]) -> Any:
        """Initial state placed on its shardings (shapes from `eval_shape`, no host copy)."""
        key = jax.random.key(int(self.config.seed))
        init = functools.partial(self.task.init, batch=batch_spec)
        abstract = jax.eval_shape(init, key)
        self.state_sh = parallel.state_sharding(abstract, self.mesh)
        return jax.jit(init, out_shardings=self.state_sh)(key)

    @functools.cached_property
    def train_step(self) -> Callable[..., Any]:
        return jax.jit(
            self.task.train_step,
            in_shardings=(self.state_sh, self.data_sh),
            out_shardings=(self.state_sh, self.rep),
            donate_argnums=0,
        )

    @functools.cached_property
    def eval_step(self) -> Callable[..., Any]:
        return jax.jit(self.task.eval_step, in_shardings=(self.state_sh, self.data_sh))

    @functools.cached_property
    def predict(self) -> Callable[..., Any]:
        return jax.jit(self.task.predict, in_shardings=(self.state_sh, self.data_sh))

    @functools.cached_property
    def _sliding_window(self) -> Callable[..., Any]:
        inf = self.config.get("inference") or {}
        window = tuple(int(w) for w in (inf.get("window") or self.config.patch_size))
        window_batch = int(inf.get("window_batch", 2))
        n_dev = self.mesh.devices.size
        # Windows of one group spread over the devices when they divide evenly.
        sharding = self.data_sh if n_dev > 1 and window_batch % n_dev == 0 else None

        def fn(state: Any, volume: jax.Array) -> jax.Array:
            return inference.sliding_window_inference(
                functools.partial(self.task.predict, state),
                volume,
                window,
                overlap=float(inf.get("overlap", 0.5)),
                window_batch=window_batch,
                sigma_scale=float(inf.get("sigma_scale", 0.125)),
                mode=str(inf.get("mode", "gaussian")),
                window_sharding=sharding,
            )

        return jax.jit(fn, in_shardings=(self.state_sh, self.rep))

    def sliding_window(self, state: Any, volume: np.ndarray) -> np.ndarray:
        """Blended float32 logits `[*spatial, classes]` of one whole volume `[*spatial, C]`
        (windows and blending from `config.inference`; see `medjax.inference`)."""
        return to_host(self._sliding_window(state, volume))

    @property
    def eval_batch_size(self) -> int:
        return int(self.config.get("eval_batch_size") or self.config.batch_size)

    def evaluate(
        self, state: Any, arrays: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None]:
        """Per-example eval outputs over every example once (padding dropped; the bulky "pred"
        maps are dropped too), and the first batch with all its outputs (for pictures)."""
        rows: dict[str, list[np.ndarray]] = {}
        first = None
        for batch in pipeline.make_eval_iter(
            arrays, global_batch_size=self.eval_batch_size, mesh=self.mesh
        ):
            out = self.eval_step(state, batch)
            mask = to_host(batch[pipeline.MASK_KEY])
            host = {k: to_host(v) for k, v in out.items() if k != "pred" or first is None}
            if first is None:
                first = ({k: to_host(v) for k, v in batch.items()}, host)
            for k, v in host.items():
                if k != "pred":
                    rows.setdefault(k, []).append(v[mask])
        return {k: np.concatenate(v) for k, v in rows.items()}, first

    def compiled(self, method: str) -> Callable[..., Any]:
        """`task.<method>(state, batch_array)` jitted on the mesh (e.g. "features"), cached."""
        if method == "predict":
            return self.predict
        if method not in self._compiled:
            fn = getattr(self.task, method)
            self._compiled[method] = jax.jit(fn, in_shardings=(self.state_sh, self.data_sh))
        return self._compiled[method]

    def predict_all(self, state: Any, images: np.ndarray, method: str = "predict") -> np.ndarray:
        """`task.<method>` (float32 logits by default) for every row of `images`
        `[N, *spatial, C]`, batched and padded."""
        fn = self.compiled(method)
        out = []
        for batch in pipeline.make_eval_iter(
            {"image": images}, global_batch_size=self.eval_batch_size, mesh=self.mesh
        ):
            logits = to_host(fn(state, batch["image"]))
            out.append(logits[to_host(batch[pipeline.MASK_KEY])])
        return np.concatenate(out)


def batch_spec_of(task: Any, data: Mapping[str, Any], global_batch_size: int) -> dict[str, Any]:
    """Shapes of one global training batch: `task.batch_spec(gb)` when the task samples its
    batches itself (and returns shapes), else those of the in-memory `data["train"]` arrays."""
    spec = task.batch_spec(global_batch_size) if hasattr(task, "batch_spec") else None
    if spec is not None:
        return spec
    return {
        k: jax.ShapeDtypeStruct((global_batch_size, *v.shape[1:]), v.dtype)
        for k, v in data["train"].items()
    }


def _count(data: Mapping[str, Any], split: str) -> int:
    arrays = data.get(split)
    if isinstance(arrays, Mapping):
        return len(next(iter(arrays.values())))
    return len(arrays) if arrays is not None else 0


def run(config: Any, workdir: str | Path) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final metrics."""
    parallel.initialize_distributed()
    workdir = Path(workdir).resolve()
    check_workdir_config(config, workdir)
    trainer = Trainer(config)
    task, mesh = trainer.task, trainer.mesh
    data = task.load_data()
    gb = int(config.batch_size)
    parallel.check_batch_size(gb, mesh)
    batch_spec = batch_spec_of(task, data, gb)
    state = trainer.init_state(batch_spec)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

    ckpt = Checkpointer(
        workdir,
        max_to_keep=int(config.keep_checkpoints),
        best_metric=config.get("best_metric") or None,
        best_mode=config.get("best_mode", "max"),
    )
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
    start = int(state.step)
    num_steps = int(config.num_steps)
    writer = MetricWriter(workdir, tensorboard=bool(config.get("tensorboard", True)))
    if jax.process_index() == 0:
        print(
            f"medjax: task={config.task} devices={mesh.devices.size} "
            f"processes={jax.process_count()} "
            f"params={n_params:,} train={_count(data, 'train')} eval={_count(data, 'eval')} "
            f"{'resuming at step ' + str(start) if start else 'from scratch'} -> {num_steps}",
            flush=True,
        )

    def do_eval(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        if hasattr(task, "evaluate"):  # e.g. whole volumes by sliding window
            summary, picture = task.evaluate(trainer, state, data)
        else:
            per_example, first = trainer.evaluate(state, data["eval"])
            summary = task.summarize(per_example)
            picture = task.visualize(*first) if first and hasattr(task, "visualize") else None
        summary["eval_seconds"] = time.perf_counter() - t0
        writer.scalars(step, summary, split="eval")
        if picture is not None:
            writer.image(step, getattr(task, "picture_name", "eval_predictions"), picture)
        ckpt.save_best(step, state, summary)
        return summary

    # Sample grids from fixed noise every `sample_every` steps (GANs), besides the evaluation.
    sample_every = int(config.get("sample_every") or 0) if hasattr(task, "samples") else 0

    progress = Progress(num_steps, start=start, every=int(config.log_every))
    # What the progress line shows and checks for divergence, and what the eval line prints.
    progress_keys = tuple(getattr(task, "progress_keys", ("loss",)))
    summary_keys = getattr(task, "summary_keys", None)

    def show_in_summary(k: str) -> bool:
        if summary_keys is not None:
            return k in summary_keys
        return k.endswith("_mean") or k == "accuracy"

    log_every, eval_every = int(config.log_every), int(config.eval_every)
    ckpt_every = int(config.checkpoint_every)
    summary: dict[str, float] = {}
    train_seconds = 0.0
    window: list[dict[str, jax.Array]] = []
    # A task may sample its own batches (e.g. patches of volumes); else in-memory arrays.
    if hasattr(task, "make_train_iter"):
        make_iter = functools.partial(task.make_train_iter, data)
    else:
        make_iter = functools.partial(pipeline.make_train_iter, data["train"])
    it = make_iter(
        global_batch_size=gb,
        mesh=mesh,
        seed=int(config.seed),
        start_step=start,
        num_steps=num_steps - start,
    )
    t_last = time.perf_counter()
    stop = StopSignal()
    preempted = False
    try:
        for step in range(start + 1, num_steps + 1):
            batch = next(it)
            state, m = trainer.train_step(state, batch)
            window.append(m)
            # Bound the steps in flight: dispatch is asynchronous, and without this wait the
            # host can queue up to `log_every` steps ahead of the device, so a SIGTERM would
            # first wait for all of them (and timings would be wrong).
            if len(window) > 1:
                jax.block_until_ready(window[-2])
            save_now = step % ckpt_every == 0 or step == num_steps
            if step % log_every == 0 or save_now or step % eval_every == 0:
                host = jax.tree.map(lambda *xs: float(np.mean([to_host(x) for x in xs])), *window)
                window.clear()
                now = time.perf_counter()
                train_seconds += now - t_last
                writer.scalars(step, {**host, "train_seconds": train_seconds}, split="train")
                shown = {k: host[k] for k in progress_keys}
                progress.update(step, shown, force=True)
                bad = {k: v for k, v in shown.items() if not np.isfinite(v)}
                if bad:  # never checkpoint a diverged state
                    raise FloatingPointError(
                        f"training loss became {bad} at step {step}; the last good "
                        f"checkpoint in {workdir / 'checkpoints'} is kept (lower the learning "
                        "rate?)"
                    )
                t_last = time.perf_counter()
            if sample_every and step % sample_every == 0:
                writer.image(step, "samples", task.samples(trainer, state))
                t_last = time.perf_counter()
            if save_now:  # before the evaluation: an error there loses no training
                ckpt.save(step, state, force=True)
            if step % eval_every == 0 or step == num_steps:
                summary = do_eval(step)
                if jax.process_index() == 0:
                    shown = {k: v for k, v in summary.items() if show_in_summary(k)}
                    print(
                        f"eval @ {step}: " + " ".join(f"{k} {v:.4f}" for k, v in shown.items()),
                        flush=True,
                    )
                t_last = time.perf_counter()
            preempted = stop.stop_now(ckpt, step)
            if preempted and not save_now:
                ckpt.save(step, state, force=True)
            if preempted:
                print(f"stopped by SIGTERM/preemption at step {step}; checkpoint saved", flush=True)
                break
        if not summary and not preempted:
            summary = do_eval(int(state.step))
    finally:
        stop.close()
        # On any exit, finish the saves already started: a crash loses unsaved steps, never a
        # checkpoint that was being written.
        ckpt.close()
        writer.close()
    final = {**summary, "step": int(state.step), "train_seconds": train_seconds, "params": n_params}
    if jax.process_index() == 0:
        (workdir / "final_metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
    return final


def restore(
    config: Any,
    workdir: str | Path,
    *,
    best: bool = True,
    trainer: Trainer | None = None,
    batch_spec: Mapping[str, jax.ShapeDtypeStruct] | None = None,
) -> tuple[Trainer, Any]:
    """(trainer, state) restored from `workdir`'s best checkpoint (or latest when `best=False`,
    or when no best one was kept), for evaluation and prediction."""
    trainer = trainer or Trainer(config)
    if batch_spec is None:
        raise ValueError("restore() needs batch_spec (shapes of one input batch)")
    state = trainer.init_state(batch_spec)
    ckpt = Checkpointer(workdir, best_metric=config.get("best_metric") or None, read_only=True)
    use_best = best and ckpt.best_step() is not None
    state = ckpt.restore(state, best=use_best)
    ckpt.close()
    return trainer, state
