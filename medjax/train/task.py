"""The task contract: what every medjax experiment type provides, and what it is given.

An experiment type is ONE file, `medjax/train/tasks/<name>.py`, that defines
`class Task(medjax.train.task.Task)`, plus a config that sets `config.task = "<name>"`. Nothing
central lists task names: the loop imports the module by name, and the tests and the benchmark
discover every module in `medjax/train/tasks/`. Train, evaluate, predict, sample, the
benchmarks and the tests all go through the methods below; none of them branches on a task's
name or probes it with `hasattr`.

What a task MUST provide (the template, with the types)::

    class Task(task.Task):
        '''What it is (cite the paper), its defaults, the config keys it reads.'''

        progress_keys = ("loss",)            # shown on the progress line, checked for NaN
        summary_keys = ("dice_mean",)        # printed after each evaluation (None: every *_mean)
        accumulates_gradients = False        # True if train_step honours grad_accum_steps

        def __init__(self, config):          # models, optimizers, losses; no file I/O
            super().__init__(config)

        def load_data(self) -> TaskData:     # the training stream and the validation set,
            ...                              # read through medjax.data (never files directly)

        def load_eval(self, directory, split) -> Any:
            ...                              # the examples of `split` of ANY folder in the
                                             # task's layout (None: the configured data)

        def init(self, key, batch_spec) -> State:          # pure; arrays only
        def train_step(self, state, batch) -> (State, dict[str, scalar])   # pure
        def evaluate(self, runner, state, eval_set, num_pictures) -> Evaluation

What a task MAY provide; the base class raises `TaskCannot` ("task X cannot ...") otherwise:

    predict(state, inputs) -> outputs            pure forward pass (the runner jits it)
    predict_files(runner, state, inputs, out_dir, overwrite) -> list[Path]
                                                 files in (NIfTI, DICOM, image folders), one
                                                 prediction file per case out (predict.py)
    sample(runner, state, num, seed) -> dict[str, np.ndarray]
                                                 generated / translated examples (sample.py)
    training_picture(runner, state) -> RGB uint8 a picture every `config.sample_every` steps
    synthetic_batch(batch_size, seed) -> dict[str, np.ndarray]
                                                 random data shaped like one global batch
                                                 (benchmarks and sharding tests)

Pure functions (`init`, `train_step`, `predict` and whatever else the runner compiles) never
call `jax.jit`, `device_put` or Orbax, never read files and never import the loop, the
evaluator or another task. Host-side methods get a `Runner` (the trainer) that compiles task
methods on the device mesh and maps them over data; see :class:`Runner`.

Scale-out is the runner's business, not the task's: the same pure `init` / `train_step` run on
one device, data-parallel or FSDP meshes, many processes, and vmapped over replicas
(`medjax.train.loop.Trainer`); `evaluate` gets ONE model's state.

State is arrays only (a `flax.struct.dataclass`): params, optimizer states, step and the base
PRNG key (step keys are `fold_in(key, step)`), so Orbax saves one plain pytree and a resumed run
continues the same run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import jax
import numpy as np

from medjax.data.listing import Listing

Batch = dict[str, jax.Array]
T = TypeVar("T")
TrainIterFactory = Callable[..., Iterator[Batch]]


class TaskCannot(NotImplementedError):
    """An optional ability that a task does not have (e.g. sampling from a segmenter)."""


@dataclasses.dataclass
class TaskData:
    """What `Task.load_data` returns: the training stream and the validation set.

    Attributes:
      example_spec: shape and dtype of ONE training example per batch key (no batch axis);
        `batch_spec(b)` adds the global batch axis. `init` gets that batch spec.
      make_train_iter: `(*, global_batch_size, mesh, seed, start_step, num_steps,
        num_shards)` -> an iterator of global, mesh-sharded batches; batch `s` must be a pure
        function of `(seed, s)` so that a resumed run sees the batches an uninterrupted one
        would; `num_shards` data shards (`medjax.data.pipeline.data_shards`) feed their rows.
      eval: the validation set, in whatever form the task's `evaluate` reads.
      num_train, num_eval: example (or case) counts, for the run's first log line.
    """

    example_spec: dict[str, jax.ShapeDtypeStruct]
    make_train_iter: TrainIterFactory
    eval: Any
    num_train: int
    num_eval: int

    def batch_spec(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one global training batch."""
        return batch_spec(self.example_spec, global_batch_size)

    @classmethod
    def from_arrays(
        cls,
        train: Mapping[str, np.ndarray],
        eval: Any,
        *,
        num_eval: int | None = None,
        independent: bool = False,
        sample_weights: np.ndarray | None = None,
        shard_ids: np.ndarray | Mapping[str, np.ndarray] | None = None,
        num_train: int | None = None,
    ) -> TaskData:
        """In-memory training arrays `{key: [N, ...]}` (equal N), batched in a seeded order
        (`medjax.data.pipeline.make_train_iter`); `independent`: every key is its own set,
        drawn in its own order (unpaired domains); `sample_weights`: rows drawn with these
        relative probabilities (e.g. class-balanced).

        On many processes a task reads only the examples of its own data shards
        (`owned_examples`): it passes them with their `shard_ids` (per key when
        `independent`) and the total `num_train`."""
        from medjax.data import pipeline

        arrays = {k: np.asarray(v) for k, v in train.items()}
        n = max(len(v) for v in arrays.values()) if independent else pipeline.num_examples(arrays)
        n = n if num_train is None else int(num_train)
        return cls(
            example_spec={k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in arrays.items()},
            make_train_iter=functools.partial(
                pipeline.make_train_iter,
                arrays,
                independent=independent,
                sample_weights=sample_weights,
                shard_ids=shard_ids,
            ),
            eval=eval,
            num_train=n,
            num_eval=_count(eval) if num_eval is None else num_eval,
        )

    @classmethod
    def from_patches(
        cls,
        volumes: Sequence[Mapping[str, np.ndarray]],
        eval: Any,
        *,
        patch_size: Sequence[int],
        fg_fraction: float,
        image_pad: float = 0.0,
        num_eval: int | None = None,
        shard_ids: Sequence[int] | None = None,
        num_train: int | None = None,
    ) -> TaskData:
        """Patches of in-memory volumes `[{"image": [*spatial, C], "label": [*spatial]}]`, a
        fraction `fg_fraction` centred on labelled voxels (`medjax.data.patches`).

        On many processes a task may read only the cases of its own data shards
        (`owned_cases`): it passes them with their `shard_ids` and the total `num_train`."""
        from medjax.data import patches

        patch = tuple(int(p) for p in patch_size)
        vols = [{"image": v["image"], "label": v["label"]} for v in volumes]
        if not vols:
            raise ValueError("no training volumes")
        channels = int(np.shape(vols[0]["image"])[-1])
        return cls(
            example_spec={
                "image": jax.ShapeDtypeStruct((*patch, channels), np.float32),
                "label": jax.ShapeDtypeStruct(patch, np.int32),
            },
            make_train_iter=functools.partial(
                patches.make_patch_train_iter,
                vols,
                patch_size=patch,
                fg_fraction=float(fg_fraction),
                image_pad=float(image_pad),
                shard_ids=shard_ids,
            ),
            eval=eval,
            num_train=len(vols) if num_train is None else int(num_train),
            num_eval=_count(eval) if num_eval is None else num_eval,
        )


def owned_cases(items: Sequence[Any], config: Any) -> tuple[list[Any], list[int]]:
    """The training items this process reads, and their data shards: item `i` is in shard
    `i % K` (`config.data.shards`, 0: one per process; `medjax.data.pipeline.data_shards`).
    A task whose loading is expensive (volumes) reads only these and passes them to
    `TaskData.from_patches(..., shard_ids=..., num_train=len(items))`."""
    from medjax.data import pipeline

    k, owned = pipeline.data_shards(int(config.data.get("shards") or 0), int(config.batch_size))
    if len(items) < k:
        raise ValueError(
            f"{len(items)} training examples cannot fill {k} data shards (config.data.shards; "
            "0 = one per process): use fewer shards or more data"
        )
    keep = [i for i in range(len(items)) if i % k in owned]
    return [items[i] for i in keep], [i % k for i in keep]


def owned_examples(listing: Listing[T], config: Any) -> tuple[T, np.ndarray, int]:
    """(this process's training examples, read; their data shards; the number listed): only
    the files of this process's shards are read (`owned_cases` of a
    `medjax.data.listing.Listing`). Pass them on as `TaskData.from_arrays(..., shard_ids=...,
    num_train=...)`."""
    keep, shard_ids = owned_cases(range(len(listing)), config)
    return listing.take(keep).read(), np.asarray(shard_ids, np.int64), len(listing)


def batch_spec(
    example_spec: Mapping[str, jax.ShapeDtypeStruct], global_batch_size: int
) -> dict[str, jax.ShapeDtypeStruct]:
    """`example_spec` with a leading global batch axis of `global_batch_size`."""
    return {
        k: jax.ShapeDtypeStruct((int(global_batch_size), *v.shape), v.dtype)
        for k, v in example_spec.items()
    }


def _count(eval_set: Any) -> int:
    if isinstance(eval_set, Mapping):
        first = next(iter(eval_set.values()), ())
        return len(first)
    try:
        return len(eval_set)
    except TypeError:
        return 0


@dataclasses.dataclass
class Evaluation:
    """What `Task.evaluate` returns.

    Attributes:
      summary: scalar metrics over the whole evaluation set (what the loop logs, what
        `best_metric` ranks, what `summary.json` holds).
      rows: one dict per case / example (`"id"` first), written as `metrics.csv`.
      pictures: name -> RGB uint8 image (per-case overlays, a sample grid, ...), written as
        PNGs by evaluate.py; the loop logs them side by side as one picture.
    """

    summary: dict[str, float]
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    pictures: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def computed_once(eval_set: dict[str, Any], key: str, compute: Callable[[], Any]) -> Any:
    """`compute()` stored in the evaluation set under `key` on first use: what does not depend
    on the model (real-vs-real floors, trivial baselines) is computed once per set."""
    if key not in eval_set:
        eval_set[key] = compute()
    return eval_set[key]


class Runner(Protocol):
    """What the trainer offers a task's host-side methods (`medjax.train.loop.Trainer`).

    Tasks receive it as an argument; they never import the loop.
    """

    config: Any
    mesh: Any

    def call(self, method: str, state: Any, *args: Any) -> Any:
        """`task.<method>(state, *args)`, jitted on the mesh (compiled once per method)."""

    def map_batches(
        self, state: Any, data: Any, method: str = "predict", *, batch_size: int | None = None
    ) -> Any:
        """`task.<method>(state, batch)` over every row of `data` (an array `[N, ...]` or a
        dict of them) in padded global batches; host numpy outputs `[N, ...]`."""

    def sliding_window(
        self,
        state: Any,
        volume: np.ndarray,
        *,
        method: str = "predict",
        window: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Gaussian-blended `task.<method>` over windows of one whole `[*spatial, C]` array."""

    def restore_run(self, workdir: str | Path, checkpoint: str = "best") -> tuple[Runner, Any]:
        """(runner, state) of ANOTHER finished run (e.g. the classifier behind FID)."""


class Task:
    """Base class of every experiment type; see the module docstring for the contract."""

    #: metrics shown on the progress line and checked for NaN/inf at every log.
    progress_keys: tuple[str, ...] = ("loss",)
    #: metrics printed after each evaluation; None prints every `*_mean` key.
    summary_keys: tuple[str, ...] | None = None
    #: name of the evaluation picture in TensorBoard and `images/`.
    picture_name: str = "eval_predictions"
    #: whether `train_step` honours `config.grad_accum_steps` (micro-batch accumulation).
    accumulates_gradients: bool = False

    def __init__(self, config: Any):
        self.config = config

    @property
    def name(self) -> str:
        return str(self.config.get("task", type(self).__module__.rsplit(".", 1)[-1]))

    def cannot(self, what: str, hint: str = "") -> TaskCannot:
        """The error for a missing optional ability, naming the task."""
        return TaskCannot(f"task {self.name!r} cannot {what}" + (f" ({hint})" if hint else ""))

    # -- required ------------------------------------------------------------------------------
    def load_data(self) -> TaskData:
        raise NotImplementedError(f"task {self.name!r} must implement load_data()")

    def load_eval(self, directory: str | Path | None, split: str) -> Any:
        raise NotImplementedError(f"task {self.name!r} must implement load_eval()")

    def init(self, key: jax.Array, batch_spec: Mapping[str, jax.ShapeDtypeStruct]) -> Any:
        raise NotImplementedError(f"task {self.name!r} must implement init()")

    def train_step(self, state: Any, batch: Mapping[str, jax.Array]) -> tuple[Any, dict]:
        raise NotImplementedError(f"task {self.name!r} must implement train_step()")

    def evaluate(
        self, runner: Runner, state: Any, eval_set: Any, num_pictures: int = 4
    ) -> Evaluation:
        raise NotImplementedError(f"task {self.name!r} must implement evaluate()")

    # -- optional ------------------------------------------------------------------------------
    def predict(self, state: Any, inputs: Any) -> Any:
        raise self.cannot("predict")

    def predict_files(
        self,
        runner: Runner,
        state: Any,
        inputs: Sequence[str | Path],
        out_dir: str | Path,
        *,
        overwrite: bool = False,
    ) -> list[Path]:
        raise self.cannot("write predictions for files", "predict.py needs a model of inputs")

    def sample(
        self, runner: Runner, state: Any, num: int, seed: int | None = None
    ) -> dict[str, np.ndarray]:
        raise self.cannot("sample", "sample.py needs a generator")

    def training_picture(self, runner: Runner, state: Any) -> np.ndarray:
        raise self.cannot("draw a training picture", "set config.sample_every=0")

    def synthetic_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        raise self.cannot("make a synthetic batch")
