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


# A parameter tree with one leaf large enough for its moments to be materialized.
_BIG = 1 << 17


def _adam_tree(seed):
    rng = np.random.default_rng(seed)
    return {
        "big": jnp.asarray(rng.normal(size=(_BIG // 64, 64)), jnp.float32),
        "small": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
    }


def _numpy_adam(params, grads_seq, lr, b1, b2, eps, wd=0.0):
    """Adam (Kingma & Ba, Algorithm 1; AdamW's decoupled decay) in float64, by hand."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads_seq, start=1):
        for k in p:
            gk = np.asarray(g[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            mhat, vhat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            p[k] = p[k] - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p[k])
    return p


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_materializes_large_moments_and_matches_optax_and_numpy(name):
    import jax

    cfg = {"name": name, "learning_rate": 0.01, "b1": 0.5, "b2": 0.999, "weight_decay": 0.1}
    tx = make_optimizer(cfg, 100)
    ref = (optax.adam if name == "adam" else optax.adamw)(
        optax.constant_schedule(0.01),
        b1=0.5,
        b2=0.999,
        **({"weight_decay": 0.1} if name == "adamw" else {}),
    )
    params = _adam_tree(0)
    state, ref_state = tx.init(params), ref.init(params)
    # the same state as optax's (checkpoints written before stay readable)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)

    def step(tx):
        def f(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.jit(f)

    ours, theirs = step(tx), step(ref)
    hlo = ours.lower(params, state, params).compile().as_text()
    # the big leaf's mu and nu go through the custom call, the small leaf's do not
    assert hlo.count('custom_call_target="medjax_materialized"') == 2
    grads_seq = [_adam_tree(s) for s in (1, 2, 3)]
    p, s, q, r = params, state, params, ref_state
    for g in grads_seq:
        p, s = ours(p, s, g)
        q, r = theirs(q, r, g)
    expected = _numpy_adam(params, grads_seq, 0.01, 0.5, 0.999, 1e-8, 0.1 if name == "adamw" else 0)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), np.asarray(q[k]), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(p[k]), expected[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(s[0].mu[k]), np.asarray(r[0].mu[k]), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(s[0].nu[k]), np.asarray(r[0].nu[k]), rtol=1e-6)


def test_materialized_is_the_identity_under_jit_grad_vmap_and_donation():
    import jax

    from medjax import ffi

    x = jnp.arange(_BIG, dtype=jnp.float32).reshape(-1, 8) / 7.0
    f = jax.jit(lambda a: ffi.materialized(a * 2.0) + 1.0, donate_argnums=0)
    np.testing.assert_array_equal(np.asarray(f(jnp.array(x))), np.asarray(x) * 2.0 + 1.0)
    g = jax.grad(lambda a: jnp.sum(ffi.materialized(a) ** 2))(x)
    np.testing.assert_allclose(np.asarray(g), 2 * np.asarray(x), rtol=1e-6)
    v = jax.jit(jax.vmap(lambda a: ffi.materialized(a + 1.0)))(x)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(x) + 1.0)
    # bfloat16 too
    xb = x.astype(jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(ffi.materialized)(xb), np.float32), np.asarray(xb, np.float32)
    )
