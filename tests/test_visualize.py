"""Pictures (medjax.visualize) against hand-computed pixel values and PIL."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medjax import visualize as vis

RED = [230, 25, 75]  # palette class 1
GREEN = [60, 180, 75]  # palette class 2


def _grey(rgb: np.ndarray) -> np.ndarray:
    """Checks the three channels are equal and returns one."""
    assert rgb.dtype == np.uint8 and rgb.shape[-1] == 3
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    return rgb[..., 0]


# ---------------------------------------------------------------------------------------------
# to_uint8
# ---------------------------------------------------------------------------------------------


def test_to_uint8_min_max_scaling_rounds_to_nearest():
    x = np.array([[0.0, 1.0], [2.0, 4.0]])
    out = vis.to_uint8(x)
    assert out.shape == (2, 2, 3)
    # x / 4 * 255 = 0, 63.75, 127.5, 255 -> nearest integers (half up).
    np.testing.assert_array_equal(_grey(out), [[0, 64], [128, 255]])
    # A trailing channel of 1 is the same picture; so is an integer input.
    np.testing.assert_array_equal(vis.to_uint8(x[..., None]), out)
    np.testing.assert_array_equal(vis.to_uint8(x.astype(np.int32)), out)


def test_to_uint8_explicit_window_clips():
    x = np.array([[0.0, 1.0], [2.0, 4.0]])
    np.testing.assert_array_equal(_grey(vis.to_uint8(x, lo=1.0, hi=3.0)), [[0, 0], [128, 255]])
    np.testing.assert_array_equal(_grey(vis.to_uint8(x, lo=-4.0)), [[128, 159], [191, 255]])


def test_to_uint8_rgb_uses_one_range_for_all_channels():
    x = np.array([[[0.0, 2.0, 4.0], [8.0, 6.0, 0.0]]])
    # / 8 * 255 + 0.5: 0 -> 0, 2 -> 64, 4 -> 128, 6 -> 191, 8 -> 255.
    np.testing.assert_array_equal(vis.to_uint8(x), [[[0, 64, 128], [255, 191, 0]]])


def test_to_uint8_nan_and_constant_images():
    x = np.array([[np.nan, 0.0], [1.0, 2.0]])
    np.testing.assert_array_equal(_grey(vis.to_uint8(x)), [[0, 0], [128, 255]])
    np.testing.assert_array_equal(vis.to_uint8(np.full((3, 2), 5.0)), np.zeros((3, 2, 3)))


def test_to_uint8_rejects_two_channels():
    with pytest.raises(ValueError, match=r"1 or 3 channels.*\(2, 2, 2\)"):
        vis.to_uint8(np.zeros((2, 2, 2)))


# ---------------------------------------------------------------------------------------------
# colorize / overlay
# ---------------------------------------------------------------------------------------------


def test_colorize():
    out = vis.colorize(np.array([[0, 1], [2, 9]]))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    # Class 0 is black; classes past the 8-colour palette wrap around (9 -> 1).
    np.testing.assert_array_equal(out, [[[0, 0, 0], RED], [GREEN, RED]])
    np.testing.assert_array_equal(vis.colorize(np.array([[3.0]])), [[[255, 225, 25]]])


def test_overlay_blends_only_foreground():
    image = np.array([[0.0, 1.0], [1.0, 0.0]])  # -> 0 / 255 grey
    label = np.array([[1, 0], [2, 0]])
    out = vis.overlay(image, label, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    # 0.5 * 0 + 0.5 * RED = (115, 12.5, 37.5) and 0.5 * 255 + 0.5 * GREEN = (157.5, 217.5, 165),
    # truncated; background pixels keep the grey value.
    np.testing.assert_array_equal(
        out, [[[115, 12, 37], [255, 255, 255]], [[157, 217, 165], [0, 0, 0]]]
    )
    out = vis.overlay(image, label, alpha=0.25)
    # 0.75 * 255 + 0.25 * RED = (248.75, 197.5, 210) on a white pixel.
    np.testing.assert_array_equal(vis.overlay(1 - image, label, alpha=0.25)[0, 0], [248, 197, 210])
    np.testing.assert_array_equal(out[0, 0], [57, 6, 18])  # 0.25 * RED on black


def test_overlay_rgb_image():
    image = np.zeros((1, 2, 3))
    image[0, 1] = [4.0, 0.0, 2.0]  # -> (255, 0, 128)
    out = vis.overlay(image, np.array([[0, 2]]), alpha=0.5)
    # (0.5 * 255 + 30, 0 + 90, 0.5 * 128 + 37.5) = (157.5, 90, 101.5)
    np.testing.assert_array_equal(out, [[[0, 0, 0], [157, 90, 101]]])


def test_overlay_shape_mismatch():
    with pytest.raises(
        ValueError, match=r"label shape \(2, 3\) does not match image shape \(2, 2\)"
    ):
        vis.overlay(np.zeros((2, 2)), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="does not match"):
        vis.overlay(np.zeros((2, 2)), np.zeros((2, 2, 1), int))


# ---------------------------------------------------------------------------------------------
# hstack / grid / segmentation_panel
# ---------------------------------------------------------------------------------------------


def test_hstack_pads_height_and_adds_white_gutters():
    a = np.full((2, 1, 3), 10, np.uint8)
    b = np.full((3, 2, 3), 20, np.uint8)
    out = vis.hstack([a, b], pad=1)
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    want = np.array([[10, 255, 20, 20], [10, 255, 20, 20], [0, 255, 20, 20]])
    np.testing.assert_array_equal(_grey(out), want)
    np.testing.assert_array_equal(vis.hstack([b]), b)  # one panel: no gutter
    assert vis.hstack([a, a, a]).shape == (2, 3 + 2 * 2, 3)  # default pad 2


def test_grid_layout():
    ims = [np.full((2, 2, 3), v, np.uint8) for v in (1, 2, 3)]
    out = vis.grid(ims, cols=2, pad=1)
    assert out.dtype == np.uint8 and out.shape == (5, 5, 3)
    want = np.array(
        [
            [1, 1, 255, 2, 2],
            [1, 1, 255, 2, 2],
            [255, 255, 255, 255, 255],
            [3, 3, 255, 255, 255],
            [3, 3, 255, 255, 255],
        ]
    )
    np.testing.assert_array_equal(_grey(out), want)
    # More columns than images: one row.
    np.testing.assert_array_equal(_grey(vis.grid(ims, pad=1)), [[1, 1, 255, 2, 2, 255, 3, 3]] * 2)
    np.testing.assert_array_equal(vis.grid(ims[:1]), ims[0])


def test_grid_errors():
    with pytest.raises(ValueError, match="at least one image"):
        vis.grid([])
    with pytest.raises(ValueError, match="one shape"):
        vis.grid([np.zeros((2, 2, 3), np.uint8), np.zeros((1, 1, 3), np.uint8)])
    with pytest.raises(ValueError, match="one shape"):
        vis.grid([np.zeros((2, 2, 3), np.uint8), np.zeros((3, 2, 3), np.uint8)])


def test_segmentation_panel():
    image = np.array([[0.0, 1.0], [1.0, 0.0]])
    truth = np.array([[1, 0], [0, 0]])
    pred = np.array([[0, 0], [0, 2]])
    out = vis.segmentation_panel(image, truth, pred)
    assert out.dtype == np.uint8 and out.shape == (2, 3 * 2 + 2 * 2, 3)
    grey = np.repeat(np.array([[0, 255], [255, 0]], np.uint8)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(out[:, 0:2], grey)
    np.testing.assert_array_equal(out[:, 2:4], 255)
    np.testing.assert_array_equal(out[:, 6:8], 255)
    truth_panel, pred_panel = out[:, 4:6].copy(), out[:, 8:10].copy()
    # Default alpha 0.45 on black: 0.45 * RED = (103.5, 11.25, 33.75),
    # 0.45 * GREEN = (27, 81, 33.75).
    np.testing.assert_array_equal(truth_panel[0, 0], [103, 11, 33])
    np.testing.assert_array_equal(pred_panel[1, 1], [27, 81, 33])
    truth_panel[0, 0] = grey[0, 0]
    pred_panel[1, 1] = grey[1, 1]
    np.testing.assert_array_equal(truth_panel, grey)
    np.testing.assert_array_equal(pred_panel, grey)


# ---------------------------------------------------------------------------------------------
# save_png
# ---------------------------------------------------------------------------------------------


def test_save_png_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = vis.save_png(tmp_path / "a" / "b" / "pic.png", rgb)
    assert path == tmp_path / "a" / "b" / "pic.png" and path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (7, 5)
        np.testing.assert_array_equal(np.asarray(im), rgb)
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    path = vis.save_png(str(tmp_path / "grey.png"), grey)
    with Image.open(path) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), grey)


def test_grid_uneven_pads_with_white_and_keeps_each_panel():
    a = np.zeros((4, 6, 3), np.uint8)
    b = np.full((5, 3, 3), 7, np.uint8)
    with pytest.raises(ValueError, match="one shape"):
        vis.grid([a, b], cols=1)
    g = vis.grid([a, b], cols=1, pad=2, uneven=True)
    assert g.shape == (5 + 2 + 5, 6, 3)
    np.testing.assert_array_equal(g[:4, :6], a)
    assert (g[4:7] == 255).all()  # padding below a, then the gutter
    np.testing.assert_array_equal(g[7:12, :3], b)
    assert (g[7:12, 3:] == 255).all()


def test_montage_and_sample_grid():
    vol = np.arange(4 * 5 * 10, dtype=np.float32).reshape(4, 5, 10)
    m = vis.montage(vol, num_slices=5)
    # slices at the centres of 5 blocks of 10: z = 1, 3, 5, 7, 9, on the volume's own scale
    lo, hi = vol.min(), vol.max()
    first = vis.to_uint8(vol[:, :, 1], lo=lo, hi=hi)
    np.testing.assert_array_equal(m[:, :5], first)
    assert m.shape == (4, 5 * 5 + 4 * 2, 3)
    imgs = np.linspace(-1, 1, 3 * 4 * 4).reshape(3, 4, 4, 1).astype(np.float32)
    g = vis.sample_grid(imgs, cols=3)
    assert g.shape == (4, 3 * 4 + 2 * 2, 3)
    assert g[0, 0, 0] == 0 and g[-1, -1, 0] == 255  # the fixed [-1, 1] scale
    v = vis.sample_grid(np.zeros((2, 4, 5, 10, 1), np.float32), num_slices=3)
    assert v.shape == (2 * 4 + 2, 3 * 5 + 2 * 2, 3)
