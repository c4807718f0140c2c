"""Property-based tests (hypothesis) of the metrics and transforms: invariants that must hold for
every input, not only the hand-picked ones.

Shapes are fixed per test so that the JAX functions compile once; the values vary.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medjax import metrics
from medjax.data import transforms

SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
N = 12  # side of the 2D maps
C = 4  # classes


def label_maps(shape=(N, N), classes=C):
    return arrays(np.int32, shape, elements=st.integers(0, classes - 1))


def masks(shape=(N, N)):
    return arrays(np.bool_, shape)


@functools.cache
def _dice_fn():
    return jax.jit(lambda p, g: metrics.dice(metrics.confusion_counts(p[None], g[None], C))[0])


def dice(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    return np.asarray(_dice_fn()(p, g))


@SETTINGS
@given(label_maps(), label_maps())
def test_dice_is_in_unit_interval_and_symmetric(p, g):
    d = dice(p, g)
    assert np.all((d >= 0) & (d <= 1))
    np.testing.assert_allclose(d, dice(g, p), rtol=0, atol=1e-7)
    # by hand: 2|P & G| / (|P| + |G|) per class present in either
    for c in range(C):
        a, b = p == c, g == c
        if a.any() or b.any():
            np.testing.assert_allclose(d[c], 2 * (a & b).sum() / (a.sum() + b.sum()), rtol=1e-6)


@SETTINGS
@given(label_maps(), label_maps(), st.integers(0, 3), st.sampled_from([None, 0, 1]))
def test_flips_and_rotations_commute_with_dice(p, g, k, flip_axis):
    def move(x):
        x = np.rot90(x, k)
        return np.flip(x, flip_axis) if flip_axis is not None else x

    np.testing.assert_allclose(dice(move(p), move(g)), dice(p, g), rtol=0, atol=1e-7)


def _nonempty(m: np.ndarray) -> bool:
    return bool(m.any())


@SETTINGS
@given(
    masks().filter(_nonempty),
    masks().filter(_nonempty),
    st.integers(-4, 4),
    st.integers(-4, 4),
)
def test_hd95_is_invariant_to_translating_both_masks(a, b, dy, dx):
    # on a canvas large enough that the shift never leaves it
    canvas = np.zeros((N + 10, N + 10), bool)
    pa, pb = canvas.copy(), canvas.copy()
    pa[5 : 5 + N, 5 : 5 + N], pb[5 : 5 + N, 5 : 5 + N] = a, b
    ta, tb = np.roll(pa, (dy, dx), (0, 1)), np.roll(pb, (dy, dx), (0, 1))
    for q in (95.0, None):
        want = metrics.hausdorff_distance(pa, pb, percentile=q)
        assert metrics.hausdorff_distance(ta, tb, percentile=q) == want


@SETTINGS
@given(masks().filter(_nonempty), masks().filter(_nonempty), st.integers(0, 3), st.booleans())
def test_hd95_commutes_with_rotations_and_flips_and_is_symmetric(a, b, k, flip):
    def move(x):
        x = np.rot90(x, k)
        return x[::-1] if flip else x

    want = metrics.hausdorff_distance(a, b)
    assert want >= 0
    assert metrics.hausdorff_distance(move(a), move(b)) == want
    assert metrics.hausdorff_distance(b, a) == want


@SETTINGS
@given(
    arrays(np.int32, (9, 7, 5), elements=st.sampled_from([0, 1, 2, 4])),
    st.tuples(*[st.floats(0.5, 3.0)] * 3),
    st.tuples(*[st.floats(0.7, 2.5)] * 3),
)
def test_resampling_a_label_map_never_invents_a_class(label, spacing, target):
    out, new_spacing = transforms.resample_to_spacing(label, spacing, target, order=0)
    assert set(np.unique(out)) <= set(np.unique(label))
    assert out.ndim == 3 and np.all(np.asarray(new_spacing) > 0)
    # back onto the original grid: the original shape, and still no new class
    back, _ = transforms.resample_to_spacing(out, new_spacing, None, order=0, shape=label.shape)
    assert back.shape == label.shape and set(np.unique(back)) <= set(np.unique(label))


@functools.cache
def _augment_fn():
    cfg = transforms.AugmentConfig(
        flip_axes=(0, 1), rot90=True, affine_prob=1.0, rotate_deg=30.0, scale_range=(0.8, 1.2),
        translate_frac=0.1, intensity_scale=0.1, intensity_shift=0.1, gamma_prob=0.5,
    )  # fmt: skip
    return jax.jit(lambda key, x, y: transforms.augment_example(key, x, y, cfg))


@SETTINGS
@given(
    st.integers(0, 2**31 - 1),
    label_maps((16, 16)),
    arrays(np.float32, (16, 16, 2), elements=st.floats(-3, 3, width=32)),
)
def test_augmentation_keeps_shapes_and_never_invents_a_label(seed, label, image):
    x, y = _augment_fn()(jax.random.key(seed), image, label)
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == image.shape and y.shape == label.shape and y.dtype == label.dtype
    # nearest-neighbour labels; outside the input the label is background (0)
    assert set(np.unique(y)) <= set(np.unique(label)) | {0}
    assert np.isfinite(x).all()


@SETTINGS
@given(label_maps((11, 7)), st.tuples(st.integers(1, 20), st.integers(1, 20)))
def test_pad_or_crop_keeps_the_labels_it_keeps(label, size):
    image = label[..., None].astype(np.float32)
    out = transforms.pad_or_crop_to({"image": image, "label": label}, size)
    assert out["image"].shape == (*size, 1) and out["label"].shape == size
    assert set(np.unique(out["label"])) <= set(np.unique(label)) | {0}
    # a centre crop/pad and its inverse give back the overlap unchanged
    back = transforms.pad_or_crop_to(out, label.shape)["label"]
    h, w = min(label.shape[0], size[0]), min(label.shape[1], size[1])
    y0, x0 = (label.shape[0] - h) // 2, (label.shape[1] - w) // 2
    np.testing.assert_array_equal(back[y0 : y0 + h, x0 : x0 + w], label[y0 : y0 + h, x0 : x0 + w])
