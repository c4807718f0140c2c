"""tf.data pipelines (medjax.data.pipeline) and the mesh helpers they use (medjax.parallel).

References are written out here from the documented contract -- epoch `e` visits
`default_rng([seed, e]).permutation(N)` and step `s` takes the next `global_batch_size` of that
stream -- and from plain numpy, never from the pipeline's own earlier output.
"""

from __future__ import annotations

import itertools
import types

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from medjax import parallel
from medjax.data import pipeline


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(1)


def _fake_mesh(num_devices: int):
    """Stands in for a mesh of `num_devices` devices (only `devices.size` is read by the checks)."""
    return types.SimpleNamespace(devices=np.empty(num_devices, dtype=object))


def _reference_stream(n: int, seed: int, num_epochs: int) -> np.ndarray:
    """The documented visiting order, epoch after epoch."""
    return np.concatenate(
        [np.random.default_rng([seed, e]).permutation(n) for e in range(num_epochs)]
    )


def _dataset(n: int) -> dict[str, np.ndarray]:
    """Row i is recognisable in every array: x = i, image filled with i / 2, label = 3 i."""
    x = np.arange(n, dtype=np.int32)
    return {
        "x": x,
        "image": np.broadcast_to((x / 2).astype(np.float32)[:, None, None], (n, 2, 3)).copy(),
        "label": (3 * x).astype(np.int32),
    }


# ---------------------------------------------------------------------------------------------
# step_indices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 4, 5, 10, 13, 25])
def test_every_epoch_visits_every_example_once(batch):
    n, seed, epochs = 10, 7, 4
    steps = -(-epochs * n // batch)
    stream = np.concatenate(
        [
            pipeline.step_indices(s, num_examples=n, global_batch_size=batch, seed=seed)
            for s in range(steps)
        ]
    )
    assert stream.dtype == np.int64
    assert len(stream) == steps * batch
    for e in range(epochs):
        assert sorted(stream[e * n : (e + 1) * n].tolist()) == list(range(n)), f"epoch {e}"
    np.testing.assert_array_equal(stream, _reference_stream(n, seed, epochs + 3)[: len(stream)])


def test_batch_straddling_epochs_is_end_of_one_and_start_of_next():
    n, seed = 10, 3
    perm0 = np.random.default_rng([seed, 0]).permutation(n)
    perm1 = np.random.default_rng([seed, 1]).permutation(n)
    # Batch size 4: step 2 covers stream positions 8..11 = perm0[8:10] then perm1[0:2].
    got = pipeline.step_indices(2, num_examples=n, global_batch_size=4, seed=seed)
    np.testing.assert_array_equal(got, np.concatenate([perm0[8:], perm1[:2]]))


def test_step_indices_is_a_pure_function_of_seed_and_step():
    kw = dict(num_examples=17, global_batch_size=6)
    a = pipeline.step_indices(11, seed=5, **kw)
    # Computing other steps in between changes nothing.
    for s in (0, 3, 100):
        pipeline.step_indices(s, seed=5, **kw)
    np.testing.assert_array_equal(pipeline.step_indices(11, seed=5, **kw), a)
    assert not np.array_equal(pipeline.step_indices(11, seed=6, **kw), a)
    # Epochs are reshuffled: epoch 0 and epoch 1 differ.
    e0 = pipeline.step_indices(0, num_examples=50, global_batch_size=50, seed=0)
    e1 = pipeline.step_indices(1, num_examples=50, global_batch_size=50, seed=0)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) and not np.array_equal(e0, e1)


def test_step_indices_batch_larger_than_dataset():
    # Batch 7 of a 3-example set spans 3 epochs in a single step; each epoch is complete.
    got = pipeline.step_indices(0, num_examples=3, global_batch_size=7, seed=1)
    np.testing.assert_array_equal(got, _reference_stream(3, 1, 3)[:7])
    assert sorted(got[:3].tolist()) == [0, 1, 2] and sorted(got[3:6].tolist()) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# make_train_iter
# ---------------------------------------------------------------------------------------------


def test_train_iter_batches_follow_the_documented_order(mesh):
    n, batch, seed, steps = 10, 4, 2, 8
    data = _dataset(n)
    batches = list(
        pipeline.make_train_iter(
            data, global_batch_size=batch, mesh=mesh, seed=seed, num_steps=steps
        )
    )
    assert len(batches) == steps
    ref = _reference_stream(n, seed, 4)
    for s, b in enumerate(batches):
        assert set(b) == {"x", "image", "label"}
        want = ref[s * batch : (s + 1) * batch]
        np.testing.assert_array_equal(np.asarray(b["x"]), want)
        # Every array is gathered with the same rows, and dtypes/shapes survive tf.data.
        assert b["image"].shape == (batch, 2, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["x"].dtype == np.int32
        np.testing.assert_array_equal(np.asarray(b["image"]), data["image"][want])
        np.testing.assert_array_equal(np.asarray(b["label"]), 3 * want)
    # 8 steps x 4 = 32 rows: the first three epochs are each complete.
    seen = np.concatenate([np.asarray(b["x"]) for b in batches])
    for e in range(3):
        assert sorted(seen[e * n : (e + 1) * n].tolist()) == list(range(n))


@pytest.mark.parametrize("batch", [3, 5])
def test_train_iter_resume_matches_uninterrupted_run(mesh, batch):
    data = _dataset(10)
    full = [
        np.asarray(b["x"])
        for b in pipeline.make_train_iter(
            data, global_batch_size=batch, mesh=mesh, seed=9, num_steps=9
        )
    ]
    for k in (1, 4, 7):
        resumed = [
            np.asarray(b["x"])
            for b in pipeline.make_train_iter(
                data, global_batch_size=batch, mesh=mesh, seed=9, start_step=k, num_steps=9 - k
            )
        ]
        assert len(resumed) == 9 - k
        for got, want in zip(resumed, full[k:], strict=True):
            np.testing.assert_array_equal(got, want)


def test_train_iter_is_endless_without_num_steps(mesh):
    it = pipeline.make_train_iter(_dataset(3), global_batch_size=2, mesh=mesh, seed=0)
    got = [np.asarray(b["x"]) for b in itertools.islice(it, 12)]  # 8 epochs of 3
    assert len(got) == 12
    np.testing.assert_array_equal(np.concatenate(got), _reference_stream(3, 0, 8))


def test_train_iter_yields_global_arrays_sharded_over_data_axis(mesh):
    b = next(pipeline.make_train_iter(_dataset(6), global_batch_size=4, mesh=mesh, seed=0))
    for v in b.values():
        assert isinstance(v, jax.Array)
        assert isinstance(v.sharding, NamedSharding)
        assert v.sharding.mesh == mesh
        assert v.sharding.spec == P(parallel.BATCH_AXES)
        assert v.sharding == parallel.data_sharding(mesh)
        assert v.shape[0] == 4


# ---------------------------------------------------------------------------------------------
# make_eval_iter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch"), [(7, 3), (6, 3), (2, 5), (1, 1)])
def test_eval_iter_covers_each_example_once(mesh, n, batch):
    data = _dataset(n)
    batches = list(pipeline.make_eval_iter(data, global_batch_size=batch, mesh=mesh))
    assert len(batches) == -(-n // batch) == pipeline.num_eval_batches(n, batch)
    xs = np.concatenate([np.asarray(b["x"]) for b in batches])
    mask = np.concatenate([np.asarray(b[pipeline.MASK_KEY]) for b in batches])
    assert mask.dtype == np.bool_
    assert len(xs) == len(batches) * batch
    # In order, each example exactly once where the mask is True ...
    np.testing.assert_array_equal(xs[mask], np.arange(n))
    # ... the mask is False exactly on the trailing padding, which repeats example 0.
    np.testing.assert_array_equal(mask, np.arange(len(xs)) < n)
    np.testing.assert_array_equal(xs[~mask], np.zeros(len(xs) - n))
    for b in batches:
        rows = np.asarray(b["x"])
        np.testing.assert_array_equal(np.asarray(b["label"]), 3 * rows)
        np.testing.assert_array_equal(np.asarray(b["image"]), data["image"][rows])
        for v in b.values():
            assert isinstance(v, jax.Array) and v.sharding == parallel.data_sharding(mesh)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------


def _first_train(arrays, mesh, batch=2):
    return next(pipeline.make_train_iter(arrays, global_batch_size=batch, mesh=mesh, seed=0))


def _first_eval(arrays, mesh, batch=2):
    return next(pipeline.make_eval_iter(arrays, global_batch_size=batch, mesh=mesh))


@pytest.mark.parametrize("first", [_first_train, _first_eval])
def test_arrays_of_different_lengths_raise(mesh, first):
    bad = {"image": np.zeros((5, 2)), "label": np.zeros(4)}
    with pytest.raises(ValueError, match=r"disagree.*'image': 5.*'label': 4"):
        first(bad, mesh)


@pytest.mark.parametrize("first", [_first_train, _first_eval])
def test_empty_dataset_raises(mesh, first):
    with pytest.raises(ValueError, match="empty"):
        first({"image": np.zeros((0, 2)), "label": np.zeros(0)}, mesh)
    with pytest.raises(ValueError, match="no arrays"):
        first({}, mesh)


def test_batch_size_not_divisible_by_devices_raises():
    data = _dataset(8)
    with pytest.raises(ValueError, match=r"config\.batch_size=5 .*multiple of the 2 devices"):
        _first_train(data, _fake_mesh(2), batch=5)
    with pytest.raises(ValueError, match=r"config\.eval_batch_size=4 .*multiple of the 3 devices"):
        _first_eval(data, _fake_mesh(3), batch=4)


# ---------------------------------------------------------------------------------------------
# parallel
# ---------------------------------------------------------------------------------------------


def test_make_mesh():
    m = parallel.make_mesh(1)
    assert m.axis_names == (parallel.DATA_AXIS, parallel.FSDP_AXIS)
    assert dict(m.shape) == {"data": 1, "fsdp": 1}
    assert m.devices.size == 1 and m.devices.flat[0] == jax.devices()[0]
    assert parallel.make_mesh().devices.size == len(jax.devices())
    assert parallel.make_mesh(0).devices.size == len(jax.devices())
    too_many = len(jax.devices()) + 1
    with pytest.raises(ValueError, match=f"asks for {too_many} devices"):
        parallel.make_mesh(too_many)


def test_shardings_and_check_batch_size(mesh):
    assert parallel.replicated(mesh).spec == P()
    assert parallel.data_sharding(mesh).spec == P(parallel.BATCH_AXES)
    assert parallel.data_sharding(mesh, 1).spec == P(None, parallel.BATCH_AXES)
    assert parallel.check_batch_size(6, mesh) == 6 // jax.process_count()
    assert parallel.check_batch_size(8, _fake_mesh(4)) == 8 // jax.process_count()
    with pytest.raises(ValueError, match=r"config\.batch_size=6 .*4 devices"):
        parallel.check_batch_size(6, _fake_mesh(4))
    assert parallel.process_slice(6) == slice(0, 6)  # one process feeds every row
    state = {"w": np.zeros((2, 2)), "step": np.int32(0)}
    shardings = parallel.state_sharding(state, mesh)
    assert shardings["w"] == parallel.replicated(mesh) == shardings["step"]


def test_global_batch(mesh):
    local = {"a": np.arange(12, dtype=np.float32).reshape(4, 3), "m": np.array([1, 0, 1, 1], bool)}
    out = parallel.global_batch(local, mesh)
    for k, v in local.items():
        assert isinstance(out[k], jax.Array)
        assert out[k].sharding == parallel.data_sharding(mesh)
        assert out[k].dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(out[k]), v)


def test_weighted_indices_follow_the_probabilities_and_are_pure():
    p = np.array([0.1, 0.6, 0.3])
    draws = np.concatenate(
        [pipeline.weighted_indices(s, p, global_batch_size=1000, seed=3) for s in range(20)]
    )
    freq = np.bincount(draws, minlength=3) / draws.size
    # 20000 draws: every frequency within 4 binomial standard errors of its probability
    np.testing.assert_array_less(np.abs(freq - p), 4 * np.sqrt(p * (1 - p) / draws.size))
    a = pipeline.weighted_indices(7, p, global_batch_size=16, seed=3)
    np.testing.assert_array_equal(a, pipeline.weighted_indices(7, p, global_batch_size=16, seed=3))
    assert not np.array_equal(a, pipeline.weighted_indices(8, p, global_batch_size=16, seed=3))


def test_class_balanced_batches_of_the_conditional_gan():
    from medjax.configs import conditional_gan_medmnist
    from medjax.train import loop

    cfg = conditional_gan_medmnist.get_config("smoke")
    try:
        data = loop.get_task(cfg).load_data()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    mesh = parallel.make_mesh(1)
    it = data.make_train_iter(global_batch_size=64, mesh=mesh, seed=0, num_steps=20)
    labels = np.concatenate([np.asarray(b["label"]) for b in it])
    # PneumoniaMNIST's training split is 10 % normal (class 0); balanced draws give about half
    assert abs(labels.mean() - 0.5) < 4 * np.sqrt(0.25 / labels.size)


# data shards (many processes)
# ---------------------------------------------------------------------------------------------


def _first_batches(arrays, monkeypatch, *, processes, index, num_shards, steps=3, **kw):
    """This process's host rows of the first `steps` batches, as process `index` of
    `processes` (faked: `global_batch` then returns the host rows unchanged)."""
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(parallel, "global_batch", lambda local, mesh: local)
    it = pipeline.make_train_iter(
        arrays, global_batch_size=4, mesh=parallel.make_mesh(1), seed=5,
        num_shards=num_shards, num_steps=steps, **kw,
    )  # fmt: skip
    return [b["x"] for b in it]


def test_data_shards_are_disjoint_and_compose_the_one_process_batches(monkeypatch):
    data = _dataset(10)
    one = _first_batches(data, monkeypatch, processes=1, index=0, num_shards=2)
    hosts = [_first_batches(data, monkeypatch, processes=2, index=p, num_shards=0) for p in (0, 1)]
    for step, batch in enumerate(one):
        # rows [0, 2) from shard 0 (even examples), [2, 4) from shard 1, each its own order
        for k in (0, 1):
            order = pipeline.step_indices(
                step, num_examples=5, global_batch_size=2, seed=pipeline.shard_seed(5, k, 2)
            )
            np.testing.assert_array_equal(batch[2 * k : 2 * k + 2], 2 * order + k)
            np.testing.assert_array_equal(hosts[k][step], batch[2 * k : 2 * k + 2])
    seen = [set(np.concatenate(h).tolist()) for h in hosts]
    assert seen[0] <= set(range(0, 10, 2)) and seen[1] <= set(range(1, 10, 2))


def test_data_shards_must_fit_processes_and_batch(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"data.shards=3 .*multiple of the 2 processes"):
        pipeline.data_shards(3, 12)
    with pytest.raises(ValueError, match=r"batch_size=6 .*multiple of the 4 data shards"):
        pipeline.data_shards(4, 6)
    assert pipeline.data_shards(0, 4) == (2, range(0, 1))


# multi-process launch
# ---------------------------------------------------------------------------------------------

_CLUSTER_VARS = (
    "MEDJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "MEDJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES",
    "MEDJAX_PROCESS_ID", "JAX_PROCESS_ID", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
    "JOB_COMPLETION_INDEX", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)  # fmt: skip


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, None),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
         {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
        ({"MEDJAX_COORDINATOR": "h:2", "MEDJAX_NUM_PROCESSES": "4", "MEDJAX_PROCESS_ID": "3"},
         {"coordinator_address": "h:2", "num_processes": 4, "process_id": 3}),
        ({"MASTER_ADDR": "m", "MASTER_PORT": "9", "WORLD_SIZE": "2", "RANK": "0"},
         {"coordinator_address": "m:9", "num_processes": 2, "process_id": 0}),
        ({"SLURM_NTASKS": "1"}, None),
        ({"SLURM_NTASKS": "4"}, {}),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, {}),
    ],
)  # fmt: skip
def test_cluster_from_env(monkeypatch, env, want):
    for k in _CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert parallel.cluster_from_env() == want


def test_half_described_clusters_are_refused(monkeypatch):
    for k in _CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MEDJAX_COORDINATOR", "h:1")
    with pytest.raises(ValueError, match="MEDJAX_NUM_PROCESSES and MEDJAX_PROCESS_ID"):
        parallel.cluster_from_env()
    with pytest.raises(ValueError, match="all three of --coordinator"):
        parallel.initialize_distributed("h:1", None, 0)
    with pytest.raises(ValueError, match=r"process id 2 is not in \[0, 2\)"):
        parallel.initialize_distributed("h:1", 2, 2)
    assert parallel.initialize_distributed("h:1", 1, 0) is False  # one process: nothing to join


def test_fsdp_spec_splits_large_arrays_on_a_divisible_axis():
    assert parallel.fsdp_spec((3, 3, 64, 128), 1) == P()
    assert parallel.fsdp_spec((3, 3, 64, 128), 2) == P(None, None, None, "fsdp")
    assert parallel.fsdp_spec((3, 3, 64, 130), 4) == P(None, None, "fsdp")
    assert parallel.fsdp_spec((128,), 2) == P()  # small: replicated
    assert parallel.fsdp_spec((4, 3, 3, 64, 128), 2, skip=1) == P(None, None, None, None, "fsdp")
    assert parallel.fsdp_spec((3, 3, 63, 129), 2) == P()  # nothing divisible
