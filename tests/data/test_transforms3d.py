"""N-D host preprocessing in medjax.data.transforms: masked z-score, bounding boxes, resampling.

References are computed here with numpy (percentiles, mean, std, argwhere), scipy.ndimage.zoom and
skimage.transform.resize used directly, never with the functions under test.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.transform import resize

from medjax.data import transforms as T

# --------------------------------------------------------------------------------------------
# zscore_in_mask
# --------------------------------------------------------------------------------------------


def _ball_mask(shape: tuple[int, ...], radius: float) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    centre = (np.asarray(shape, np.float64) - 1) / 2
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return d2 <= radius**2


@pytest.mark.parametrize("shape", [(12, 10, 8), (20, 16)])
def test_zscore_in_mask_matches_numpy_reference(shape):
    rng = np.random.default_rng(0)
    mask = _ball_mask(shape, 0.4 * min(shape))
    # Two channels with different scales and heavy tails (so the clipping matters).
    image = np.stack(
        [rng.standard_t(2, shape) * 3 + 10, rng.exponential(5.0, shape) - 2], -1
    ).astype(np.float32)
    image[~mask] = 1000.0  # outside values must not touch the statistics
    out = T.zscore_in_mask(image, mask, clip_percentiles=(1.0, 99.0), outside=-7.5)
    assert out.dtype == np.float32 and out.shape == image.shape
    for c in range(2):
        inside = image[..., c][mask].astype(np.float64)
        lo, hi = np.percentile(inside, [1.0, 99.0])
        clipped = np.clip(inside, lo, hi)
        want = (clipped - clipped.mean()) / clipped.std()
        np.testing.assert_allclose(out[..., c][mask], want, rtol=1e-5, atol=1e-5)
        assert np.all(out[..., c][~mask] == -7.5)
        # The result has zero mean / unit std inside the mask.
        assert abs(out[..., c][mask].mean()) < 1e-5
        assert abs(out[..., c][mask].std() - 1) < 1e-5
    assert (image[~mask] == 1000.0).all()  # input untouched


def test_zscore_in_mask_without_mask_or_clipping():
    rng = np.random.default_rng(1)
    image = rng.normal(3.0, 2.0, (6, 7, 5, 1)).astype(np.float32)
    out = T.zscore_in_mask(image, None, clip_percentiles=None)
    x = image[..., 0].astype(np.float64)
    np.testing.assert_allclose(out[..., 0], (x - x.mean()) / x.std(), rtol=1e-5, atol=1e-5)


def test_zscore_in_mask_clips_outliers_before_the_statistics():
    # The values 1..99 plus one huge outlier: percentile clipping caps it.
    vals = np.concatenate([np.arange(1.0, 100.0), [1e6]]).astype(np.float32)
    image = vals.reshape(10, 10, 1)
    out = T.zscore_in_mask(image, None, clip_percentiles=(0.0, 98.0))
    cap = np.percentile(vals.astype(np.float64), 98.0)  # 98.02 by linear interpolation
    ref = np.minimum(vals.astype(np.float64), cap)
    np.testing.assert_allclose(out.ravel(), (ref - ref.mean()) / ref.std(), rtol=1e-5, atol=1e-5)
    assert out.max() < 2.0  # without clipping the outlier would be at ~10 sigma


def test_zscore_in_mask_constant_channel_is_only_shifted():
    image = np.full((4, 4, 4, 1), 5.0, np.float32)
    out = T.zscore_in_mask(image, np.ones((4, 4, 4), bool))
    np.testing.assert_array_equal(out, 0.0)


def test_zscore_in_mask_errors():
    image = np.zeros((4, 5, 6, 2), np.float32)
    with pytest.raises(ValueError, match="empty mask"):
        T.zscore_in_mask(image, np.zeros((4, 5, 6), bool))
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 5, 6\)"):
        T.zscore_in_mask(image, np.ones((4, 5), bool))
    bad = image.copy()
    bad[0, 0, 0, 1] = np.nan
    bad[1, 2, 3, :] = np.nan
    with pytest.raises(ValueError, match="2 NaN voxel"):
        T.zscore_in_mask(bad, None)
    with pytest.raises(ValueError, match="clip_percentiles"):
        T.zscore_in_mask(image + 1, None, clip_percentiles=(60, 40))


# --------------------------------------------------------------------------------------------
# foreground_bbox / crop_to_bbox / paste_into
# --------------------------------------------------------------------------------------------


def test_foreground_bbox_hand_values_margin_and_clipping():
    mask = np.zeros((10, 12, 8), bool)
    mask[3, 4, 5] = True
    mask[6, 9, 2] = True
    assert T.foreground_bbox(mask) == (slice(3, 7), slice(4, 10), slice(2, 6))
    assert T.foreground_bbox(mask, margin=2) == (slice(1, 9), slice(2, 12), slice(0, 8))
    assert T.foreground_bbox(mask, margin=(0, 5, 1)) == (slice(3, 7), slice(0, 12), slice(1, 7))
    with pytest.raises(ValueError, match="no foreground"):
        T.foreground_bbox(np.zeros((3, 3), bool))


def test_foreground_bbox_matches_argwhere_on_random_masks():
    rng = np.random.default_rng(2)
    for _ in range(20):
        shape = tuple(rng.integers(3, 12, size=rng.integers(2, 4)))
        mask = rng.random(shape) < 0.03
        if not mask.any():
            continue
        pts = np.argwhere(mask)
        lo, hi = pts.min(0), pts.max(0) + 1
        m = 1
        want = tuple(
            slice(max(0, int(a) - m), min(n, int(b) + m))
            for a, b, n in zip(lo, hi, shape, strict=True)
        )
        assert T.foreground_bbox(mask, margin=m) == want


def test_crop_and_paste_round_trip_with_channels():
    rng = np.random.default_rng(3)
    image = rng.random((9, 8, 7, 2)).astype(np.float32)
    mask = np.zeros((9, 8, 7), bool)
    mask[2:5, 3:7, 1:4] = True
    bbox = T.foreground_bbox(mask, margin=1)
    crop = T.crop_to_bbox(image, bbox)
    np.testing.assert_array_equal(crop, image[1:6, 2:8, 0:5])
    crop[...] = -1  # a copy, not a view
    assert image.min() >= 0
    back = T.paste_into((9, 8, 7), T.crop_to_bbox(image, bbox), bbox, fill=-3.0)
    assert back.shape == image.shape and back.dtype == np.float32
    np.testing.assert_array_equal(back[1:6, 2:8, 0:5], image[1:6, 2:8, 0:5])
    outside = np.ones((9, 8, 7), bool)
    outside[1:6, 2:8, 0:5] = False
    assert np.all(back[outside] == -3.0)
    # Full shape with the channel axis is accepted too; a label pastes without channels.
    assert T.paste_into(image.shape, crop, bbox).shape == image.shape
    lab = T.paste_into((9, 8, 7), np.ones((5, 6, 5), np.int32), bbox)
    assert lab.dtype == np.int32 and lab.sum() == 5 * 6 * 5
    with pytest.raises(ValueError, match="bbox size"):
        T.paste_into((9, 8, 7), np.ones((4, 6, 5)), bbox)
    with pytest.raises(ValueError, match="does not fit"):
        T.crop_to_bbox(image, (slice(0, 10), slice(0, 2), slice(0, 2)))


# --------------------------------------------------------------------------------------------
# resample_to_spacing
# --------------------------------------------------------------------------------------------


def test_resample_image_matches_skimage_and_scipy():
    rng = np.random.default_rng(4)
    image = ndimage.gaussian_filter(rng.random((14, 12, 9, 2)), (1, 1, 1, 0)).astype(np.float32)
    spacing, target = (1.0, 1.0, 2.5), (1.5, 0.8, 1.5)
    out, new_sp = T.resample_to_spacing(image, spacing, target, order=1)
    want_shape = (round(14 / 1.5), round(12 * 1.25), round(9 * 2.5 / 1.5))  # (9, 15, 15)
    assert out.shape == (*want_shape, 2) and out.dtype == np.float32
    np.testing.assert_allclose(new_sp, np.array(spacing) * (14, 12, 9) / np.array(want_shape))
    for c in range(2):
        ref = resize(
            image[..., c].astype(np.float64),
            want_shape,
            order=1,
            mode="edge",
            anti_aliasing=False,
            preserve_range=True,
        )
        np.testing.assert_allclose(out[..., c], ref, atol=1e-5)
    # Cubic: scipy zoom directly, channel by channel.
    out3, _ = T.resample_to_spacing(image, spacing, target, order=3)
    zoom = np.array(want_shape) / (14, 12, 9)
    for c in range(2):
        ref = ndimage.zoom(image[..., c], zoom, order=3, mode="nearest", grid_mode=True)
        np.testing.assert_allclose(out3[..., c], ref, atol=1e-5)


def test_resample_label_keeps_class_ids_and_undoes_onto_original_grid():
    lab = np.zeros((20, 18, 10), np.int32)
    lab[4:12, 5:9, 2:7] = 2
    lab[8:16, 10:15, 3:8] = 4
    out, new_sp = T.resample_to_spacing(lab, (1.0, 1.0, 3.0), 1.5, order=0)
    assert out.dtype == np.int32 and out.shape == (13, 12, 20)
    assert set(np.unique(out)) == {0, 2, 4}
    ref = resize(lab, (13, 12, 20), order=0, mode="edge", anti_aliasing=False, preserve_range=True)
    np.testing.assert_array_equal(out, ref)
    # Back onto the original grid with an exact shape: nearly the original (nearest twice).
    back, sp_back = T.resample_to_spacing(out, new_sp, None, order=0, shape=lab.shape)
    assert back.shape == lab.shape and set(np.unique(back)) <= {0, 2, 4}
    np.testing.assert_allclose(sp_back, (1.0, 1.0, 3.0), rtol=1e-6)
    assert (back == lab).mean() > 0.97


def test_resample_2d_identity_and_errors():
    img = np.arange(24, dtype=np.float64).reshape(4, 6, 1)
    same, sp = T.resample_to_spacing(img, (0.5, 0.5), (0.5, 0.5), order=1)
    np.testing.assert_array_equal(same, img)
    np.testing.assert_allclose(sp, 0.5)
    assert same.dtype == np.float32
    # Upsampling a 2D ramp by 2 with grid_mode: half-pixel centres, edge clamp.
    up, _ = T.resample_to_spacing(img, (1.0, 1.0), (0.5, 0.5), order=1)
    q = np.arange(12)
    np.testing.assert_allclose(up[0, :, 0], np.clip((q + 0.5) / 2 - 0.5, 0, 5), atol=1e-6)
    with pytest.raises(ValueError, match="spatial axes"):
        T.resample_to_spacing(img, (1.0,), 1.0, order=1)
    with pytest.raises(ValueError, match="positive"):
        T.resample_to_spacing(img, (1.0, 0.0), 1.0, order=1)
    with pytest.raises(ValueError, match="target_spacing or shape"):
        T.resample_to_spacing(img, (1.0, 1.0), None, order=1)
