"""Many models in one program (`config.replicas`, here `replica_mode="auto"`: unrolled on the
CPU; the vmapped step of every task is checked in step_script.py): replica i is the run with
seed `seed + i` (its parameters and its data order) and learning rate `lr * scale_i`, trained
alone; the evaluation reports the mean and spread over replicas."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from medjax.configs import isbi2012
from medjax.train import loop
from medjax.train.evaluate import apply_overrides


def _config(*changes: str):
    c = isbi2012.get_config("smoke")
    c.num_steps = 4
    c.eval_every = c.checkpoint_every = 4
    c.data.max_examples = 8
    apply_overrides(c, changes)
    return c


def _params(workdir):
    config = loop.load_run_config(workdir)
    trainer, state = loop.restore(config, workdir, best=False)
    return trainer, state


def test_replica_i_is_the_run_with_seed_i_and_its_learning_rate(tmp_path):
    many = _config("seed=3", "replicas=2", "replica_lr_scales=(1.0, 0.5)")
    final = loop.run(many, tmp_path / "many")
    lr = float(many.optimizer.learning_rate)
    alone = [
        loop.run(_config("seed=3", f"optimizer.learning_rate={lr}"), tmp_path / "r0"),
        loop.run(_config("seed=4", f"optimizer.learning_rate={lr * 0.5}"), tmp_path / "r1"),
    ]
    trainer, state = _params(tmp_path / "many")
    assert trainer.replicas == 2 and trainer.step_of(state) == 4
    for i in range(2):
        _, single = _params(tmp_path / f"r{i}")
        mine = jax.tree.leaves(trainer.replica(state, i).params)
        theirs = jax.tree.leaves(single.params)
        diff = np.concatenate(
            [
                np.abs(np.asarray(a) - np.asarray(b)).ravel()
                for a, b in zip(mine, theirs, strict=True)
            ]
        )
        # float reassociation only (XLA fuses one program differently), which Adam's
        # normalisation can blow up to ~lr for the few weights with a near-zero gradient.
        assert diff.max() < 4 * lr and np.mean(diff > 1e-5) < 0.01, (
            diff.max(),
            np.mean(diff > 1e-5),
        )
        np.testing.assert_allclose(final[f"dice_mean_r{i}"], alone[i]["dice_mean"], atol=2e-3)
    values = [a["dice_mean"] for a in alone]
    np.testing.assert_allclose(final["dice_mean"], np.mean(values), atol=2e-3)
    np.testing.assert_allclose(final["dice_mean_sd"], np.std(values, ddof=1), atol=3e-3)


def test_replica_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"replica_lr_scales has 3 entries for config.replicas=2"):
        loop.Trainer(_config("replicas=2", "replica_lr_scales=(1.0, 0.5, 0.1)"))
