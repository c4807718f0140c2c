"""Tests for medjax.losses against hand-written numpy references (explicit voxel loops)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax import losses
from tests.helpers import jit_grad

# --------------------------------------------------------------------------- references


def _softmax_voxel(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def _voxels(shape: tuple[int, ...]):
    return itertools.product(*(range(s) for s in shape))


def ref_cross_entropy(logits, labels, mask=None, class_weights=None) -> np.ndarray:
    """Per-example weighted mean of -log softmax[y] via explicit loops."""
    b = logits.shape[0]
    spatial = logits.shape[1:-1]
    out = np.zeros(b)
    for i in range(b):
        num = den = 0.0
        for v in _voxels(spatial):
            y = int(labels[(i, *v)])
            w = 1.0 if mask is None else float(mask[(i, *v)])
            if class_weights is not None:
                w *= class_weights[y]
            p = _softmax_voxel(logits[(i, *v)])
            num += w * -np.log(p[y])
            den += w
        out[i] = num / den if den > 0 else 0.0
    return out


def ref_dice_loss(
    logits,
    labels,
    include_background=True,
    smooth_nr=1e-5,
    smooth_dr=1e-5,
    squared_pred=False,
    batch=False,
    mask=None,
) -> np.ndarray:
    """MONAI DiceLoss(softmax, to_onehot_y) formula written out with loops."""
    b = logits.shape[0]
    c = logits.shape[-1]
    spatial = logits.shape[1:-1]
    classes = list(range(c)) if include_background else list(range(1, c))
    groups = [list(range(b))] if batch else [[i] for i in range(b)]
    per_group = []
    for group in groups:
        losses_c = []
        for k in classes:
            inter = psum = gsum = 0.0
            for i in group:
                for v in _voxels(spatial):
                    m = 1.0 if mask is None else float(mask[(i, *v)])
                    p = _softmax_voxel(logits[(i, *v)])[k] * m
                    g = float(labels[(i, *v)] == k) * m
                    inter += p * g
                    psum += p * p if squared_pred else p
                    gsum += g * g if squared_pred else g
            losses_c.append(1.0 - (2.0 * inter + smooth_nr) / (psum + gsum + smooth_dr))
        per_group.append(np.mean(losses_c))
    if batch:
        return np.full(b, per_group[0])
    return np.asarray(per_group)


def ref_focal(logits, labels, gamma, alpha=None, mask=None) -> np.ndarray:
    b = logits.shape[0]
    c = logits.shape[-1]
    spatial = logits.shape[1:-1]
    out = np.zeros(b)
    for i in range(b):
        num = den = 0.0
        for v in _voxels(spatial):
            y = int(labels[(i, *v)])
            m = 1.0 if mask is None else float(mask[(i, *v)])
            pt = _softmax_voxel(logits[(i, *v)])[y]
            if alpha is None:
                a = 1.0
            elif np.ndim(alpha) == 0:
                a = (1.0 - alpha) if y == 0 else alpha
            else:
                a = alpha[y]
            assert len(logits[(i, *v)]) == c
            num += m * -a * (1.0 - pt) ** gamma * np.log(pt)
            den += m
        out[i] = num / den if den > 0 else 0.0
    return out


# --------------------------------------------------------------------------- fixtures


def _random_problem(seed: int, spatial: tuple[int, ...], c: int, b: int = 2):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(b, *spatial, c)).astype(np.float32)
    labels = rng.integers(0, c, size=(b, *spatial))
    mask = rng.random((b, *spatial)) > 0.3
    return logits, labels, mask


SHAPES = [(4, 5), (3, 3, 4)]


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("spatial", SHAPES)
def test_cross_entropy_matches_reference(spatial):
    logits, labels, mask = _random_problem(0, spatial, 3)
    cw = np.array([0.2, 1.0, 3.0])
    got = losses.cross_entropy(logits, labels)
    assert got.shape == (2,)
    np.testing.assert_allclose(got, ref_cross_entropy(logits, labels), rtol=1e-5)
    got = losses.cross_entropy(logits, labels, mask=mask, class_weights=cw)
    np.testing.assert_allclose(got, ref_cross_entropy(logits, labels, mask, cw), rtol=1e-5)


def test_cross_entropy_hand_value_and_dtype():
    # Two voxels, uniform logits over 4 classes -> log(4); one confident correct voxel -> ~0.
    logits = np.zeros((1, 2, 4), np.float16)
    logits[0, 1] = [20.0, 0.0, 0.0, 0.0]
    labels = np.array([[2, 0]])
    got = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, [np.log(4.0) / 2], rtol=1e-3)


def test_cross_entropy_fully_masked_is_zero():
    logits, labels, _ = _random_problem(1, (3, 3), 2)
    mask = np.zeros(labels.shape, bool)
    mask[1, 0, 0] = True
    got = losses.cross_entropy(logits, labels, mask=mask)
    assert got[0] == 0.0
    np.testing.assert_allclose(got[1], ref_cross_entropy(logits, labels, mask)[1], rtol=1e-5)


# --------------------------------------------------------------------------- dice


@pytest.mark.parametrize("spatial", SHAPES)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"include_background": False},
        {"squared_pred": True},
        {"batch_dice": True},
        {"smooth_nr": 0.0, "smooth_dr": 1e-6, "include_background": False, "squared_pred": True},
        {"smooth_nr": 0.5, "smooth_dr": 2.0},
    ],
)
def test_soft_dice_matches_reference(spatial, kw):
    logits, labels, _ = _random_problem(2, spatial, 3)
    got = losses.soft_dice_loss(logits, labels, **kw)
    ref_kw = dict(kw)
    if "batch_dice" in ref_kw:
        ref_kw["batch"] = ref_kw.pop("batch_dice")
    assert got.shape == (2,)
    np.testing.assert_allclose(got, ref_dice_loss(logits, labels, **ref_kw), rtol=1e-5, atol=1e-6)


def test_soft_dice_hand_computed_tiny():
    # 1 example, 2 voxels, 2 classes. softmax([0, log 3]) = [0.25, 0.75]; softmax([0,0]) = .5/.5
    logits = np.array([[[0.0, np.log(3.0)], [0.0, 0.0]]], np.float32)
    labels = np.array([[1, 0]])
    # class 0: I = 0.5, P = 0.75, G = 1 -> 1 - 1/1.75 ; class 1: I = .75, P = 1.25, G = 1
    expected = 0.5 * ((1 - 1.0 / 1.75) + (1 - 1.5 / 2.25))
    got = losses.soft_dice_loss(logits, labels, smooth_nr=0.0, smooth_dr=0.0)
    np.testing.assert_allclose(got, [expected], rtol=1e-6)


def test_soft_dice_perfect_prediction_is_zero():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(2, 6, 5, 4))
    logits = 50.0 * jax.nn.one_hot(labels, 4)
    got = losses.soft_dice_loss(logits, labels)
    np.testing.assert_allclose(got, 0.0, atol=1e-5)
    # A class absent from both prediction and truth scores 1 - smooth_nr / smooth_dr = 0.
    labels2 = np.where(labels == 3, 0, labels)
    got = losses.soft_dice_loss(50.0 * jax.nn.one_hot(labels2, 4), labels2)
    np.testing.assert_allclose(got, 0.0, atol=1e-5)
    # Completely wrong prediction gives ~1.
    wrong = 50.0 * jax.nn.one_hot((labels + 1) % 4, 4)
    np.testing.assert_allclose(losses.soft_dice_loss(wrong, labels), 1.0, atol=1e-5)


def test_soft_dice_mask_masks():
    logits, labels, mask = _random_problem(4, (5, 5), 3)
    got = losses.soft_dice_loss(logits, labels, mask=mask)
    np.testing.assert_allclose(got, ref_dice_loss(logits, labels, mask=mask), rtol=1e-5)
    # Changing logits/labels where mask is False must not change the loss.
    logits2 = np.where(
        mask[..., None], logits, 100.0 * np.random.default_rng(5).normal(size=logits.shape)
    ).astype(np.float32)
    labels2 = np.where(mask, labels, (labels + 1) % 3)
    got2 = losses.soft_dice_loss(logits2, labels2, mask=mask)
    np.testing.assert_allclose(got, got2, rtol=1e-6)
    assert not np.allclose(got, losses.soft_dice_loss(logits2, labels2))


def test_soft_dice_gradient_finite_difference():
    logits, labels, mask = _random_problem(6, (3, 4), 3, b=1)
    logits = logits.astype(np.float64)

    def f(z):
        return jnp.sum(losses.soft_dice_loss(z, labels, mask=mask, include_background=False))

    grad = np.asarray(jit_grad(f)(jnp.asarray(logits, jnp.float32)))

    def ref(z):
        return float(ref_dice_loss(z, labels, include_background=False, mask=mask)[0])

    eps = 1e-4
    rng = np.random.default_rng(7)
    idx = [tuple(rng.integers(0, s) for s in logits.shape) for _ in range(10)]
    for ix in idx:
        zp, zm = logits.copy(), logits.copy()
        zp[ix] += eps
        zm[ix] -= eps
        fd = (ref(zp) - ref(zm)) / (2 * eps)
        np.testing.assert_allclose(grad[ix], fd, rtol=2e-3, atol=1e-5)
    # Masked voxels get exactly zero gradient.
    assert np.all(grad[0][~mask[0]] == 0.0)


def test_losses_jit_2d_and_3d():
    refs = {
        losses.cross_entropy: lambda z, y, m: ref_cross_entropy(z, y, m),
        losses.soft_dice_loss: lambda z, y, m: ref_dice_loss(z, y, mask=m),
        losses.focal_loss: lambda z, y, m: ref_focal(z, y, 2.0, None, m),
    }
    for spatial in [(3, 4), (2, 3, 4)]:
        logits, labels, mask = _random_problem(8, spatial, 2)
        for fn, ref in refs.items():
            jitted = jax.jit(lambda z, y, m, fn=fn: fn(z, y, mask=m))(logits, labels, mask)
            assert jitted.shape == (2,)
            np.testing.assert_allclose(jitted, ref(logits, labels, mask), rtol=1e-5)


# --------------------------------------------------------------------------- dice + ce


def test_dice_ce_is_weighted_sum():
    logits, labels, mask = _random_problem(9, (4, 4), 3)
    got = losses.dice_ce_loss(
        logits,
        labels,
        dice_weight=0.3,
        ce_weight=2.0,
        mask=mask,
        include_background=False,
        class_weights=[1.0, 2.0, 0.5],
    )
    ref = 0.3 * ref_dice_loss(
        logits, labels, include_background=False, mask=mask
    ) + 2.0 * ref_cross_entropy(logits, labels, mask, [1.0, 2.0, 0.5])
    np.testing.assert_allclose(got, ref, rtol=1e-5)


# --------------------------------------------------------------------------- focal


@pytest.mark.parametrize("spatial", SHAPES)
def test_focal_gamma0_equals_ce(spatial):
    logits, labels, mask = _random_problem(10, spatial, 4)
    np.testing.assert_allclose(
        losses.focal_loss(logits, labels, gamma=0.0, mask=mask),
        losses.cross_entropy(logits, labels, mask=mask),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        losses.focal_loss(logits, labels, gamma=0.0),
        ref_cross_entropy(logits, labels),
        rtol=1e-5,
    )


@pytest.mark.parametrize("alpha", [None, 0.25, [0.1, 0.5, 0.9]])
@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.5])
def test_focal_matches_reference(alpha, gamma):
    logits, labels, mask = _random_problem(11, (4, 3), 3)
    got = losses.focal_loss(logits, labels, gamma=gamma, alpha=alpha, mask=mask)
    ref = ref_focal(logits, labels, gamma, alpha, mask)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_focal_downweights_easy_voxels():
    logits, labels, _ = _random_problem(12, (4, 4), 3)
    ce = losses.cross_entropy(logits, labels)
    fl = losses.focal_loss(logits, labels, gamma=2.0)
    assert np.all(np.asarray(fl) < np.asarray(ce))
    perfect = 30.0 * jax.nn.one_hot(labels, 3)
    np.testing.assert_allclose(losses.focal_loss(perfect, labels), 0.0, atol=1e-12)
    g = jax.grad(lambda z: jnp.sum(losses.focal_loss(z, labels)))(perfect)
    assert np.all(np.isfinite(np.asarray(g)))


def test_shape_errors():
    logits = np.zeros((2, 4, 4, 3), np.float32)
    with pytest.raises(ValueError):
        losses.cross_entropy(logits, np.zeros((2, 4, 3), int))
    with pytest.raises(ValueError):
        losses.soft_dice_loss(logits, np.zeros((2, 4, 4), int), mask=np.ones((2, 4), bool))
