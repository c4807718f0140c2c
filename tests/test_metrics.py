"""Tests for medjax.metrics against independent numpy / scipy / skimage references."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.special import ellipe
from skimage import draw
from skimage.measure import EllipseModel
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medjax import metrics

# =============================================================================================
# count-based metrics
# =============================================================================================


def ref_counts(pred, labels, c, mask=None):
    """Confusion counts by explicit voxel loops."""
    b = pred.shape[0]
    out = {k: np.zeros((b, c)) for k in ("tp", "fp", "fn", "tn")}
    for i in range(b):
        for v in itertools.product(*(range(s) for s in pred.shape[1:])):
            if mask is not None and not mask[(i, *v)]:
                continue
            p, g = pred[(i, *v)], labels[(i, *v)]
            for k in range(c):
                if p == k and g == k:
                    out["tp"][i, k] += 1
                elif p == k:
                    out["fp"][i, k] += 1
                elif g == k:
                    out["fn"][i, k] += 1
                else:
                    out["tn"][i, k] += 1
    return out


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_confusion_counts_match_loops(spatial):
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, size=(2, *spatial))
    labels = rng.integers(0, 3, size=(2, *spatial))
    mask = rng.random((2, *spatial)) > 0.25
    for m in (None, mask):
        got = jax.jit(metrics.confusion_counts, static_argnums=2)(pred, labels, 3, mask=m)
        ref = ref_counts(pred, labels, 3, m)
        for k in ref:
            assert got[k].shape == (2, 3)
            assert got[k].dtype == np.float32
            np.testing.assert_array_equal(got[k], ref[k])


def test_derived_metrics_hand_values():
    # One example, 3 classes, 8 voxels.
    labels = np.array([[0, 0, 0, 1, 1, 1, 2, 2]])
    pred = np.array([[0, 0, 1, 1, 1, 2, 2, 0]])
    # class 0: tp=2 fp=1 fn=1 tn=4 ; class 1: tp=2 fp=1 fn=1 tn=4 ; class 2: tp=1 fp=1 fn=1 tn=5
    m = metrics.segmentation_metrics(pred, labels, 3)
    np.testing.assert_allclose(m["dice"], [[4 / 6, 4 / 6, 2 / 4]], rtol=1e-6)
    np.testing.assert_allclose(m["iou"], [[2 / 4, 2 / 4, 1 / 3]], rtol=1e-6)
    np.testing.assert_allclose(m["sensitivity"], [[2 / 3, 2 / 3, 1 / 2]], rtol=1e-6)
    np.testing.assert_allclose(m["precision"], [[2 / 3, 2 / 3, 1 / 2]], rtol=1e-6)
    np.testing.assert_allclose(m["specificity"], [[4 / 5, 4 / 5, 5 / 6]], rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], [5 / 8], rtol=1e-6)


@pytest.mark.parametrize("spatial", [(7, 6), (4, 5, 3)])
def test_segmentation_metrics_random_vs_numpy(spatial):
    rng = np.random.default_rng(1)
    b, c = 3, 4
    labels = rng.integers(0, c, size=(b, *spatial))
    pred = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, c, labels.shape))
    mask = rng.random(labels.shape) > 0.2
    got = jax.jit(metrics.segmentation_metrics, static_argnums=2)(pred, labels, c, mask)
    for i in range(b):
        mi = mask[i]
        p, g = pred[i][mi], labels[i][mi]
        np.testing.assert_allclose(got["accuracy"][i], np.mean(p == g), rtol=1e-6)
        for k in range(c):
            ps, gs = p == k, g == k
            inter = np.sum(ps & gs)
            np.testing.assert_allclose(
                got["dice"][i, k], 2 * inter / (ps.sum() + gs.sum()), rtol=1e-6
            )
            np.testing.assert_allclose(got["iou"][i, k], inter / np.sum(ps | gs), rtol=1e-6)
            np.testing.assert_allclose(got["sensitivity"][i, k], inter / gs.sum(), rtol=1e-6)
            np.testing.assert_allclose(got["precision"][i, k], inter / ps.sum(), rtol=1e-6)
            np.testing.assert_allclose(
                got["specificity"][i, k], np.sum(~ps & ~gs) / np.sum(~gs), rtol=1e-6
            )


def test_empty_conventions_counts():
    # Example 0: class 2 absent in both; class 1 predicted but absent in gt.
    # Example 1: class 0 covers every voxel in gt (no negatives), class 2 missed.
    labels = np.array([[[0, 0], [0, 0]], [[0, 0], [0, 0]]])
    pred = np.array([[[0, 1], [0, 0]], [[0, 0], [0, 2]]])
    m = metrics.segmentation_metrics(pred, labels, 3)
    # both empty -> 1 ; exactly one empty -> 0
    assert m["dice"][0, 2] == 1.0 and m["iou"][0, 2] == 1.0
    assert m["dice"][0, 1] == 0.0 and m["iou"][0, 1] == 0.0
    assert m["dice"][1, 2] == 0.0 and m["iou"][1, 2] == 0.0
    # sensitivity NaN without gt positives (classes 1 and 2 in both examples)
    assert np.all(np.isnan(m["sensitivity"][:, 1:]))
    assert m["sensitivity"][0, 0] == 0.75
    # precision NaN when nothing predicted: class 2 in ex 0, class 1 in ex 1
    assert np.isnan(m["precision"][0, 2]) and np.isnan(m["precision"][1, 1])
    assert m["precision"][0, 1] == 0.0
    # specificity NaN when there are no negatives: class 0 (gt everywhere)... tn + fp = 0
    assert np.all(np.isnan(m["specificity"][:, 0]))
    assert m["specificity"][0, 1] == 0.75
    # fully masked example -> accuracy NaN, dice 1 (both empty)
    mask = np.zeros(labels.shape, bool)
    mask[1] = True
    m = metrics.segmentation_metrics(pred, labels, 3, mask=mask)
    assert np.isnan(m["accuracy"][0]) and m["accuracy"][1] == 0.75
    np.testing.assert_array_equal(m["dice"][0], [1.0, 1.0, 1.0])
    assert np.all(np.isnan(m["sensitivity"][0]))


def test_nanmean_helpers():
    x = np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, 5.0]])
    np.testing.assert_allclose(metrics.nanmean(x, axis=0), [1.0, np.nan, 4.0])
    np.testing.assert_allclose(metrics.nanmean(x, axis=1), [2.0, 5.0])
    np.testing.assert_allclose(metrics.nanmean(x), 3.0)
    np.testing.assert_allclose(jax.jit(metrics.nanmean)(x), 3.0)
    batches = [
        {"dice": np.array([[1.0, 0.5]]), "acc": np.array([0.5])},
        {"dice": np.array([[np.nan, 0.0], [0.0, 1.0]]), "acc": np.array([np.nan, 1.0])},
    ]
    agg = metrics.nanmean_metrics(batches)
    np.testing.assert_allclose(agg["dice"], [0.5, 0.5])
    np.testing.assert_allclose(agg["acc"], 0.75)
    agg = metrics.nanmean_metrics(batches[1], axis=None)
    np.testing.assert_allclose(agg["dice"], 1 / 3, rtol=1e-6)


# =============================================================================================
# surface distances
# =============================================================================================


def ref_boundary_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Foreground voxels with a face neighbour outside (zero padded), in physical coords."""
    mask = mask.astype(bool)
    padded = np.pad(mask, 1)
    interior = np.ones_like(mask)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    for ax in range(mask.ndim):
        for shift in (-1, 1):
            interior &= np.roll(padded, shift, axis=ax)[core]
    idx = np.argwhere(mask & ~interior)
    return idx * np.asarray(spacing, dtype=float)


def ref_surface(pred, gt, spacing, percentile=95.0):
    pp, gp = ref_boundary_points(pred, spacing), ref_boundary_points(gt, spacing)
    d = cdist(pp, gp)
    d_pg, d_gp = d.min(axis=1), d.min(axis=0)
    hd = max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile))
    hd_max = max(d_pg.max(), d_gp.max())
    msd = np.concatenate([d_pg, d_gp]).mean()
    return hd, hd_max, msd, d_pg.mean()


def _blob(rng, shape):
    from scipy import ndimage

    x = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    return x > np.quantile(x, 0.6)


@pytest.mark.parametrize(
    "shape,spacing",
    [((24, 30), (1.0, 1.0)), ((24, 30), (0.7, 1.9)), ((12, 14, 10), (2.5, 0.8, 1.1))],
)
def test_surface_distances_vs_bruteforce(shape, spacing):
    rng = np.random.default_rng(2)
    pred, gt = _blob(rng, shape), _blob(rng, shape)
    hd, hd_max, msd, asd = ref_surface(pred, gt, spacing)
    np.testing.assert_allclose(metrics.hausdorff_distance(pred, gt, spacing=spacing), hd)
    np.testing.assert_allclose(
        metrics.hausdorff_distance(pred, gt, spacing=spacing, percentile=None), hd_max
    )
    np.testing.assert_allclose(
        metrics.hausdorff_distance(pred, gt, spacing=spacing, percentile=100), hd_max
    )
    np.testing.assert_allclose(metrics.mean_surface_distance(pred, gt, spacing=spacing), msd)
    np.testing.assert_allclose(
        metrics.mean_surface_distance(pred, gt, spacing=spacing, symmetric=False), asd
    )
    hd50 = ref_surface(pred, gt, spacing, percentile=50.0)[0]
    np.testing.assert_allclose(
        metrics.hausdorff_distance(pred, gt, spacing=spacing, percentile=50.0), hd50
    )


@pytest.mark.parametrize("k", [1, 3])
def test_surface_distances_analytic_squares(k):
    # Same square shifted by k columns; column spacing 0.5 -> every distance <= k * 0.5,
    # and the max is exactly k * 0.5.
    a = np.zeros((40, 40), bool)
    a[10:30, 10:30] = True
    b = np.roll(a, k, axis=1)
    sp = (2.0, 0.5)
    assert metrics.hausdorff_distance(a, b, spacing=sp, percentile=None) == pytest.approx(k * 0.5)
    # Concentric squares: inner -> outer is exactly k everywhere; corners give k*sqrt(2).
    outer = np.zeros((40, 40), bool)
    outer[10:31, 10:31] = True
    inner = np.zeros_like(outer)
    inner[10 + k : 31 - k, 10 + k : 31 - k] = True
    msd = metrics.mean_surface_distance(inner, outer, symmetric=False)
    assert msd == pytest.approx(k)
    hd = metrics.hausdorff_distance(inner, outer, percentile=None)
    assert hd == pytest.approx(k * np.sqrt(2))
    # Symmetric MSD lies between k and k*sqrt(2); MSD is symmetric in its arguments.
    sym = metrics.mean_surface_distance(inner, outer)
    assert k < sym < k * np.sqrt(2)
    assert sym == pytest.approx(metrics.mean_surface_distance(outer, inner))


def test_surface_distances_analytic_discs():
    rr, cc = draw.disk((50, 50), 30, shape=(100, 100))
    big = np.zeros((100, 100), bool)
    big[rr, cc] = True
    rr, cc = draw.disk((50, 50), 26, shape=(100, 100))
    small = np.zeros_like(big)
    small[rr, cc] = True
    assert metrics.hausdorff_distance(big, small) == pytest.approx(4.0, abs=1.0)
    assert metrics.mean_surface_distance(big, small) == pytest.approx(4.0, abs=0.5)


def test_surface_distances_analytic_cubes():
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 2, axis=0)
    sp = (3.0, 1.0, 1.0)
    assert metrics.hausdorff_distance(a, b, spacing=sp, percentile=None) == pytest.approx(6.0)
    inner = np.zeros_like(a)
    inner[7:13, 7:13, 7:13] = True
    outer = np.zeros_like(a)
    outer[5:15, 5:15, 5:15] = True
    assert metrics.mean_surface_distance(inner, outer, symmetric=False) == pytest.approx(2.0)
    assert metrics.hausdorff_distance(inner, outer, percentile=None) == pytest.approx(
        2 * np.sqrt(3)
    )
    # identical masks -> 0
    assert metrics.hausdorff_distance(a, a, spacing=sp) == 0.0
    assert metrics.mean_surface_distance(a, a) == 0.0


def test_surface_distances_small_objects_far_from_border():
    # Objects far from the image border (exercises the bounding-box crop) and touching it.
    shape = (30, 40, 25)
    pred = np.zeros(shape, bool)
    gt = np.zeros(shape, bool)
    pred[12:15, 20:24, 10:12] = True
    gt[13:17, 22:23, 9:13] = True
    gt[0:2, 0:3, 0] = True
    sp = (1.2, 0.6, 2.0)
    hd, hd_max, msd, _ = ref_surface(pred, gt, sp)
    np.testing.assert_allclose(metrics.hausdorff_distance(pred, gt, spacing=sp), hd)
    np.testing.assert_allclose(
        metrics.hausdorff_distance(pred, gt, spacing=sp, percentile=None), hd_max
    )
    np.testing.assert_allclose(metrics.mean_surface_distance(pred, gt, spacing=sp), msd)


def test_surface_empty_conventions():
    empty = np.zeros((10, 10), bool)
    full = np.zeros((10, 10), bool)
    full[2:5, 2:5] = True
    assert metrics.hausdorff_distance(empty, empty) == 0.0
    assert metrics.mean_surface_distance(empty, empty) == 0.0
    assert np.isnan(metrics.hausdorff_distance(full, empty))
    assert np.isnan(metrics.hausdorff_distance(empty, full))
    assert np.isnan(metrics.mean_surface_distance(empty, full))
    assert np.isnan(metrics.mean_surface_distance(full, empty, symmetric=False))


def test_surface_metrics_per_class():
    labels = np.zeros((20, 20), int)
    labels[2:10, 2:10] = 1
    labels[12:18, 12:18] = 2
    pred = np.zeros_like(labels)
    pred[2:10, 4:12] = 1  # class 1 shifted by 2 columns, class 2 missed, class 3 absent in both
    sp = (1.0, 1.5)
    out = metrics.surface_metrics(pred, labels, 4, sp)
    assert out["hd95"].shape == (4,) and out["msd"].shape == (4,)
    hd, _, msd, _ = ref_surface(pred == 1, labels == 1, sp)
    np.testing.assert_allclose(out["hd95"][1], hd)
    np.testing.assert_allclose(out["msd"][1], msd)
    hd0, _, msd0, _ = ref_surface(pred == 0, labels == 0, sp)
    np.testing.assert_allclose([out["hd95"][0], out["msd"][0]], [hd0, msd0])
    assert np.isnan(out["hd95"][2]) and np.isnan(out["msd"][2])
    assert out["hd95"][3] == 0.0 and out["msd"][3] == 0.0


# =============================================================================================
# ellipse / head circumference
# =============================================================================================


def true_circumference(a, b):
    a, b = max(a, b), min(a, b)
    return 4 * a * ellipe(1 - (b / a) ** 2)


def _ellipse_mask(shape, cy, cx, ry, rx, rot):
    m = np.zeros(shape, bool)
    rr, cc = draw.ellipse(cy, cx, ry, rx, shape=shape, rotation=rot)
    m[rr, cc] = True
    return m


def _angle_of_axis(ry, rx, rot):
    """Major-axis angle (from +x toward +y, mod pi) of a skimage.draw.ellipse."""
    # skimage: the r_radius axis points along (dr, dc) = (cos rot, sin rot).
    if ry >= rx:
        dr, dc = np.cos(rot), np.sin(rot)
    else:
        dr, dc = -np.sin(rot), np.cos(rot)
    return np.arctan2(dr, dc) % np.pi


def _angle_diff(a, b):
    d = (a - b) % np.pi
    return min(d, np.pi - d)


ELLIPSES = [
    (100.0, 120.0, 70.0, 45.0, 0.0),
    (110.0, 100.0, 40.0, 80.0, 0.3),
    (128.5, 140.2, 90.0, 60.0, -1.1),
    (90.0, 95.0, 50.0, 48.0, 2.0),
]


@pytest.mark.parametrize("cy,cx,ry,rx,rot", ELLIPSES)
def test_fit_ellipse_recovers_parameters(cy, cx, ry, rx, rot):
    m = _ellipse_mask((240, 260), cy, cx, ry, rx, rot)
    fy, fx, a, b, ang = metrics.fit_ellipse(m)
    assert a >= b
    assert fy == pytest.approx(cy, abs=0.5) and fx == pytest.approx(cx, abs=0.5)
    assert a == pytest.approx(max(ry, rx), abs=1.0)
    assert b == pytest.approx(min(ry, rx), abs=1.0)
    if abs(ry - rx) > 10:
        assert _angle_diff(ang, _angle_of_axis(ry, rx, rot)) < 0.02
    assert metrics.ellipse_circumference(a, b) == pytest.approx(
        true_circumference(ry, rx), rel=0.01
    )
    # Compare with skimage's EllipseModel on the same boundary points (x, y order).
    pts = ref_boundary_points(m, (1.0, 1.0))
    model = EllipseModel.from_estimate(pts[:, ::-1])
    (mx, my), axes, theta = model.center, model.axis_lengths, model.theta
    assert fy == pytest.approx(my, abs=0.2) and fx == pytest.approx(mx, abs=0.2)
    np.testing.assert_allclose(sorted([a, b]), sorted(axes), atol=0.3)
    if abs(ry - rx) > 10:
        sk_major = theta if axes[0] >= axes[1] else theta + np.pi / 2
        assert _angle_diff(ang, sk_major % np.pi) < 0.02


def test_fit_ellipse_outline_and_distractor():
    # HC18 annotations are drawn outlines; a small spurious blob must be ignored.
    shape = (200, 220)
    m = np.zeros(shape, bool)
    rr, cc = draw.ellipse_perimeter(100, 110, 60, 80, orientation=0.0, shape=shape)
    m[rr, cc] = True
    m[5:9, 5:9] = True
    fy, fx, a, b, ang = metrics.fit_ellipse(m)
    assert (fy, fx) == (pytest.approx(100, abs=0.5), pytest.approx(110, abs=0.5))
    assert a == pytest.approx(80, abs=1.0) and b == pytest.approx(60, abs=1.0)
    assert _angle_diff(ang, 0.0) < 0.02


def test_head_circumference_anisotropic_spacing():
    # Physical semi-axes 12 mm (rows) x 9 mm (cols) drawn with 0.1 x 0.075 mm pixels.
    sy, sx = 0.1, 0.075
    m = _ellipse_mask((300, 300), 150, 150, 12 / sy, 9 / sx, 0.0)
    hc = metrics.head_circumference_mm(m, (sy, sx))
    assert hc == pytest.approx(true_circumference(12, 9), rel=0.01)
    fy, fx, a, b, ang = metrics.fit_ellipse(m, spacing=(sy, sx))
    assert a == pytest.approx(12, abs=0.1) and b == pytest.approx(9, abs=0.1)
    assert _angle_diff(ang, np.pi / 2) < 0.02
    # Isotropic scalar pixel size.
    m = _ellipse_mask((300, 300), 150, 150, 110, 80, 0.5)
    hc = metrics.head_circumference_mm(m, 0.15)
    assert hc == pytest.approx(true_circumference(110 * 0.15, 80 * 0.15), rel=0.01)


def test_head_circumference_empty_mask_is_nan():
    assert np.isnan(metrics.head_circumference_mm(np.zeros((50, 50), bool), 0.1))
    with pytest.raises(ValueError):
        metrics.fit_ellipse(np.zeros((50, 50), bool))


def test_ellipse_circumference_formulas():
    assert metrics.ellipse_circumference(3.0, 3.0) == pytest.approx(6 * np.pi, rel=1e-12)
    for a, b in [(10.0, 7.0), (5.0, 1.0), (80.0, 60.0)]:
        ref = true_circumference(a, b)
        assert metrics.ellipse_circumference(a, b) == pytest.approx(ref, rel=1e-6)
        assert metrics.ellipse_circumference(a, b, method="ramanujan1") == pytest.approx(
            ref, rel=1e-3
        )
    out = metrics.ellipse_circumference(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    np.testing.assert_allclose(out, [2 * np.pi, 4 * np.pi])


# =============================================================================================
# PSNR / SSIM
# =============================================================================================


@pytest.mark.parametrize("shape", [(2, 24, 20, 3), (2, 14, 16, 12, 1)])
def test_psnr_ssim_vs_skimage(shape):
    rng = np.random.default_rng(3)
    x = rng.random(shape).astype(np.float32)
    y = np.clip(x + 0.15 * rng.normal(size=shape), 0, 1).astype(np.float32)
    y[1] = 0.5 * y[1] + 0.2
    got_ssim = jax.jit(metrics.ssim, static_argnums=2)(x, y, 1.0)
    got_psnr = jax.jit(metrics.psnr, static_argnums=2)(x, y, 1.0)
    for i in range(shape[0]):
        ref = structural_similarity(
            x[i],
            y[i],
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        np.testing.assert_allclose(got_ssim[i], ref, rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(
            got_psnr[i], peak_signal_noise_ratio(x[i], y[i], data_range=1.0), rtol=1e-5
        )
    np.testing.assert_allclose(metrics.ssim(x, x, 1.0), 1.0, rtol=1e-5)


def test_summarize_columns_and_rows_skip_nans_and_count_them():
    cols = {"dice": [0.5, np.nan, 0.7], "hd95": [1.0, 2.0, 4.0], "none": [np.nan, np.nan]}
    out = metrics.summarize_columns(cols)
    assert out["dice"] == pytest.approx(0.6) and out["dice_n"] == 2
    assert out["hd95"] == pytest.approx(7 / 3) and "hd95_n" not in out
    assert np.isnan(out["none"]) and out["none_n"] == 0
    rows = [{"id": "a", "dice": 0.5, "ok": True}, {"id": "b", "dice": np.nan, "ok": False}]
    summary = metrics.summarize_rows(rows)
    assert summary == {"cases": 2, "dice": 0.5, "dice_n": 1}  # strings and flags skipped
