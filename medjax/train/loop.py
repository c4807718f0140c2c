"""The training loop: the one place with `jax.jit`, shardings, the step loop, eval and checkpoints.

`run(config, workdir)` looks the task up by module name (`medjax.train.tasks.<config.task>`),
builds the mesh, initialises (or resumes) the state on its shardings, and trains for
`config.num_steps` steps, evaluating every `eval_every`, checkpointing every `checkpoint_every`
and on preemption (SIGTERM), logging to `workdir/metrics.jsonl`, TensorBoard and PNGs.
Everything task-specific goes through the task contract (`medjax.train.task`).

A resumed run continues the same run: the state holds the step, optimizer state and base PRNG key,
step keys are `fold_in(key, step)` and the data order is a pure function of `(seed, step)`.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import json
import pkgutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from medjax import inference, parallel, visualize
from medjax.data import pipeline
from medjax.errors import WorkdirError
from medjax.files import write_json
from medjax.train import optim, platform, schema
from medjax.train import task as task_lib
from medjax.train.checkpoint import Checkpointer, ensure_writable
from medjax.train.logging import MetricWriter, Progress

# Config keys that may change between a run and its resumption: bookkeeping, the mesh, and
# everything that only concerns evaluation (`fnmatch` patterns).
RESUMABLE_CHANGES = (
    "num_devices",  # the mesh may change (more GPUs, FSDP): Orbax restores onto the new one
    "fsdp",
    "grad_accum_steps",
    "num_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "nonfinite",
    "tensorboard",
    "sample_every",
    "num_pictures",
    "eval_batch_size",
    "eval.*",
    "inference.*",
    "data.directory",
    "data.val_directory",
)
EXAMPLE_SPEC = "example_spec.json"  # shapes of one training example, written at the first run


def task_names() -> list[str]:
    """Every experiment type: the modules of `medjax/train/tasks/` (private ones excluded)."""
    from medjax.train import tasks

    return sorted(
        m.name for m in pkgutil.iter_modules(tasks.__path__) if not m.name.startswith("_")
    )


def get_task(config: Any) -> task_lib.Task:
    """`medjax.train.tasks.<config.task>.Task(config)`: a new task is one new file, no registry."""
    name = str(config.task)
    try:
        module = importlib.import_module(f"medjax.train.tasks.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"medjax.train.tasks.{name}":
            raise
        raise ValueError(
            f"config.task={name!r}: no module medjax/train/tasks/{name}.py (tasks: {task_names()})"
        ) from e
    task = module.Task(config)
    if not isinstance(task, task_lib.Task):
        raise TypeError(f"medjax.train.tasks.{name}.Task must subclass medjax.train.task.Task")
    return task


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as numpy on every process (gathering across hosts when needed)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _config_dict(config: Any) -> dict[str, Any]:
    return (
        json.loads(config.to_json_best_effort())
        if hasattr(config, "to_json_best_effort")
        else dict(config)
    )


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with (its `config.json`)."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a medjax run folder?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _resumable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in RESUMABLE_CHANGES)


def _has_checkpoints(workdir: Path) -> bool:
    return any(
        (workdir / sub).is_dir() and any(p.name[:1].isdigit() for p in (workdir / sub).iterdir())
        for sub in ("checkpoints", "best")
    )


def check_workdir(config: Any, workdir: Path) -> None:
    """Refuses, before anything is written, a `workdir` this run cannot use: not writable,
    holding checkpoints without the `config.json` that says what they are, or holding
    checkpoints of a run whose config differs in a way that makes them incompatible (keys
    outside `RESUMABLE_CHANGES`)."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file, not a folder")
    path = workdir / "config.json"
    if workdir.is_dir() and _has_checkpoints(workdir):
        if not path.exists():
            raise WorkdirError(
                f"{workdir} holds checkpoints but no config.json, so what they are cannot be "
                "checked; nothing was written. Put back the run's config.json, or use a new "
                "--workdir"
            )
        # both sides as JSON (tuples become lists), so equal configs compare equal
        a = schema.flatten(json.loads(path.read_text()))
        b = schema.flatten(_config_dict(config))
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not _resumable(k))
        if diff:
            details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
            raise WorkdirError(
                f"{workdir} holds checkpoints of a run with a different config ({details}); "
                "use a new --workdir (nothing in the old one is overwritten)"
            )
    if jax.process_index() == 0:
        try:
            ensure_writable(workdir)
        except OSError as e:
            raise WorkdirError(f"--workdir {workdir} is not writable: {e}") from e


def write_run_config(config: Any, workdir: Path) -> None:
    """`workdir/config.json`: written once the state is initialised or restored."""
    if jax.process_index() == 0:
        write_json(workdir / "config.json", _config_dict(config))


def write_example_spec(workdir: Path, spec: Mapping[str, jax.ShapeDtypeStruct]) -> None:
    """Records the shapes of one training example, so evaluation restores without the data."""
    if jax.process_index() == 0:
        rows = {
            k: {"shape": list(v.shape), "dtype": np.dtype(v.dtype).name} for k, v in spec.items()
        }
        write_json(workdir / EXAMPLE_SPEC, rows)


def read_example_spec(workdir: Path) -> dict[str, jax.ShapeDtypeStruct] | None:
    path = Path(workdir) / EXAMPLE_SPEC
    if not path.exists():
        return None
    rows = json.loads(path.read_text())
    return {
        k: jax.ShapeDtypeStruct(tuple(v["shape"]), np.dtype(v["dtype"])) for k, v in rows.items()
    }


class StopSignal:
    """Turns SIGTERM (a preemption notice, `kill`, a scheduler's time limit) into a flag.

    Single-process runs check the flag after each step, save and exit cleanly. Multi-process runs
    rely on Orbax's preemption sync point instead, so every host stops at the same step.
    """

    def __init__(self) -> None:
        self.received = False
        self._previous = None
        # Many processes: JAX's preemption notifier owns SIGTERM (a Python handler would
        # replace it and the hosts would never agree on a step to stop at).
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
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


def skip_nonfinite(step: Callable[..., Any]) -> Callable[..., Any]:
    """`step` that keeps the previous state (all but its step counter) when any of its metrics
    is NaN/Inf, and reports `nonfinite` (1 for a skipped step) among the metrics."""

    def guarded(state: Any, batch: Any) -> Any:
        new, metrics = step(state, batch)
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        return kept.replace(step=new.step), {**metrics, "nonfinite": 1.0 - ok.astype(jnp.float32)}

    return guarded


def nonfinite_terms(metrics: Mapping[str, Any]) -> list[str]:
    """The metrics (loss terms) of one step that are NaN/Inf (`nonfinite` itself excluded)."""

    def local(v: Any) -> np.ndarray:
        # replicated metrics: this process's copy, no collective per step on many hosts
        sharding = getattr(v, "sharding", None)
        if sharding is not None and sharding.is_fully_replicated:
            return np.asarray(v.addressable_data(0))
        return np.asarray(to_host(v))

    return [k for k, v in metrics.items() if k != "nonfinite" and not np.isfinite(local(v)).all()]


def stack_trees(*trees: Any) -> Any:
    """Pytrees of equal structure -> one pytree with their leaves stacked on a new axis 0."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _leading_dim(data: Any) -> int:
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("map_batches: no arrays given")
    return len(leaves[0])


class Trainer:
    """Compiled task functions on a mesh: what `run`, the scripts and notebooks share.

    It is the `medjax.train.task.Runner` that a task's host-side methods receive: `call`,
    `map_batches` and `sliding_window` jit any task method on the mesh; `restore_run` loads
    another finished run (e.g. the classifier behind FID).

    Scale-out settings of the config (see README "Scaling"): `num_devices` and `fsdp` shape the
    mesh (`medjax.parallel`); `replicas` > 1 trains that many independent models side by side
    in ONE compiled step over the stacked states and batches (replica i with seed `seed + i`
    for its parameters and its data order, and learning rate `lr * replica_lr_scales[i]`):
    `replica_mode="vmap"` (`jax.vmap`; the replicas are split over the devices when their
    number divides the device count, otherwise every replica's batch is) or `"unroll"` (each
    replica's step side by side in the program, each batch split over the devices; compiles
    N times the graph); `"auto"` picks unroll on CPUs, whose vmapped (grouped) convolutions
    are slow, vmap elsewhere. Evaluation scores every replica and reports the mean and the
    standard deviation (`<metric>_sd`).
    """

    def __init__(self, config: Any, *, task: task_lib.Task | None = None, mesh: Any = None):
        schema.validate(config)  # every key's type and range, before anything is built
        self.config = config
        self.replicas = int(config.get("replicas") or 1)
        self.lr_scales = tuple(float(x) for x in (config.get("replica_lr_scales") or ()))
        if task is None:
            task = get_task(optim.with_replica_scaling(config) if self.lr_scales else config)
        self.task = task
        accum = int(config.get("grad_accum_steps") or 1)
        if accum > 1 and not task.accumulates_gradients:
            raise task.cannot(
                f"accumulate gradients (config.grad_accum_steps={accum})",
                "use a smaller batch_size, or fsdp to fit a larger one",
            )
        self.mesh = (
            mesh
            if mesh is not None
            else parallel.make_mesh(config.get("num_devices"), int(config.get("fsdp") or 1))
        )
        n_dev = self.mesh.devices.size
        fsdp = int(self.mesh.shape.get(parallel.FSDP_AXIS, 1))
        mode = str(config.get("replica_mode") or "auto")
        if mode == "auto":  # XLA:CPU runs vmapped (grouped) convolutions slowly
            mode = "unroll" if self.mesh.devices.flat[0].platform == "cpu" else "vmap"
        if mode not in ("vmap", "unroll"):
            raise ValueError(f"config.replica_mode={mode!r} is not 'auto', 'vmap' or 'unroll'")
        self.replica_mode = mode
        # vmap: replicas split over the devices (no communication at all) when they divide
        # evenly; otherwise, and unrolled, every replica's batch is split over the devices.
        self.split_replicas = (
            self.replicas > 1 and mode == "vmap" and self.replicas % n_dev == 0 and fsdp == 1
        )
        self.rep = parallel.replicated(self.mesh)
        batch_dim = 1 if self.replicas > 1 and not self.split_replicas else 0
        self.data_sh = parallel.data_sharding(self.mesh, batch_dim)
        self.state_sh: Any = None  # of the (stacked) train state
        self.model_sh: Any = None  # of ONE replica's state (what evaluation compiles against)
        self._compiled: dict[Any, Callable[..., Any]] = {}

    def init_state(self, batch_spec: Mapping[str, jax.ShapeDtypeStruct]) -> Any:
        """Initial state placed on its shardings (shapes from `eval_shape`, no host copy);
        with replicas, stacked over a leading replica axis."""
        init = functools.partial(self.task.init, batch_spec=batch_spec)
        seed = int(self.config.seed)
        abstract_one = jax.eval_shape(init, jax.random.key(seed))
        self.model_sh = parallel.state_sharding(abstract_one, self.mesh)
        if self.replicas == 1:
            self.state_sh = self.model_sh
            return jax.jit(init, out_shardings=self.state_sh)(jax.random.key(seed))
        keys = jnp.stack([jax.random.key(seed + i) for i in range(self.replicas)])
        scales = self.lr_scales

        def init_all(keys: jax.Array) -> Any:
            state = jax.vmap(init)(keys)
            return optim.set_replica_scales(state, scales) if scales else state

        abstract = jax.eval_shape(init_all, keys)
        if self.split_replicas:
            self.state_sh = jax.tree.map(lambda _: self.data_sh, abstract)
        else:
            self.state_sh = parallel.state_sharding(abstract, self.mesh, replica_axis=True)
        return jax.jit(init_all, out_shardings=self.state_sh)(keys)

    @property
    def steps_one_at_a_time(self) -> bool:
        """Whether the training loop dispatches a step only after the previous one finished
        and the next batch was fetched: a single-process CPU run, where XLA allocates a step's
        temporaries when it is dispatched (see `run`). Accelerators and runs of many processes
        keep one step in flight."""
        return self.mesh.devices.flat[0].platform == "cpu" and jax.process_count() == 1

    @functools.cached_property
    def train_step(self) -> Callable[..., Any]:
        one = self.task.train_step
        if str(self.config.get("nonfinite") or "stop") == "skip":
            one = skip_nonfinite(one)
        step = one
        if self.replicas > 1 and self.replica_mode == "vmap":
            step = jax.vmap(one)
        elif self.replicas > 1:  # one program holding each replica's step, unrolled

            def step(state: Any, batch: Any) -> Any:
                outs = [
                    one(*jax.tree.map(lambda x, i=i: x[i], (state, batch)))
                    for i in range(self.replicas)
                ]
                return stack_trees(*outs)

        return jax.jit(
            step,
            in_shardings=(self.state_sh, self.data_sh),
            out_shardings=(self.state_sh, self.rep),
            donate_argnums=0,
        )

    def train_batches(
        self, data: task_lib.TaskData, *, start_step: int, num_steps: int
    ) -> Iterator[dict[str, jax.Array]]:
        """The training batches of steps `start_step + 1, ...`: one stream per replica (seed
        `seed + i`), stacked on a leading replica axis when there are several."""
        its = [
            data.make_train_iter(
                global_batch_size=int(self.config.batch_size),
                mesh=self.mesh,
                seed=int(self.config.seed) + i,
                start_step=start_step,
                num_steps=num_steps,
                num_shards=int(self.config.data.get("shards") or 0),
            )
            for i in range(self.replicas)
        ]
        if self.replicas == 1:
            return its[0]
        stack = jax.jit(stack_trees, out_shardings=self.data_sh)
        return (stack(*bs) for bs in zip(*its, strict=True))

    def step_of(self, state: Any) -> int:
        """The number of steps `state` has taken (every replica has taken the same)."""
        return int(np.asarray(to_host(state.step)).reshape(-1)[0])

    def num_params(self, state: Any) -> int:
        """Parameters of one model (one replica)."""
        total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        return total // self.replicas

    def replica(self, state: Any, i: int) -> Any:
        """Replica `i`'s state (the state itself when there is one replica)."""
        if self.replicas == 1:
            if i:
                raise ValueError(f"replica {i} requested from a run of one replica")
            return state
        if not 0 <= i < self.replicas:
            raise ValueError(f"replica {i} is not in [0, {self.replicas})")
        return self._take_replica(state, i)

    @functools.cached_property
    def _take_replica(self) -> Callable[[Any, int], Any]:
        """One compiled selection for every replica index (the index is traced)."""

        def take(state: Any, i: jax.Array) -> Any:
            return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), state)

        return jax.jit(take, out_shardings=self.model_sh)

    def evaluate(self, state: Any, eval_set: Any, num_pictures: int = 4) -> task_lib.Evaluation:
        """`task.evaluate` of the state; with replicas, of each one: the summary holds the mean
        over replicas of every metric and its standard deviation `<metric>_sd` (ddof 1), the
        rows a `replica` column, the pictures are replica 0's."""
        if self.replicas == 1:
            return self.task.evaluate(self, state, eval_set, num_pictures=num_pictures)
        evs = [
            self.task.evaluate(
                self, self.replica(state, i), eval_set, num_pictures=num_pictures if i == 0 else 0
            )
            for i in range(self.replicas)
        ]
        summary: dict[str, float] = {}
        headline = {*(self.task.summary_keys or ()), str(self.config.get("best_metric") or "")}
        for k in evs[0].summary:
            vals = np.array([float(e.summary[k]) for e in evs])
            summary[k] = float(np.mean(vals))
            if k not in ("cases", "step"):
                summary[f"{k}_sd"] = float(np.std(vals, ddof=1))
            if k in headline:  # each replica's own value of the headline metrics
                summary.update({f"{k}_r{i}": float(v) for i, v in enumerate(vals)})
        rows = [
            {"id": r.get("id", j), "replica": i, **r}
            for i, e in enumerate(evs)
            for j, r in enumerate(e.rows)
        ]
        return task_lib.Evaluation(summary, rows, evs[0].pictures)

    def compiled(self, method: str) -> Callable[..., Any]:
        """`task.<method>` jitted (any signature; arguments keep their shardings), cached."""
        if method not in self._compiled:
            fn = getattr(self.task, method, None)
            if not callable(fn):
                raise self.task.cannot(f"run {method!r}", "no such method in its task file")
            self._compiled[method] = jax.jit(fn)
        return self._compiled[method]

    def call(self, method: str, state: Any, *args: Any) -> Any:
        """`task.<method>(state, *args)`, compiled on the mesh."""
        return self.compiled(method)(state, *args)

    @property
    def eval_batch_size(self) -> int:
        return int(self.config.get("eval_batch_size") or self.config.batch_size)

    def map_batches(
        self, state: Any, data: Any, method: str = "predict", *, batch_size: int | None = None
    ) -> Any:
        """`task.<method>(state, batch)` over every row of `data` (an array `[N, ...]`, or a
        dict of them: the method then gets the batch dict) in padded global batches sharded over
        the mesh; returns the outputs' pytree as host numpy `[N, ...]` (padding dropped)."""
        fn = self.compiled(method)
        is_array = not isinstance(data, Mapping)
        arrays = {"x": data} if is_array else dict(data)
        n = _leading_dim(arrays)
        outs: list[Any] = []
        for batch in pipeline.make_eval_iter(
            arrays, global_batch_size=int(batch_size or self.eval_batch_size), mesh=self.mesh
        ):
            mask = to_host(batch.pop(pipeline.MASK_KEY))
            out = fn(state, batch["x"] if is_array else batch)
            outs.append(jax.tree.map(lambda x, m=mask: to_host(x)[m], out))
        result = jax.tree.map(lambda *xs: np.concatenate(xs), *outs)
        assert _leading_dim(result) == n
        return result

    def _window_fn(self, method: str, window: tuple[int, ...]) -> Callable[..., Any]:
        key = ("sliding_window", method, window)
        if key not in self._compiled:
            inf = self.config.get("inference") or {}
            n_dev = self.mesh.devices.size
            # Windows of one group spread over every device: the group is rounded up to a
            # multiple of the devices (the last group is padded with weight-0 windows).
            window_batch = -(-int(inf.get("window_batch", 2)) // n_dev) * n_dev
            sharding = parallel.data_sharding(self.mesh) if n_dev > 1 else None
            predict = getattr(self.task, method)

            def fn(state: Any, volume: jax.Array) -> jax.Array:
                return inference.sliding_window_inference(
                    functools.partial(predict, state),
                    volume,
                    window,
                    overlap=float(inf.get("overlap", 0.5)),
                    window_batch=window_batch,
                    sigma_scale=float(inf.get("sigma_scale", 0.125)),
                    mode=str(inf.get("mode", "gaussian")),
                    window_sharding=sharding,
                )

            self._compiled[key] = jax.jit(fn, in_shardings=(self.model_sh, self.rep))
        return self._compiled[key]

    def sliding_window(
        self,
        state: Any,
        volume: np.ndarray,
        *,
        method: str = "predict",
        window: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Blended float32 `task.<method>` outputs `[*spatial, C_out]` of one whole array
        `[*spatial, C]`; windows (default `config.inference.window`, else `config.patch_size`)
        and blending from `config.inference` (see `medjax.inference`)."""
        inf = self.config.get("inference") or {}
        win = tuple(int(w) for w in (window or inf.get("window") or self.config.patch_size))
        return to_host(self._window_fn(method, win)(state, volume))

    def restore_run(self, workdir: str | Path, checkpoint: str = "best") -> tuple[Trainer, Any]:
        """(trainer, state) of another finished run in `workdir`, on this trainer's mesh (of
        its replica 0 when it trained several)."""
        config = load_run_config(workdir)
        trainer, state = restore(config, workdir, best=checkpoint == "best", mesh=self.mesh)
        return trainer, trainer.replica(state, 0)


def combine_pictures(pictures: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The evaluation pictures stacked into one (what the loop logs)."""
    if not pictures:
        return None
    if len(pictures) == 1:
        return next(iter(pictures.values()))
    return visualize.grid(list(pictures.values()), cols=1, uneven=True)


def run(config: Any, workdir: str | Path) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns final metrics.

    Nothing is written before the config (`schema`), the batch sizes, the work directory
    (`check_workdir`) and the data have been checked and the state initialised or restored."""
    parallel.initialize_distributed()
    workdir = Path(workdir).resolve()
    trainer = Trainer(config)
    task, mesh = trainer.task, trainer.mesh
    gb = int(config.batch_size)
    parallel.check_batch_size(gb, mesh)
    parallel.check_batch_size(trainer.eval_batch_size, mesh, "eval_batch_size")
    check_workdir(config, workdir)
    data = task.load_data()
    state = trainer.init_state(data.batch_spec(gb))
    n_params = trainer.num_params(state)

    ckpt = Checkpointer(
        workdir,
        max_to_keep=int(config.keep_checkpoints),
        best_metric=config.get("best_metric") or None,
        best_mode=config.get("best_mode", "max"),
    )
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state)
    write_run_config(config, workdir)  # only now: a refused or failed restore changes nothing
    write_example_spec(workdir, data.example_spec)
    start = trainer.step_of(state)
    num_steps = int(config.num_steps)
    writer = MetricWriter(
        workdir, tensorboard=bool(config.get("tensorboard", True)), start_step=start
    )
    if jax.process_index() == 0:
        print(
            f"medjax: task={config.task} devices={mesh.devices.size} "
            f"processes={jax.process_count()} params={n_params:,} "
            f"{f'replicas={trainer.replicas} ' if trainer.replicas > 1 else ''}"
            f"train={data.num_train} "
            f"eval={data.num_eval} "
            f"{'resuming at step ' + str(start) if start else 'from scratch'} -> {num_steps}",
            flush=True,
        )
    num_pictures = int(config.get("num_pictures", 4))

    def do_eval(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        ev = trainer.evaluate(state, data.eval, num_pictures=num_pictures)
        summary = {k: float(v) for k, v in ev.summary.items()}
        summary["eval_seconds"] = time.perf_counter() - t0
        writer.scalars(step, summary, split="eval")
        picture = combine_pictures(ev.pictures)
        if picture is not None:
            writer.image(step, task.picture_name, picture)
        ckpt.save_best(step, state, summary)
        if jax.process_index() == 0:
            shown = {k: v for k, v in summary.items() if show_in_summary(k)}
            print(
                f"eval @ {step}: " + " ".join(f"{k} {v:.4f}" for k, v in shown.items()),
                flush=True,
            )
        return summary

    # A picture from the task every `sample_every` steps (GAN sample grids), besides evaluation.
    sample_every = int(config.get("sample_every") or 0)
    progress = Progress(num_steps, start=start, every=int(config.log_every))
    summary_keys = task.summary_keys

    def show_in_summary(k: str) -> bool:
        k = k.removesuffix("_sd")  # replicas: the spread of a shown metric is shown too
        if summary_keys is not None:
            return k in summary_keys
        return k.endswith("_mean") or k == "accuracy"

    log_every, eval_every = int(config.log_every), int(config.eval_every)
    ckpt_every = int(config.checkpoint_every)
    skip = str(config.get("nonfinite") or "stop") == "skip"

    def average(values: list[np.ndarray]) -> float:
        """The mean of a window of step metrics; skipped steps' NaN losses are left out."""
        v = np.asarray(values, np.float64)
        if skip:
            v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else float("nan")

    def check_finite(step: int, m: Mapping[str, Any]) -> None:
        """Stops at the first step with a NaN/Inf loss term (unless skipped steps are kept out
        of the state, `nonfinite="skip"`): before any checkpoint of it is written."""
        bad = [] if skip else nonfinite_terms(m)
        if bad:
            raise FloatingPointError(
                f"step {step}: non-finite {', '.join(bad)}; training stopped and the last good "
                f"checkpoint in {workdir / 'checkpoints'} is kept (lower the learning rate, or "
                "set config.nonfinite='skip' to drop such steps)"
            )

    # The evaluation a resumed run owes: the restored step was due one (the previous process
    # may have died before or while writing it, or its best/ checkpoint).
    summary: dict[str, float] = {}
    if start and (start % eval_every == 0 or start >= num_steps):
        summary = do_eval(start)
    train_seconds = writer.resumed.get("train_seconds", 0.0)
    window: list[tuple[int, dict[str, jax.Array]]] = []
    it = trainer.train_batches(data, start_step=start, num_steps=num_steps - start)
    # The iterators hold this process's data shards; the full training set goes (the
    # evaluation set stays in `data.eval`).
    data.make_train_iter = None
    t_last = time.perf_counter()
    stop = StopSignal()
    preempted = False
    # XLA:CPU allocates a step's temporaries when the step is dispatched, so a step queued
    # behind the running one holds a second set (2591 MiB more for CycleGAN 256^2 at batch 1):
    # on the CPU a step is dispatched only after the previous one finished and the next batch
    # was fetched, and `HeapGuard` bounds the host memory the process keeps. Accelerators
    # allocate in stream order and keep one step in flight, and so do runs of many processes,
    # whose hosts agree on a preemption step through JAX's sync point (a two-process CPU run
    # with the wait once hung at shutdown in the test suite; not understood, so not changed).
    one_at_a_time = trainer.steps_one_at_a_time
    heap_guard, previous = platform.HeapGuard(), None
    try:
        for step in range(start + 1, num_steps + 1):
            if one_at_a_time and previous is not None:
                jax.block_until_ready(previous)
                heap_guard()
            batch = next(it)
            state, m = trainer.train_step(state, batch)
            window.append((step, m))
            previous = m
            # Bound the steps in flight: dispatch is asynchronous, and without this wait the
            # host can queue up to `log_every` steps ahead of the device, so a SIGTERM would
            # first wait for all of them (and timings would be wrong). The finished step's
            # losses are checked every step.
            if len(window) > 1:
                check_finite(*window[-2])
            save_now = step % ckpt_every == 0 or step == num_steps
            if step % log_every == 0 or save_now or step % eval_every == 0:
                check_finite(*window[-1])
                ms = [x for _, x in window]
                host = jax.tree.map(lambda *xs: average([to_host(x) for x in xs]), *ms)
                if skip:
                    host["nonfinite"] = float(sum(np.sum(to_host(x["nonfinite"])) for x in ms))
                window.clear()
                now = time.perf_counter()
                train_seconds += now - t_last
                writer.scalars(step, {**host, "train_seconds": train_seconds}, split="train")
                shown = {k: host[k] for k in task.progress_keys}
                if skip and host["nonfinite"]:
                    shown["skipped"] = host["nonfinite"]
                progress.update(step, shown, force=True)
                t_last = time.perf_counter()
            if sample_every and step % sample_every == 0:
                writer.image(
                    step, "samples", task.training_picture(trainer, trainer.replica(state, 0))
                )
                t_last = time.perf_counter()
            if save_now:  # before the evaluation: an error there loses no training
                ckpt.save(step, state, force=True)
            if step % eval_every == 0 or step == num_steps:
                summary = do_eval(step)
                t_last = time.perf_counter()
            preempted = stop.stop_now(ckpt, step)
            if preempted and not save_now:
                for done in window:
                    check_finite(*done)
                ckpt.save(step, state, force=True)
            if preempted:
                print(f"stopped by SIGTERM/preemption at step {step}; checkpoint saved", flush=True)
                break
        if not summary and not preempted:
            summary = do_eval(trainer.step_of(state))
    finally:
        stop.close()
        # On any exit, finish the saves already started: a crash loses unsaved steps, never a
        # checkpoint that was being written.
        try:
            ckpt.close()
        finally:
            writer.close()
    final = {
        **summary,
        "step": trainer.step_of(state),
        "train_seconds": train_seconds,
        "params": n_params,
    }
    if jax.process_index() == 0:
        write_json(workdir / "final_metrics.json", final)
    return final


def restore(
    config: Any,
    workdir: str | Path,
    *,
    best: bool = True,
    trainer: Trainer | None = None,
    mesh: Any = None,
) -> tuple[Trainer, Any]:
    """(trainer, state) restored from `workdir`'s best checkpoint (or latest when `best=False`,
    or when no best one was kept), for evaluation, prediction and sampling.

    The state's shapes come from the run's `example_spec.json`; runs older than that file load
    their training data once to find them."""
    trainer = trainer or Trainer(config, mesh=mesh)
    spec = read_example_spec(Path(workdir))
    if spec is None:
        spec = trainer.task.load_data().example_spec
    state = trainer.init_state(task_lib.batch_spec(spec, int(config.batch_size)))
    ckpt = Checkpointer(workdir, best_metric=config.get("best_metric") or None, read_only=True)
    use_best = best and ckpt.best_step() is not None
    state = ckpt.restore(state, best=use_best)
    ckpt.close()
    return trainer, state
