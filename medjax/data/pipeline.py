"""tf.data input pipelines that yield global, mesh-sharded `jax.Array` batches.

Training order is a pure function of `(seed, step)`: epoch `e` visits the examples in
`default_rng([seed, e]).permutation(N)`, and step `s` takes the next `global_batch_size` of that
stream. A resumed run therefore sees exactly the batches an uninterrupted run would, and every
process computes the same global batch and feeds its own rows of it.

Data shards (`num_shards` K, default one per process): example `i` belongs to shard `i % K`,
and rows `[k * B / K, (k + 1) * B / K)` of every global batch come from shard `k` alone, in its
own seeded order (`shard_seed`). A process holds and reads only the shards it feeds (K is a
multiple of the process count), and a one-process run with the same K sees the very same global
batches, so a 2-host run can be checked against a 1-host one. K = 1 is the plain order above.

Evaluation visits every example once; the last batch is padded and carries a boolean `_mask`
(False on padding), so every host runs the same number of steps and nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from medjax import parallel

MASK_KEY = "_mask"


def num_examples(arrays: Mapping[str, np.ndarray]) -> int:
    """The common number of rows of `arrays`; ValueError when they disagree or are empty."""
    if not arrays:
        raise ValueError("the dataset has no arrays")
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"dataset arrays disagree on the number of examples: {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError("the dataset is empty")
    return n


def data_shards(num_shards: int, global_batch_size: int) -> tuple[int, range]:
    """(K, the shards this process feeds) for `config.data.shards = num_shards` (0: one shard per
    process). K must be a multiple of the process count and divide the global batch."""
    procs = jax.process_count()
    k = int(num_shards or procs)
    if k < 1 or k % procs:
        raise ValueError(
            f"config.data.shards={num_shards} must be 0 (one per process) or a positive multiple "
            f"of the {procs} processes"
        )
    if int(global_batch_size) % k:
        raise ValueError(
            f"config.batch_size={global_batch_size} must be a multiple of the {k} data shards "
            "(config.data.shards)"
        )
    per = k // procs
    start = jax.process_index() * per
    return k, range(start, start + per)


def shard_parts(
    num_shards: int, global_batch_size: int
) -> tuple[int, list[tuple[int, int, slice]]]:
    """(K, the parts of every global batch this process feeds): `(shard, rows drawn from that
    shard per step, which of those rows this process feeds)`. One shard: all `B` rows, this
    process's `process_slice`; K shards: `B / K` rows of each owned shard, all of them. Either
    way a process feeds `B / process_count` rows, its parts concatenated (`concat_parts`)."""
    k, owned = data_shards(num_shards, global_batch_size)
    if k == 1:
        return 1, [(0, int(global_batch_size), parallel.process_slice(global_batch_size))]
    return k, [(s, int(global_batch_size) // k, slice(None)) for s in owned]


def concat_parts(outs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """This process's rows of one batch from its parts, in shard order."""
    if len(outs) == 1:
        return outs[0]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def shard_seed(seed: int, shard: int, num_shards: int) -> int:
    """The data-order seed of shard `shard` of `num_shards` (the run's own seed when K = 1)."""
    if int(num_shards) == 1:
        return int(seed)
    return int(
        np.random.SeedSequence([int(seed), int(num_shards), int(shard)]).generate_state(1)[0]
    )


def step_indices(
    step: int, *, num_examples: int, global_batch_size: int, seed: int, stream: int | None = None
) -> np.ndarray:
    """Example indices of global batch `step` (an int64 array of length `global_batch_size`).

    `stream` gives an independent order over the same seed (`default_rng([seed, stream,
    epoch])`), e.g. for the second image domain of unpaired data."""
    start = int(step) * global_batch_size
    out = np.empty(global_batch_size, np.int64)
    filled = 0
    while filled < global_batch_size:
        epoch, offset = divmod(start + filled, num_examples)
        key = [seed, epoch] if stream is None else [seed, stream, epoch]
        perm = np.random.default_rng(key).permutation(num_examples)
        take = min(global_batch_size - filled, num_examples - offset)
        out[filled : filled + take] = perm[offset : offset + take]
        filled += take
    return out


def weighted_indices(
    step: int, probabilities: np.ndarray, *, global_batch_size: int, seed: int
) -> np.ndarray:
    """Example indices of global batch `step`, drawn with replacement with the given
    `probabilities` by `default_rng([seed, step])` (a pure function of (seed, step))."""
    rng = np.random.default_rng([int(seed), int(step)])
    return rng.choice(len(probabilities), size=int(global_batch_size), p=probabilities)


def iterate_steps(
    host_batch: Callable[[int], Mapping[str, np.ndarray]],
    spec: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    *,
    mesh: Mesh,
    start_step: int = 0,
    num_steps: int | None = None,
    prefetch: int = 2,
    num_workers: int | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """The one tf.data loop behind every training iterator: `host_batch(step)` (this process's
    rows of global batch `step`, shapes and dtypes as in `spec`) runs on `num_workers` tf.data
    threads (AUTOTUNE when None) in step order, is prefetched, and becomes global `jax.Array`s
    sharded over the mesh's data axis. Endless when `num_steps` is None."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    keys = list(spec)
    dtypes = tuple(tf.as_dtype(spec[k][1]) for k in keys)

    def host(step: np.int64) -> tuple[np.ndarray, ...]:
        out = host_batch(int(step))
        return tuple(np.asarray(out[k], spec[k][1]) for k in keys)

    def to_dict(*tensors: Any) -> dict[str, Any]:
        for k, t in zip(keys, tensors, strict=True):
            t.set_shape(spec[k][0])
        return dict(zip(keys, tensors, strict=True))

    stop = np.iinfo(np.int64).max if num_steps is None else int(start_step) + int(num_steps)
    ds = tf.data.Dataset.range(int(start_step), stop)
    ds = ds.map(
        lambda s: tf.numpy_function(host, [s], dtypes, stateful=False),
        num_parallel_calls=tf.data.AUTOTUNE if num_workers is None else int(num_workers),
        deterministic=True,
    )
    ds = ds.map(to_dict).prefetch(prefetch)
    for local in ds.as_numpy_iterator():
        yield parallel.global_batch(local, mesh)


def make_train_iter(
    arrays: Mapping[str, np.ndarray],
    *,
    global_batch_size: int,
    mesh: Mesh,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    prefetch: int = 2,
    independent: bool = False,
    sample_weights: np.ndarray | None = None,
    num_shards: int = 0,
    shard_ids: np.ndarray | Mapping[str, np.ndarray] | None = None,
) -> Iterator[dict[str, jax.Array]]:
    """Yields the global batches for steps `start_step, start_step + 1, ...` (endless if None).

    Args:
      arrays: in-memory dataset, `{name: [N, ...]}` with equal N.
      global_batch_size: rows per step summed over all devices and processes.
      mesh: batches are sharded over its devices.
      seed: data-order seed.
      independent: every key is its own dataset (any length), drawn in its own seeded order
        (`step_indices(..., stream=i)`): the two domains of unpaired data.
      sample_weights: `[N]` non-negative weights: each row of batch `step` is drawn with
        replacement with probability proportional to its weight (`weighted_indices`), e.g.
        inverse class frequencies for class-balanced batches; None: epochs of permutations.
      num_shards: data shards K (`data_shards`; 0: one per process). This process keeps only
        the rows of its own shards; with weights, each shard draws by its own normalised ones.
      shard_ids: the data shard of every row (per key when `independent`), when `arrays` hold
        only this process's shards (`medjax.train.task.owned_examples`); None: row `i` of the
        full set is in shard `i % K`.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    if independent:
        for k, v in arrays.items():
            if not len(v):
                raise ValueError(f"the dataset array {k!r} is empty")
    else:
        num_examples(arrays)
    local = parallel.check_batch_size(global_batch_size, mesh)
    n_shards, parts = shard_parts(num_shards, global_batch_size)
    if sample_weights is not None:
        w = np.asarray(sample_weights, np.float64).reshape(-1)
        n = num_examples(arrays)
        if w.size != n or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"sample_weights must be {n} finite non-negative numbers, not all 0")

    def sampler(part: dict[str, np.ndarray], weights: np.ndarray | None, seed: int, batch: int):
        """(step, rows) -> those rows of batch `step` drawn from `part` alone."""
        if weights is not None:
            if weights.sum() <= 0:
                raise ValueError("a data shard has only zero sample weights")
            weights = weights / weights.sum()
        for k, v in part.items():
            if not len(v):
                raise ValueError(
                    f"data shard of {k!r} is empty: {n_shards} shards need at least as many "
                    "examples (lower config.data.shards)"
                )

        def rows_of(step: int, rows: slice) -> dict[str, np.ndarray]:
            if weights is not None:
                idx = weighted_indices(step, weights, global_batch_size=batch, seed=seed)
                return {k: v[idx[rows]] for k, v in part.items()}
            out = {}
            for i, (k, v) in enumerate(part.items()):
                idx = step_indices(
                    step,
                    num_examples=len(v),
                    global_batch_size=batch,
                    seed=seed,
                    stream=i if independent else None,
                )
                out[k] = v[idx[rows]]
            return out

        return rows_of

    def of_shard(v: np.ndarray, shard: int, key: str | None = None) -> np.ndarray:
        # copies: the other shards' rows are not kept alive by views
        if n_shards == 1:
            return v
        if shard_ids is None:
            return np.ascontiguousarray(v[shard::n_shards])
        ids = np.asarray(shard_ids[key] if isinstance(shard_ids, Mapping) else shard_ids)
        if ids.shape != (len(v),):
            raise ValueError(f"shard_ids has shape {ids.shape} for {len(v)} rows of {key!r}")
        return np.ascontiguousarray(v[ids == shard])

    trailing = {k: (v.shape[1:], v.dtype) for k, v in arrays.items()}
    samplers = [
        (
            sampler(
                {k: of_shard(v, shard, k) for k, v in arrays.items()},
                None if sample_weights is None else of_shard(w, shard),
                shard_seed(seed, shard, n_shards),
                batch,
            ),
            rows,
        )
        for shard, batch, rows in parts
    ]
    del arrays  # the other shards are not this process's

    def host_batch(step: int) -> dict[str, np.ndarray]:
        return concat_parts([rows_of(step, rows) for rows_of, rows in samplers])

    spec = {k: ((local, *shape), dtype) for k, (shape, dtype) in trailing.items()}
    return iterate_steps(
        host_batch, spec, mesh=mesh, start_step=start_step, num_steps=num_steps, prefetch=prefetch
    )


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    return -(-num_examples // global_batch_size)


def make_eval_iter(
    arrays: Mapping[str, np.ndarray], *, global_batch_size: int, mesh: Mesh
) -> Iterator[dict[str, jax.Array]]:
    """Yields every example once, in order; the last batch is padded (rows repeat example 0)
    and `batch["_mask"]` is False on the padding."""
    n = num_examples(arrays)
    parallel.check_batch_size(global_batch_size, mesh, "eval_batch_size")
    rows = parallel.process_slice(global_batch_size)
    for b in range(num_eval_batches(n, global_batch_size)):
        idx = np.arange(b * global_batch_size, (b + 1) * global_batch_size)
        valid = idx < n
        idx = np.where(valid, idx, 0)[rows]
        local = {k: np.asarray(v)[idx] for k, v in arrays.items()}
        local[MASK_KEY] = valid[rows]
        yield parallel.global_batch(local, mesh)
