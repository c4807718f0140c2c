"""Tests for the GAN section of medjax.losses against hand computations, optax and numpy."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax import losses

KINDS = ("non_saturating", "lsgan", "hinge", "wasserstein")


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# Scalar logits per example: r = [2.0, -1.0], f = [-0.5, 1.5], values written out by hand.
R = [2.0, -1.0]
F = [-0.5, 1.5]
HAND_D = {
    "non_saturating": [_softplus(-2.0) + _softplus(-0.5), _softplus(1.0) + _softplus(1.5)],
    # (r - 1)^2 + f^2: 1 + 0.25, 4 + 2.25
    "lsgan": [1.25, 6.25],
    # relu(1 - r) + relu(1 + f): 0 + 0.5, 2 + 2.5
    "hinge": [0.5, 4.5],
    # f - r
    "wasserstein": [-2.5, 2.5],
}
HAND_G = {
    "non_saturating": [_softplus(0.5), _softplus(-1.5)],
    # (f - 1)^2
    "lsgan": [2.25, 0.25],
    "hinge": [0.5, -1.5],
    "wasserstein": [0.5, -1.5],
}


def test_kinds_tuple():
    assert losses.GAN_LOSS_KINDS == KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_scalar_logits_by_hand(kind):
    r = jnp.asarray(R, jnp.float32)
    f = jnp.asarray(F, jnp.float32)
    d = losses.gan_discriminator_loss(r, f, kind)
    g = losses.gan_generator_loss(f, kind)
    assert d.shape == (2,) and d.dtype == jnp.float32
    assert g.shape == (2,) and g.dtype == jnp.float32
    np.testing.assert_allclose(d, HAND_D[kind], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g, HAND_G[kind], rtol=1e-6, atol=1e-6)


def test_non_saturating_matches_optax_bce():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 4, 5, 1)).astype(np.float32) * 3
    f = rng.normal(size=(3, 4, 5, 1)).astype(np.float32) * 3
    ref_d = jnp.mean(optax.sigmoid_binary_cross_entropy(r, jnp.ones_like(r)), axis=(1, 2, 3))
    ref_d += jnp.mean(optax.sigmoid_binary_cross_entropy(f, jnp.zeros_like(f)), axis=(1, 2, 3))
    ref_g = jnp.mean(optax.sigmoid_binary_cross_entropy(f, jnp.ones_like(f)), axis=(1, 2, 3))
    np.testing.assert_allclose(
        losses.gan_discriminator_loss(r, f, "non_saturating"), ref_d, rtol=1e-5
    )
    np.testing.assert_allclose(losses.gan_generator_loss(f, "non_saturating"), ref_g, rtol=1e-5)


def _numpy_d(r: np.ndarray, f: np.ndarray, kind: str) -> np.ndarray:
    ax = tuple(range(1, r.ndim))
    if kind == "non_saturating":
        return np.logaddexp(0, -r).mean(ax) + np.logaddexp(0, f).mean(ax)
    if kind == "lsgan":
        return ((r - 1) ** 2).mean(ax) + (f**2).mean(ax)
    if kind == "hinge":
        return np.maximum(1 - r, 0).mean(ax) + np.maximum(1 + f, 0).mean(ax)
    return f.mean(ax) - r.mean(ax)


def _numpy_g(f: np.ndarray, kind: str) -> np.ndarray:
    ax = tuple(range(1, f.ndim))
    if kind == "non_saturating":
        return np.logaddexp(0, -f).mean(ax)
    if kind == "lsgan":
        return ((f - 1) ** 2).mean(ax)
    return -f.mean(ax)


@pytest.mark.parametrize("kind", KINDS)
def test_patchgan_map_averaged_per_example(kind):
    rng = np.random.default_rng(1)
    r = rng.normal(size=(2, 3, 4, 1)) * 2
    f = rng.normal(size=(2, 3, 4, 1)) * 2
    d = losses.gan_discriminator_loss(r.astype(np.float32), f.astype(np.float32), kind)
    g = losses.gan_generator_loss(f.astype(np.float32), kind)
    np.testing.assert_allclose(d, _numpy_d(r, f, kind), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, _numpy_g(f, kind), rtol=1e-5, atol=1e-6)
    # A map whose every entry equals the scalar logit gives the scalar loss.
    const = np.broadcast_to(np.asarray(R, np.float32)[:, None, None, None], (2, 3, 4, 1))
    constf = np.broadcast_to(np.asarray(F, np.float32)[:, None, None, None], (2, 3, 4, 1))
    np.testing.assert_allclose(
        losses.gan_discriminator_loss(const, constf, kind), HAND_D[kind], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_logits_give_float32(kind):
    r = jnp.asarray(R, jnp.bfloat16)
    f = jnp.asarray(F, jnp.bfloat16)  # all four values are exact in bfloat16
    d = losses.gan_discriminator_loss(r, f, kind)
    g = losses.gan_generator_loss(f, kind)
    assert d.dtype == jnp.float32 and g.dtype == jnp.float32
    np.testing.assert_allclose(d, HAND_D[kind], rtol=1e-6, atol=1e-6)


def test_bad_kind_and_shapes():
    with pytest.raises(ValueError, match="non_saturating.*lsgan.*hinge.*wasserstein"):
        losses.gan_discriminator_loss(jnp.zeros(2), jnp.zeros(2), "vanilla")
    with pytest.raises(ValueError, match="expected one of"):
        losses.gan_generator_loss(jnp.zeros(2), "wgan")
    with pytest.raises(ValueError, match="shape"):
        losses.gan_discriminator_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)), "hinge")
    with pytest.raises(ValueError, match="batch axis"):
        losses.gan_generator_loss(jnp.float32(1.0), "hinge")


# --------------------------------------------------------------------------- gradient penalty

SHAPE = (3, 2, 3, 2)  # [B, H, W, C]; 12 features per example
HIDDEN = 5


def _mlp_params(seed: int = 0):
    rng = np.random.default_rng(seed)
    d = int(np.prod(SHAPE[1:]))
    return (
        rng.normal(size=(d, HIDDEN)) / np.sqrt(d),
        rng.normal(size=HIDDEN) * 0.3,
        rng.normal(size=HIDDEN),
    )


def _mlp_jax(params):
    w, b, v = (jnp.asarray(p, jnp.float32) for p in params)

    def critic(x):
        h = jnp.tanh(x.reshape(x.shape[0], -1) @ w + b)
        return h @ v

    return critic


def _mlp_np(params, x_flat: np.ndarray) -> float:
    w, b, v = params
    return float(np.tanh(x_flat @ w + b) @ v)


def _fd_grad(fn, x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = h
        g.flat[i] = (fn(x + e) - fn(x - e)) / (2 * h)
    return g


def test_interpolate_points_and_eps():
    rng = np.random.default_rng(2)
    real = rng.normal(size=SHAPE).astype(np.float32)
    fake = rng.normal(size=SHAPE).astype(np.float32)
    key = jax.random.key(7)
    x_hat, eps = losses.interpolate(real, fake, key)
    assert eps.shape == (3, 1, 1, 1) and eps.dtype == jnp.float32
    assert x_hat.dtype == jnp.float32
    np.testing.assert_array_equal(eps, jax.random.uniform(key, (3, 1, 1, 1), jnp.float32))
    e = np.asarray(eps, np.float64)
    assert np.all((e >= 0) & (e < 1)) and len(np.unique(e)) == 3
    np.testing.assert_allclose(x_hat, e * real + (1 - e) * fake, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("target", [1.0, 0.5])
def test_gradient_penalty_vs_finite_differences(target):
    rng = np.random.default_rng(3)
    real = rng.normal(size=SHAPE).astype(np.float32)
    fake = rng.normal(size=SHAPE).astype(np.float32)
    key = jax.random.key(11)
    params = _mlp_params()
    gp = losses.gradient_penalty(_mlp_jax(params), real, fake, key, target=target)
    x_hat, _ = losses.interpolate(real, fake, key)
    x_hat = np.asarray(x_hat, np.float64)
    ref = []
    for b in range(SHAPE[0]):
        g = _fd_grad(lambda x: _mlp_np(params, x), x_hat[b].reshape(-1))
        ref.append((np.linalg.norm(g) - target) ** 2)
    assert gp.shape == (3,) and gp.dtype == jnp.float32
    np.testing.assert_allclose(gp, ref, rtol=1e-4, atol=1e-6)


def test_gradient_penalty_linear_critic_exact():
    rng = np.random.default_rng(4)
    w = rng.normal(size=SHAPE[1:]).astype(np.float32)
    critic = lambda x: jnp.sum(x * w, axis=(1, 2, 3))
    real = rng.normal(size=SHAPE).astype(np.float32)
    fake = rng.normal(size=SHAPE).astype(np.float32)
    norm = float(np.linalg.norm(w.astype(np.float64)))
    gp = losses.gradient_penalty(critic, real, fake, jax.random.key(0))
    np.testing.assert_allclose(gp, np.full(3, (norm - 1.0) ** 2), rtol=1e-5)
    gp2 = losses.gradient_penalty(critic, real, fake, jax.random.key(0), target=2.0)
    np.testing.assert_allclose(gp2, np.full(3, (norm - 2.0) ** 2), rtol=1e-5)


def test_gradient_penalty_param_gradient_by_hand():
    # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||, and 0 (not NaN) at w = 0.
    rng = np.random.default_rng(5)
    real = rng.normal(size=SHAPE).astype(np.float32)
    fake = rng.normal(size=SHAPE).astype(np.float32)

    def mean_gp(w):
        critic = lambda x: jnp.sum(x * w, axis=(1, 2, 3))
        return jnp.mean(losses.gradient_penalty(critic, real, fake, jax.random.key(1)))

    w = rng.normal(size=SHAPE[1:]).astype(np.float32)
    n = np.linalg.norm(w.astype(np.float64))
    np.testing.assert_allclose(jax.grad(mean_gp)(w), 2 * (n - 1) * w / n, rtol=1e-4, atol=1e-6)
    g0 = jax.grad(mean_gp)(np.zeros(SHAPE[1:], np.float32))
    assert np.all(np.isfinite(g0))
    assert float(mean_gp(np.zeros(SHAPE[1:], np.float32))) == pytest.approx(1.0)


def test_gradient_penalty_jit_bfloat16():
    rng = np.random.default_rng(6)
    real = jnp.asarray(rng.normal(size=SHAPE), jnp.bfloat16)
    fake = jnp.asarray(rng.normal(size=SHAPE), jnp.bfloat16)
    critic = _mlp_jax(_mlp_params(1))
    fn = jax.jit(lambda r, f, k: losses.gradient_penalty(critic, r, f, k))
    gp = fn(real, fake, jax.random.key(3))
    assert gp.shape == (3,) and gp.dtype == jnp.float32
    eager = losses.gradient_penalty(critic, real, fake, jax.random.key(3))
    np.testing.assert_allclose(gp, eager, rtol=1e-5, atol=1e-7)
    # bfloat16 inputs are upcast before interpolating: same as passing their float32 values.
    ref = losses.gradient_penalty(
        critic, real.astype(jnp.float32), fake.astype(jnp.float32), jax.random.key(3)
    )
    np.testing.assert_allclose(gp, ref, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- L1


def test_l1_loss_plain_and_masked_by_hand():
    pred = np.zeros((2, 2, 2, 2), np.float32)
    target = np.zeros((2, 2, 2, 2), np.float32)
    pred[0, 0, 0] = [1.0, 3.0]
    pred[0, 1, 1] = [-2.0, 0.0]
    pred[1, 0, 1] = [0.5, 0.5]
    # Unmasked: sum |d| / 8 -> (1 + 3 + 2) / 8 and (0.5 + 0.5) / 8.
    np.testing.assert_allclose(losses.l1_loss(pred, target), [0.75, 0.125], rtol=1e-6)
    mask = np.zeros((2, 2, 2), bool)
    mask[0, 0, 0] = mask[0, 0, 1] = True  # |d| over 2 voxels x 2 channels: (1 + 3) / 4
    mask[1, 1, 1] = True  # a voxel without error
    np.testing.assert_allclose(losses.l1_loss(pred, target, mask), [1.0, 0.0], rtol=1e-6)
    # Per-channel float mask: weights 2 and 1 on the channels of voxel (0, 0, 0).
    full = np.zeros(pred.shape, np.float32)
    full[0, 0, 0] = [2.0, 1.0]
    full[1, 0, 1, 0] = 1.0
    np.testing.assert_allclose(
        losses.l1_loss(pred, target, full), [(2 * 1 + 3) / 3, 0.5], rtol=1e-6
    )
    empty = np.zeros((2, 2, 2), bool)
    np.testing.assert_allclose(losses.l1_loss(pred, target, empty), [0.0, 0.0])
    with pytest.raises(ValueError, match="mask shape"):
        losses.l1_loss(pred, target, np.ones((2, 2), bool))
    bf = losses.l1_loss(jnp.asarray(pred, jnp.bfloat16), target)
    assert bf.dtype == jnp.float32
