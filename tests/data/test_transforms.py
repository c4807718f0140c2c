"""Host and device transforms in medjax.data.transforms, checked against numpy/scipy/hand values."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from medjax.data import transforms as T

NO_AUG = T.AugmentConfig.identity()
aug_jit = jax.jit(T.augment_batch, static_argnames="config")


def _only(**kw) -> T.AugmentConfig:
    return dataclasses.replace(NO_AUG, **kw)


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.random((1, 12, 12, 2)).astype(np.float32)
    label = rng.integers(0, 4, (1, 12, 12)).astype(np.int32)
    return np.repeat(image, 32, 0), np.repeat(label, 32, 0)


# --------------------------------------------------------------------------------------------
# host
# --------------------------------------------------------------------------------------------


def test_resize_bilinear_matches_half_pixel_formula():
    h, w = 8, 10
    ramp = np.tile(np.arange(w, dtype=np.float32), (h, 1))[..., None]  # value = column index
    label = (np.arange(w)[None, :] >= 5).repeat(h, 0).astype(np.int32)
    ex = {"image": ramp, "label": label, "spacing": np.array([0.5, 0.5], np.float32), "id": "x"}
    out = T.resize_example(ex, (16, 20), antialias=False)
    q = np.arange(20)
    expected = np.clip((q + 0.5) * w / 20 - 0.5, 0, w - 1)  # half-pixel centres, edge clamp
    np.testing.assert_allclose(out["image"][3, :, 0], expected, atol=1e-5)
    np.testing.assert_allclose(out["spacing"], [0.25, 0.25])
    assert out["label"].dtype == np.int32 and set(np.unique(out["label"])) == {0, 1}
    np.testing.assert_array_equal(out["label"][0], (q >= 10).astype(np.int32))  # nearest
    assert out["id"] == "x" and ex["image"].shape == (8, 10, 1)  # input untouched


def test_resize_downsample_scale_and_spacing():
    rng = np.random.default_rng(1)
    img = rng.random((60, 40, 3)).astype(np.float32)
    lab = rng.integers(0, 3, (60, 40)).astype(np.int32)
    ex = {"image": img, "label": lab, "spacing": np.array([1.0, 2.0], np.float32), "id": "y"}
    out = T.resize_example(ex, scale=0.5)
    assert out["image"].shape == (30, 20, 3) and out["label"].shape == (30, 20)
    np.testing.assert_allclose(out["spacing"], [2.0, 4.0])
    # block means of a smooth image ~ antialiased bilinear result (interior)
    const = {"image": np.full((60, 40, 1), 0.3, np.float32), "label": lab, "id": "c"}
    np.testing.assert_allclose(T.resize_example(const, (7, 9))["image"], 0.3, atol=1e-6)
    assert set(np.unique(out["label"])) <= {0, 1, 2}
    # the nearest label of output pixel (i, j) comes from its 2x2 source block
    blocks = lab.reshape(30, 2, 20, 2).transpose(0, 2, 1, 3).reshape(30, 20, 4)
    assert (blocks == out["label"][..., None]).any(-1).all()
    out2 = T.resize_example(ex, (45, 40))
    np.testing.assert_allclose(out2["spacing"], [60 / 45, 2.0], rtol=1e-6)


def test_pad_or_crop_to_center():
    img = np.arange(5 * 6, dtype=np.float32).reshape(5, 6, 1)
    lab = np.ones((5, 6), np.int32)
    ex = {"image": img, "label": lab, "spacing": np.ones(2, np.float32), "id": "p"}
    out = T.pad_or_crop_to(ex, (8, 4))
    assert out["image"].shape == (8, 4, 1) and out["label"].shape == (8, 4)
    np.testing.assert_array_equal(out["image"][1:6, :, 0], img[:, 1:5, 0])
    assert out["image"][0].sum() == 0 and out["image"][6:].sum() == 0
    np.testing.assert_array_equal(out["label"][:, 0], [0, 1, 1, 1, 1, 1, 0, 0])


def test_normalize_image():
    rng = np.random.default_rng(2)
    img = (rng.random((20, 30, 2)) * [10, 3] + [5, -1]).astype(np.float32)
    z = T.normalize_image(img, "zscore")
    np.testing.assert_allclose(z.mean(axis=(0, 1)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 1)), 1, atol=1e-5)
    m = T.normalize_image(img, "minmax")
    np.testing.assert_allclose(m.min(axis=(0, 1)), 0, atol=1e-6)
    np.testing.assert_allclose(m.max(axis=(0, 1)), 1, atol=1e-6)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:10] = True
    zm = T.normalize_image(img, "zscore", mask=mask)
    sel = img[mask]
    np.testing.assert_allclose(zm, (img - sel.mean(0)) / sel.std(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(T.normalize_image(img, "none"), img)
    np.testing.assert_array_equal(T.normalize_image(np.full((4, 4, 1), 3.0), "zscore"), 0)


# --------------------------------------------------------------------------------------------
# device
# --------------------------------------------------------------------------------------------


def _match_variant(x: np.ndarray, variants: list[np.ndarray]) -> int:
    hits = [i for i, v in enumerate(variants) if np.array_equal(x, v)]
    assert len(hits) == 1, "output is not exactly one of the expected variants"
    return hits[0]


def test_flips_match_numpy(batch):
    image, label = batch
    out_i, out_l = aug_jit(jax.random.key(0), image, label, config=_only(flip_axes=(0, 1)))
    out_i, out_l = np.asarray(out_i), np.asarray(out_l)
    combos = [(), (0,), (1,), (0, 1)]
    seen = set()
    for b in range(image.shape[0]):
        iv = [np.flip(image[b], c) if c else image[b] for c in combos]
        lv = [np.flip(label[b], c) if c else label[b] for c in combos]
        k = _match_variant(out_i[b], iv)
        assert np.array_equal(out_l[b], lv[k])  # same flip for image and label
        seen.add(k)
    assert seen == {0, 1, 2, 3}  # per-example randomness


def test_rot90_matches_numpy_and_skips_non_square(batch):
    image, label = batch
    out_i, out_l = aug_jit(jax.random.key(1), image, label, config=_only(rot90=True))
    seen = set()
    for b in range(image.shape[0]):
        iv = [np.rot90(image[b], k, axes=(0, 1)) for k in range(4)]
        k = _match_variant(np.asarray(out_i[b]), iv)
        np.testing.assert_array_equal(out_l[b], np.rot90(label[b], k, axes=(0, 1)))
        seen.add(k)
    assert seen == {0, 1, 2, 3}
    rect_i, rect_l = image[:, :, :10], label[:, :, :10]
    oi, ol = aug_jit(jax.random.key(1), rect_i, rect_l, config=_only(rot90=True))
    np.testing.assert_array_equal(oi, rect_i)
    np.testing.assert_array_equal(ol, rect_l)


def test_flips_3d():
    rng = np.random.default_rng(3)
    vol = rng.random((8, 5, 6, 7, 1)).astype(np.float32)
    lab = rng.integers(0, 3, (8, 5, 6, 7)).astype(np.int32)
    cfg = _only(flip_axes=(0, 1, 2))
    oi, ol = aug_jit(jax.random.key(5), vol, lab, config=cfg)
    combos = [tuple(a for a in range(3) if (m >> a) & 1) for m in range(8)]
    for b in range(8):
        k = _match_variant(np.asarray(oi[b]), [np.flip(vol[b], c) for c in combos])
        np.testing.assert_array_equal(ol[b], np.flip(lab[b], combos[k]))


def test_warp_affine_matches_scipy():
    rng = np.random.default_rng(4)
    img = rng.random((30, 26, 2)).astype(np.float32)
    lab = rng.integers(0, 3, (30, 26)).astype(np.int32)
    ang, scale = math.radians(17.0), 1.13
    c, s = math.cos(ang), math.sin(ang)
    matrix = np.array([[c, s], [-s, c]]) / scale
    centre = np.array([14.5, 12.5])
    offset = centre - matrix @ (centre + np.array([1.7, -2.3]))
    out = T.warp_affine(
        jnp.asarray(img), jnp.asarray(matrix), jnp.asarray(offset), order=1, channel_axis=True
    )
    for ch in range(2):
        ref = ndimage.affine_transform(
            img[..., ch], matrix, offset, order=1, mode="grid-constant", cval=0.0
        )
        np.testing.assert_allclose(out[..., ch], ref, atol=1e-5)
    out_l = T.warp_affine(jnp.asarray(lab), jnp.asarray(matrix), jnp.asarray(offset), order=0)
    ref_l = ndimage.affine_transform(lab, matrix, offset, order=0, mode="grid-constant")
    np.testing.assert_array_equal(out_l, ref_l)
    np.testing.assert_allclose(np.asarray(T.affine_matrix(2, ang, scale)), matrix, atol=1e-6)


def test_augment_affine_zoom_about_centre_matches_scipy():
    rng = np.random.default_rng(5)
    img = rng.random((3, 21, 17, 1)).astype(np.float32)
    lab = rng.integers(0, 3, (3, 21, 17)).astype(np.int32)
    cfg = _only(affine_prob=1.0, rotate_deg=0.0, scale_range=(1.25, 1.25), translate_frac=0.0)
    oi, ol = aug_jit(jax.random.key(7), img, lab, config=cfg)
    matrix = np.eye(2) / 1.25
    centre = np.array([10.0, 8.0])
    offset = centre - matrix @ centre
    for b in range(3):
        ref = ndimage.affine_transform(
            img[b, ..., 0], matrix, offset, order=1, mode="grid-constant"
        )
        np.testing.assert_allclose(oi[b, ..., 0], ref, atol=1e-5)
        ref_l = ndimage.affine_transform(lab[b], matrix, offset, order=0, mode="grid-constant")
        np.testing.assert_array_equal(ol[b], ref_l)


def test_gamma_matches_hand_formula():
    rng = np.random.default_rng(6)
    img = (rng.random((4, 9, 9, 2)) * 3 - 1).astype(np.float32)
    g = 0.7
    lo = img.min(axis=(1, 2), keepdims=True)
    hi = img.max(axis=(1, 2), keepdims=True)
    expected = lo + (hi - lo) * ((img - lo) / (hi - lo)) ** g
    np.testing.assert_allclose(T.adjust_gamma(jnp.asarray(img[0]), g), expected[0], atol=1e-5)
    cfg = _only(gamma_prob=1.0, gamma_range=(g, g))
    oi, _ = aug_jit(jax.random.key(0), img, None, config=cfg)
    np.testing.assert_allclose(oi, expected, atol=1e-5)
    const = np.full((5, 5, 1), 0.4, np.float32)
    np.testing.assert_array_equal(T.adjust_gamma(jnp.asarray(const), 2.0), const)


def test_intensity_scale_shift_is_affine_per_example():
    rng = np.random.default_rng(7)
    img = rng.random((6, 10, 10, 1)).astype(np.float32) + 0.5
    oi, _ = aug_jit(jax.random.key(2), img, None, config=_only(intensity_scale=0.2))
    ratio = np.asarray(oi) / img
    for b in range(6):
        np.testing.assert_allclose(ratio[b], ratio[b].flat[0], rtol=1e-5)
        assert 0.8 <= ratio[b].flat[0] <= 1.2
    oi, _ = aug_jit(jax.random.key(2), img, None, config=_only(intensity_shift=0.1))
    diff = np.asarray(oi) - img
    assert np.ptp(diff, axis=(1, 2, 3)).max() < 1e-5 and np.abs(diff).max() <= 0.1 + 1e-6
    assert len(np.unique(np.round(diff[:, 0, 0, 0], 6))) == 6


def test_identity_config_leaves_data_unchanged(batch):
    image, label = batch
    oi, ol = aug_jit(jax.random.key(3), image, label, config=NO_AUG)
    np.testing.assert_array_equal(oi, image)
    np.testing.assert_array_equal(ol, label)
    oi, ol = aug_jit(jax.random.key(3), image, label, config=_only(affine_prob=0.0))
    np.testing.assert_array_equal(oi, image)


def test_default_augment_keeps_classes_shapes_dtypes_and_jits():
    rng = np.random.default_rng(8)
    image = rng.random((8, 32, 32, 1)).astype(np.float32)
    classes = np.array([0, 3, 7], np.int32)
    label = classes[rng.integers(0, 3, (8, 32, 32))]
    cfg = dataclasses.replace(T.AugmentConfig(), affine_prob=1.0)
    oi, ol = aug_jit(jax.random.key(4), image, label, config=cfg)
    assert oi.shape == image.shape and oi.dtype == jnp.float32
    assert ol.shape == label.shape and ol.dtype == jnp.int32
    assert set(np.unique(ol).tolist()) <= {0, 3, 7}
    assert not np.array_equal(oi, image)
    # under jit: the same key reproduces, a different key differs
    oi2, _ = aug_jit(jax.random.key(4), image, label, config=cfg)
    np.testing.assert_array_equal(oi, oi2)
    oi3, _ = aug_jit(jax.random.key(9), image, label, config=cfg)
    assert not np.array_equal(oi, oi3)


def test_random_and_center_crop():
    b, h, w = 16, 10, 12
    image = np.arange(b * h * w, dtype=np.float32).reshape(b, h, w, 1)
    label = (image[..., 0] % 5).astype(np.int32)
    ci, cl = jax.jit(T.random_crop, static_argnames="size")(
        jax.random.key(0), image, label, size=(4, 5)
    )
    assert ci.shape == (b, 4, 5, 1) and cl.shape == (b, 4, 5)
    offsets = set()
    for i in range(b):
        flat = int(ci[i, 0, 0, 0]) - i * h * w  # unique values reveal the offset
        y0, x0 = divmod(flat, w)
        assert 0 <= y0 <= h - 4 and 0 <= x0 <= w - 5
        np.testing.assert_array_equal(ci[i], image[i, y0 : y0 + 4, x0 : x0 + 5])
        np.testing.assert_array_equal(cl[i], label[i, y0 : y0 + 4, x0 : x0 + 5])
        offsets.add((y0, x0))
    assert len(offsets) > 4
    ki, kl = T.center_crop(image, label, (4, 5))
    np.testing.assert_array_equal(ki, image[:, 3:7, 3:8])
    np.testing.assert_array_equal(kl, label[:, 3:7, 3:8])
    with pytest.raises(ValueError):
        T.random_crop(jax.random.key(0), image, label, (11, 5))
