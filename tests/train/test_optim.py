"""Schedules and optimizers (medjax.train.optim) against hand-computed values."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.train.optim import make_optimizer, make_schedule


def _values(sched, steps):
    return np.array([float(sched(s)) for s in steps])


def test_constant():
    sched = make_schedule({"learning_rate": 0.3, "schedule": "constant"}, 100)
    np.testing.assert_allclose(_values(sched, [0, 1, 50, 100, 1000]), 0.3, rtol=1e-6)
    # "constant" is the default schedule.
    np.testing.assert_allclose(_values(make_schedule({"learning_rate": 2}, 5), [0, 9]), 2.0)


def test_warmup_is_a_linear_ramp_from_zero():
    cfg = {"learning_rate": 0.5, "schedule": "constant", "warmup_steps": 10}
    sched = make_schedule(cfg, 100)
    steps = [0, 1, 5, 9, 10, 11, 60]
    want = [0.0, 0.05, 0.25, 0.45, 0.5, 0.5, 0.5]
    np.testing.assert_allclose(_values(sched, steps), want, rtol=1e-6, atol=1e-9)


def test_cosine_with_warmup():
    lr, warmup, total = 0.1, 10, 110  # 100 decay steps after the warm-up
    sched = make_schedule(
        {"learning_rate": lr, "schedule": "cosine", "warmup_steps": warmup}, total
    )
    for t in (0, 10, 25, 50, 75, 90, 100):
        want = lr * 0.5 * (1 + math.cos(math.pi * t / 100))
        np.testing.assert_allclose(float(sched(warmup + t)), want, rtol=1e-5, atol=1e-8)
    assert float(sched(warmup + 50)) == pytest.approx(lr / 2, rel=1e-5)
    assert float(sched(total)) == pytest.approx(0.0, abs=1e-9)
    assert float(sched(5)) == pytest.approx(lr * 5 / 10, rel=1e-6)  # still warming up


def test_cosine_final_lr_fraction():
    lr, alpha = 1.0, 0.1
    cfg = {"learning_rate": lr, "schedule": "cosine", "final_lr_fraction": alpha}
    sched = make_schedule(cfg, 200)
    assert float(sched(0)) == pytest.approx(lr)
    assert float(sched(100)) == pytest.approx(lr * (alpha + (1 - alpha) * 0.5), rel=1e-5)
    assert float(sched(200)) == pytest.approx(lr * alpha, rel=1e-5)
    assert float(sched(500)) == pytest.approx(lr * alpha, rel=1e-5)


def test_linear_decay_default_start_is_half_way():
    lr = 0.2
    sched = make_schedule({"learning_rate": lr, "schedule": "linear_decay"}, 100)
    steps = [0, 30, 50, 60, 75, 90, 100, 120]
    want = [lr, lr, lr, lr * 0.8, lr * 0.5, lr * 0.2, 0.0, 0.0]
    np.testing.assert_allclose(_values(sched, steps), want, rtol=1e-5, atol=1e-9)


def test_linear_decay_explicit_start_and_warmup():
    lr = 1.0
    cfg = {"learning_rate": lr, "schedule": "linear_decay", "decay_start": 60, "warmup_steps": 20}
    sched = make_schedule(cfg, 120)  # 100 steps after warm-up: flat for 60, then 40 to zero
    steps = [10, 20, 50, 80, 90, 100, 120]
    want = [0.5, 1.0, 1.0, 1.0, 0.75, 0.5, 0.0]
    np.testing.assert_allclose(_values(sched, steps), want, rtol=1e-5, atol=1e-9)


def test_poly_is_nnunet_power_0_9():
    lr, total = 0.01, 100
    sched = make_schedule({"learning_rate": lr, "schedule": "poly"}, total)
    for t in (0, 1, 25, 50, 90, 99, 100):
        want = lr * (1 - t / total) ** 0.9
        np.testing.assert_allclose(float(sched(t)), want, rtol=1e-5, atol=1e-10)
    assert float(sched(150)) == pytest.approx(0.0, abs=1e-10)


def test_poly_after_warmup():
    lr, warmup, total = 0.01, 20, 120
    cfg = {"learning_rate": lr, "schedule": "poly", "warmup_steps": warmup}
    sched = make_schedule(cfg, total)
    assert float(sched(10)) == pytest.approx(lr / 2, rel=1e-6)
    for t in (0, 30, 60, 100):
        want = lr * (1 - t / 100) ** 0.9
        np.testing.assert_allclose(float(sched(warmup + t)), want, rtol=1e-5, atol=1e-10)


def test_unknown_names_raise_naming_the_config_key():
    with pytest.raises(ValueError, match=r"config\.optimizer\.schedule='step'"):
        make_schedule({"learning_rate": 1.0, "schedule": "step"}, 10)
    with pytest.raises(ValueError, match=r"config\.optimizer\.name='lamb'"):
        make_optimizer({"learning_rate": 1.0, "name": "lamb"}, 10)


def _first_update(cfg, grads, params):
    opt = make_optimizer(cfg, 100)
    updates, _ = opt.update(grads, opt.init(params), params)
    return {k: np.asarray(v) for k, v in updates.items()}


GRADS = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[0.0], [4.0]])}  # global norm 5
PARAMS = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[0.5], [-1.0]])}


def test_grad_clipping_with_plain_sgd():
    cfg = {"name": "sgd", "momentum": 0.0, "learning_rate": 0.1, "grad_clip_norm": 1.0}
    up = _first_update(cfg, GRADS, PARAMS)
    # Clipped to norm 1: g / 5, then -lr * g.
    np.testing.assert_allclose(up["a"], [-0.1 * 3 / 5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(up["b"], [[0.0], [-0.1 * 4 / 5]], rtol=1e-6)
    # Global norm of the update is lr * clip.
    norm = float(optax.tree.norm(up))
    assert norm == pytest.approx(0.1, rel=1e-6)
    # Gradients already under the threshold pass unchanged.
    small = {"a": jnp.array([0.3, 0.0]), "b": jnp.array([[0.0], [0.4]])}
    up = _first_update(cfg, small, PARAMS)
    np.testing.assert_allclose(up["a"], [-0.03, 0.0], rtol=1e-6)
    np.testing.assert_allclose(up["b"], [[0.0], [-0.04]], rtol=1e-6)
    # No clipping configured: the raw gradient.
    up = _first_update({**cfg, "grad_clip_norm": 0.0}, GRADS, PARAMS)
    np.testing.assert_allclose(up["a"], [-0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(up["b"], [[0.0], [-0.4]], rtol=1e-6)


def test_sgd_default_is_nesterov_momentum_0_99():
    cfg = {"name": "sgd", "learning_rate": 0.1}
    up = _first_update(cfg, GRADS, PARAMS)
    # Nesterov, first step: trace = g; update = -lr * (g + 0.99 * trace) = -lr * 1.99 g.
    np.testing.assert_allclose(up["a"], [-0.1 * 1.99 * 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(up["b"], [[0.0], [-0.1 * 1.99 * 4]], rtol=1e-6)


def test_adam_first_step_is_lr_times_sign():
    cfg = {"name": "adam", "learning_rate": 0.01}
    grads = {"a": jnp.array([3.0, -0.5]), "b": jnp.array([[2.0], [-4.0]])}
    up = _first_update(cfg, grads, PARAMS)
    # Bias-corrected m = g, v = g^2 -> update = -lr * g / (|g| + 1e-8).
    np.testing.assert_allclose(up["a"], [-0.01, 0.01], rtol=1e-5)
    np.testing.assert_allclose(up["b"], [[-0.01], [0.01]], rtol=1e-5)
    # With clipping the direction per coordinate is unchanged for Adam's first step.
    up = _first_update({**cfg, "grad_clip_norm": 0.5}, grads, PARAMS)
    np.testing.assert_allclose(up["a"], [-0.01, 0.01], rtol=1e-5)


def test_adamw_adds_decoupled_weight_decay():
    cfg = {"name": "adamw", "learning_rate": 0.01, "weight_decay": 0.1}
    grads = {"a": jnp.array([3.0, -0.5]), "b": jnp.array([[2.0], [-4.0]])}
    up = _first_update(cfg, grads, PARAMS)
    want_a = -0.01 * (np.sign([3.0, -0.5]) + 0.1 * np.array([1.0, -2.0]))
    want_b = -0.01 * (np.sign([[2.0], [-4.0]]) + 0.1 * np.array([[0.5], [-1.0]]))
    np.testing.assert_allclose(up["a"], want_a, rtol=1e-5)
    np.testing.assert_allclose(up["b"], want_b, rtol=1e-5)


def test_optimizer_follows_the_schedule():
    # Warm-up of 4 steps with plain SGD: the k-th update is -(k / 4) * lr * g.
    cfg = {"name": "sgd", "momentum": 0.0, "learning_rate": 1.0, "warmup_steps": 4}
    opt = make_optimizer(cfg, 10)
    params = {"w": jnp.zeros(1)}
    state = opt.init(params)
    got = []
    for _ in range(6):
        up, state = opt.update({"w": jnp.ones(1)}, state, params)
        got.append(float(up["w"][0]))
    np.testing.assert_allclose(got, [0.0, -0.25, -0.5, -0.75, -1.0, -1.0], rtol=1e-6, atol=1e-9)
