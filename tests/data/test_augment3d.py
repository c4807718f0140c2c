"""3D on-device augmentation (flips, in-plane rot90, affine, intensity, gamma) against numpy/scipy.

The volume task runs `transforms.augment_batch` inside its jitted train step on [B, X, Y, Z, C]
patches; these tests check each operation on 3D multi-channel volumes, and that the volume task's
own augmentation moves image and label together.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from medjax.configs import unet3d_brats
from medjax.data import transforms as T
from medjax.train.tasks import volume_segmentation

NO_AUG = T.AugmentConfig.identity()
aug_jit = jax.jit(T.augment_batch, static_argnames="config")


def _only(**kw) -> T.AugmentConfig:
    return dataclasses.replace(NO_AUG, **kw)


def _volumes(b=16, shape=(9, 9, 5), c=2, seed=0):
    rng = np.random.default_rng(seed)
    vol = rng.random((1, *shape, c)).astype(np.float32)
    lab = rng.integers(0, 4, (1, *shape)).astype(np.int32)
    return np.repeat(vol, b, 0), np.repeat(lab, b, 0)


def test_rot90_3d_is_in_plane_01_for_every_channel_and_label():
    vol, lab = _volumes()
    oi, ol = aug_jit(jax.random.key(11), vol, lab, config=_only(rot90=True))
    oi, ol = np.asarray(oi), np.asarray(ol)
    seen = set()
    for b in range(vol.shape[0]):
        variants = [np.rot90(vol[b], k, axes=(0, 1)) for k in range(4)]
        hits = [k for k, v in enumerate(variants) if np.array_equal(oi[b], v)]
        assert len(hits) == 1
        np.testing.assert_array_equal(ol[b], np.rot90(lab[b], hits[0], axes=(0, 1)))
        seen.add(hits[0])
    assert seen == {0, 1, 2, 3}
    # the slice axis (2) is never rotated into the plane: a non-square (0, 1) plane is skipped
    vol2, lab2 = _volumes(b=4, shape=(9, 7, 5))
    oi2, ol2 = aug_jit(jax.random.key(11), vol2, lab2, config=_only(rot90=True))
    np.testing.assert_array_equal(oi2, vol2)
    np.testing.assert_array_equal(ol2, lab2)


def test_flips_and_rot90_compose_like_numpy_in_3d():
    vol, lab = _volumes(b=24, shape=(8, 8, 6), c=3, seed=1)
    cfg = _only(flip_axes=(0, 1, 2), rot90=True)
    oi, ol = aug_jit(jax.random.key(3), vol, lab, config=cfg)
    oi, ol = np.asarray(oi), np.asarray(ol)
    combos = [tuple(a for a in range(3) if (m >> a) & 1) for m in range(8)]
    for b in range(vol.shape[0]):
        # augment_example flips first, then rotates
        cands = [
            (c, k, np.rot90(np.flip(vol[b], c) if c else vol[b], k, axes=(0, 1)))
            for c in combos
            for k in range(4)
        ]
        hits = [(c, k) for c, k, v in cands if np.array_equal(oi[b], v)]
        assert hits, f"example {b} is no flip/rot90 of its input"
        c, k = hits[0]
        np.testing.assert_array_equal(
            ol[b], np.rot90(np.flip(lab[b], c) if c else lab[b], k, (0, 1))
        )


def test_affine_3d_matches_scipy_affine_transform():
    """Rotation in plane (0, 1), zoom and shift of a 3D multi-channel volume vs scipy."""
    rng = np.random.default_rng(2)
    img = rng.random((14, 12, 10, 2)).astype(np.float32)
    lab = rng.integers(0, 3, (14, 12, 10)).astype(np.int32)
    ang, scale = math.radians(-11.0), 0.93
    c, s = math.cos(ang), math.sin(ang)
    matrix = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]) / scale
    centre = (np.array(img.shape[:3]) - 1) / 2
    offset = centre - matrix @ (centre + np.array([0.8, -1.1, 0.6]))
    out = T.warp_affine(
        jnp.asarray(img), jnp.asarray(matrix), jnp.asarray(offset), order=1, channel_axis=True
    )
    for ch in range(2):
        ref = ndimage.affine_transform(img[..., ch], matrix, offset, order=1, mode="grid-constant")
        np.testing.assert_allclose(out[..., ch], ref, atol=1e-5)
    out_l = T.warp_affine(jnp.asarray(lab), jnp.asarray(matrix), jnp.asarray(offset), order=0)
    ref_l = ndimage.affine_transform(lab, matrix, offset, order=0, mode="grid-constant")
    np.testing.assert_array_equal(out_l, ref_l)
    np.testing.assert_allclose(np.asarray(T.affine_matrix(3, ang, scale)), matrix, atol=1e-6)


def test_augment_zoom_3d_matches_scipy_for_image_and_label():
    rng = np.random.default_rng(4)
    img = rng.random((2, 11, 9, 7, 1)).astype(np.float32)
    lab = rng.integers(0, 3, (2, 11, 9, 7)).astype(np.int32)
    cfg = _only(affine_prob=1.0, rotate_deg=0.0, scale_range=(1.2, 1.2), translate_frac=0.0)
    oi, ol = aug_jit(jax.random.key(0), img, lab, config=cfg)
    matrix = np.eye(3) / 1.2
    centre = np.array([5.0, 4.0, 3.0])
    offset = centre - matrix @ centre
    for b in range(2):
        ref = ndimage.affine_transform(
            img[b, ..., 0], matrix, offset, order=1, mode="grid-constant"
        )
        np.testing.assert_allclose(oi[b, ..., 0], ref, atol=1e-5)
        ref_l = ndimage.affine_transform(lab[b], matrix, offset, order=0, mode="grid-constant")
        np.testing.assert_array_equal(ol[b], ref_l)


def test_gamma_and_intensity_3d_per_channel_hand_formula():
    rng = np.random.default_rng(5)
    img = (rng.random((3, 6, 5, 4, 2)) * 4 - 2).astype(np.float32)
    g = 1.2
    lo = img.min(axis=(1, 2, 3), keepdims=True)  # per example, per channel
    hi = img.max(axis=(1, 2, 3), keepdims=True)
    expected = lo + (hi - lo) * ((img - lo) / (hi - lo)) ** g
    oi, _ = aug_jit(jax.random.key(1), img, None, config=_only(gamma_prob=1.0, gamma_range=(g, g)))
    np.testing.assert_allclose(oi, expected, atol=1e-5)
    oi, _ = aug_jit(jax.random.key(1), img + 3.0, None, config=_only(intensity_scale=0.2))
    ratio = np.asarray(oi) / (img + 3.0)
    for b in range(3):  # one factor per example, shared by both channels
        np.testing.assert_allclose(ratio[b], ratio[b].flat[0], rtol=1e-5)


def test_volume_task_step_augmentation_moves_image_and_label_together():
    """The volume task's jitted augmentation on a [B, X, Y, Z, C] batch: geometric transforms
    applied to the image are applied identically to the label (a channel equal to the label
    stays equal to it), with the unet3d_brats config's own geometric settings."""
    config = unet3d_brats.get_config()
    with config.unlocked():
        config.augment.intensity_scale = 0.0
        config.augment.intensity_shift = 0.0
        config.augment.gamma_prob = 0.0
        config.augment.affine_prob = 0.0
    task = volume_segmentation.Task(config)
    assert task.augment is not None and task.augment.rot90 and len(task.augment.flip_axes) == 3
    rng = np.random.default_rng(6)
    shape = tuple(task.crop_size) if task.crop_size else (12, 12, 8)
    label = rng.integers(0, 4, (4, *shape)).astype(np.int32)
    noise = rng.random((4, *shape)).astype(np.float32)
    image = np.stack([label.astype(np.float32), noise], -1)
    aug = jax.jit(task.augment_batch)
    oi, ol = aug(jax.random.key(2), jnp.asarray(image), jnp.asarray(label))
    oi, ol = np.asarray(oi), np.asarray(ol)
    assert oi.shape == image.shape and ol.shape == label.shape
    np.testing.assert_array_equal(oi[..., 0], ol.astype(np.float32))
    assert not np.array_equal(ol, label)  # something happened
    # the noise channel moved with the label: it is a flip/rot90 of its input
    for b in range(4):
        assert sorted(oi[b, ..., 1].ravel()) == sorted(noise[b].ravel())
