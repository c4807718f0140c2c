"""Orbax checkpoints (medjax.train.checkpoint): round trips, keep-N, best-by-metric, interruptions.

Expected contents are the states the tests themselves built and the folders on disk, listed here
with pathlib; nothing is compared against the checkpointer's own earlier output.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.train.checkpoint import Checkpointer, abstract_like


def _state(i: int) -> dict:
    """A small train-state-like pytree whose every leaf depends on `i`."""
    return {
        "params": {
            "w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) * 0.1 + i,
            "b": jnp.array([1, -2, 2**30], jnp.int32) + i,
        },
        "step": jnp.asarray(i, jnp.int32),
        "key": jax.random.key_data(jax.random.key(i)),  # uint32 [2]
        "mu": jnp.full((3,), 1e-7 * (i + 1), jnp.float32),
    }


def _target() -> dict:
    return jax.tree.map(jnp.zeros_like, _state(0))


def _assert_state_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert isinstance(g, jax.Array)
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _steps_on_disk(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


@pytest.mark.parametrize("async_save", [True, False])
def test_save_restore_round_trip_is_exact(tmp_path, async_save):
    state = _state(3)
    assert state["key"].dtype == jnp.uint32
    with Checkpointer(tmp_path, async_save=async_save) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(3, state)
        ckpt.wait()
        assert ckpt.latest_step() == 3
        restored = ckpt.restore(_target())
    _assert_state_equal(restored, state)
    # The key data still makes the same random numbers.
    key = jax.random.wrap_key_data(restored["key"])
    np.testing.assert_array_equal(
        np.asarray(jax.random.uniform(key, (4,))),
        np.asarray(jax.random.uniform(jax.random.key(3), (4,))),
    )
    # A fresh Checkpointer on the same folder (a resumed run) reads it, also onto an abstract
    # target.
    with Checkpointer(tmp_path, read_only=True) as again:
        assert again.latest_step() == 3
        _assert_state_equal(again.restore(abstract_like(_target())), state)


def test_keep_n_deletes_older_steps(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=2, async_save=False) as ckpt:
        for step in (10, 20, 30):
            assert ckpt.save(step, _state(step))
        ckpt.wait()
        assert ckpt.all_steps() == [20, 30]
        assert ckpt.latest_step() == 30
        _assert_state_equal(ckpt.restore(_target(), step=20), _state(20))
        _assert_state_equal(ckpt.restore(_target()), _state(30))
        # Saving a step that already exists is a no-op.
        assert ckpt.save(30, _state(99)) is False
    assert _steps_on_disk(tmp_path / "checkpoints") == [20, 30]
    assert not (tmp_path / "best").exists()  # no best_metric: no best/ folder


def test_best_keeps_the_max_and_ignores_nan(tmp_path):
    with Checkpointer(tmp_path, best_metric="dice", async_save=False) as ckpt:
        assert ckpt.best_step() is None
        assert ckpt.save_best(1, _state(1), {"dice": 0.5, "loss": 1.0})
        assert ckpt.save_best(2, _state(2), {"dice": 0.7, "loss": 0.9})
        ckpt.save_best(3, _state(3), {"dice": 0.6, "loss": 0.8})
        assert ckpt.save_best(4, _state(4), {"dice": math.nan, "loss": 0.1}) is False
        assert ckpt.save_best(5, _state(5), {"dice": np.float32("nan")}) is False
        ckpt.wait()
        assert ckpt.best_step() == 2
        _assert_state_equal(ckpt.restore(_target(), best=True), _state(2))
        # best/ is separate from the latest-N checkpoints.
        assert ckpt.latest_step() is None
    assert _steps_on_disk(tmp_path / "best") == [2]


def test_best_mode_min(tmp_path):
    with Checkpointer(tmp_path, best_metric="loss", best_mode="min", async_save=False) as ckpt:
        for step, loss in [(1, 0.5), (2, 0.3), (3, 0.4), (4, math.nan)]:
            ckpt.save_best(step, _state(step), {"loss": loss})
        ckpt.wait()
        assert ckpt.best_step() == 2
        _assert_state_equal(ckpt.restore(_target(), best=True), _state(2))
    assert _steps_on_disk(tmp_path / "best") == [2]


def test_unknown_best_metric_raises_key_error(tmp_path):
    with Checkpointer(tmp_path, best_metric="dice_mean", async_save=False) as ckpt:
        with pytest.raises(KeyError, match="dice_mean"):
            ckpt.save_best(1, _state(1), {"dice": 0.5, "loss": 0.1})
        assert ckpt.best_step() is None


def test_bad_best_mode_and_best_without_metric(tmp_path):
    with pytest.raises(ValueError, match="best_mode"):
        Checkpointer(tmp_path, best_metric="dice", best_mode="maximum")
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.save_best(1, _state(1), {"dice": 1.0}) is False
        assert ckpt.best_step() is None
        with pytest.raises(ValueError, match="best_metric"):
            ckpt.restore(_target(), best=True)


def test_restore_without_checkpoints_names_the_folder(tmp_path):
    with Checkpointer(tmp_path, best_metric="dice", async_save=False) as ckpt:
        with pytest.raises(FileNotFoundError) as info:
            ckpt.restore(_target())
        assert str(tmp_path.resolve() / "checkpoints") in str(info.value)
        with pytest.raises(FileNotFoundError) as info:
            ckpt.restore(_target(), best=True)
        assert str(tmp_path.resolve() / "best") in str(info.value)


def test_interrupted_save_is_ignored(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=3, async_save=False) as ckpt:
        ckpt.save(3, _state(3))
        ckpt.save(5, _state(5))
    # A save of step 7 killed half-way leaves a temporary folder with partial contents.
    tmp = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-123"
    (tmp / "default").mkdir(parents=True)
    (tmp / "default" / "junk").write_bytes(b"\x00not a checkpoint\xff")
    (tmp / "_CHECKPOINT_METADATA").write_text("{garbage")

    with Checkpointer(tmp_path, read_only=True) as reader:  # does not touch the folder
        assert reader.latest_step() == 5
        assert reader.all_steps() == [3, 5]
        _assert_state_equal(reader.restore(_target()), _state(5))
    assert tmp.exists()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.latest_step() == 5
        assert 7 not in ckpt.all_steps()
        _assert_state_equal(ckpt.restore(_target()), _state(5))
        # The run goes on and can save step 7 for real.
        assert ckpt.save(7, _state(7))
        ckpt.wait()
        assert ckpt.latest_step() == 7
        _assert_state_equal(ckpt.restore(_target()), _state(7))
        # A writer removes the leftovers (in the background; a save waits for that).
        assert not tmp.exists()
    assert _steps_on_disk(tmp_path / "checkpoints") == [3, 5, 7]
