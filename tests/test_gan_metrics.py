"""Tests for medjax.gan_metrics against closed forms, scipy, skimage and naive numpy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from medjax import gan_metrics as gm

# =============================================================================================
# Fréchet distance
# =============================================================================================


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    ref = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = gm.frechet_distance(m1, np.diag(s1), m2, np.diag(s2))
    assert got == pytest.approx(ref, rel=1e-10)
    # Rotating both covariances by the same orthogonal matrix leaves the distance unchanged.
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    rot = gm.frechet_distance(q @ m1, q @ np.diag(s1) @ q.T, q @ m2, q @ np.diag(s2) @ q.T)
    assert rot == pytest.approx(ref, rel=1e-8)


def test_feature_statistics_and_identical_fid():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5))
    mu, sigma = gm.feature_statistics(feats)
    centred = feats - feats.mean(axis=0)
    ref_sigma = sum(np.outer(c, c) for c in centred) / (len(feats) - 1)
    np.testing.assert_allclose(mu, feats.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-10)
    assert gm.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_rank_deficient_and_singular():
    # 3 samples of 6 features: rank-2 covariance, numerically (not exactly) singular product.
    rng = np.random.default_rng(2)
    mu, sigma = gm.feature_statistics(rng.normal(size=(3, 6)))
    assert gm.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    # An exactly singular product makes scipy warn: the root is recomputed from
    # (S + eps I)^2, whose root is S + eps I, so the distance becomes -2 * 3 * eps.
    s = np.diag([1.0, 0.0, 2.0])
    got = gm.frechet_distance(np.zeros(3), s, np.zeros(3), s, eps=1e-3)
    assert got == pytest.approx(-6e-3, rel=1e-6)


def test_frechet_bad_shapes():
    with pytest.raises(ValueError, match="covariances"):
        gm.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


# =============================================================================================
# KID
# =============================================================================================


def _naive_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
    n, f = x.shape
    k = lambda a, b: (float(np.dot(a, b)) / f + 1.0) ** degree
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("degree", [3, 2])
def test_kid_whole_set_vs_naive_loop(degree):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 4))
    y = rng.normal(size=(12, 4)) * 1.5 + 0.3
    mean, std = gm.kernel_inception_distance(x, y, num_subsets=1, subset_size=50, degree=degree)
    assert mean == pytest.approx(_naive_mmd2(x, y, degree), rel=1e-10)
    assert std == 0.0


def test_kid_subsets_clipped_and_separates_distributions():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(60, 8))
    b = rng.normal(size=(40, 8))
    c = rng.normal(size=(40, 8)) + 1.0
    same, same_std = gm.kernel_inception_distance(a, b, num_subsets=10, subset_size=1000)
    diff, _ = gm.kernel_inception_distance(a, c, num_subsets=10, subset_size=1000)
    assert same_std > 0  # subsets of 40 of the 60 rows of `a` differ
    assert abs(same) < 0.1 * diff
    with pytest.raises(ValueError, match="features"):
        gm.kernel_inception_distance(a, rng.normal(size=(10, 3)))


# =============================================================================================
# Laplacian pyramid (reference: scipy.ndimage.convolve with the 5x5 kernel, mode="mirror")
# =============================================================================================

K1 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
K2 = np.outer(K1, K1)[None, :, :, None]


def _ref_down(x):
    return ndimage.convolve(x, K2, mode="mirror")[:, ::2, ::2]


def _ref_up(x, shape):
    z = np.zeros((x.shape[0], *shape, x.shape[3]))
    z[:, ::2, ::2] = x
    return ndimage.convolve(z, 4 * K2, mode="mirror")


@pytest.mark.parametrize("hw", [(32, 32), (19, 22)])
def test_laplacian_pyramid_vs_scipy_and_exact_collapse(hw):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, *hw, 2))
    pyr = gm.laplacian_pyramid(x, 3)
    # Reference pyramid from the 2D kernel.
    g = [x]
    for _ in range(2):
        g.append(_ref_down(g[-1]))
    ref = [g[0] - _ref_up(g[1], hw), g[1] - _ref_up(g[2], g[1].shape[1:3]), g[2]]
    assert [p.shape for p in pyr] == [r.shape for r in ref]
    for p, r in zip(pyr, ref, strict=True):
        np.testing.assert_allclose(p, r, rtol=1e-12, atol=1e-12)
    # The low-pass of a 2-level pyramid is the blurred, decimated image.
    np.testing.assert_allclose(gm.laplacian_pyramid(x, 2)[1], _ref_down(x), atol=1e-12)
    # Collapsing (with the reference upsampling, and with the library's) gives the image back.
    collapsed = _ref_up(_ref_up(pyr[2], pyr[1].shape[1:3]) + pyr[1], hw) + pyr[0]
    np.testing.assert_allclose(collapsed, x, atol=1e-12)
    np.testing.assert_allclose(gm.reconstruct_laplacian_pyramid(pyr), x, atol=1e-12)


def test_laplacian_pyramid_bad_levels():
    with pytest.raises(ValueError, match="coarsest"):
        gm.laplacian_pyramid(np.zeros((1, 8, 8, 1)), 4)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        gm.laplacian_pyramid(np.zeros((8, 8, 1)), 2)


# =============================================================================================
# Sliced Wasserstein
# =============================================================================================


def test_sliced_wasserstein_1d_equals_scipy():
    # With one feature every unit direction is +-1, so SW = W1 exactly.
    rng = np.random.default_rng(6)
    a = rng.normal(size=(50, 1))
    b_eq = rng.exponential(size=(50, 1))
    b_ne = rng.exponential(size=(37, 1))
    for b in (b_eq, b_ne):
        ref = scipy.stats.wasserstein_distance(a[:, 0], b[:, 0])
        got = gm.sliced_wasserstein(a, b, num_projections=8, num_repeats=2)
        assert got == pytest.approx(ref, rel=1e-5)


def test_sliced_wasserstein_translation_expectation():
    # b = a + c: every projection is shifted by d.c, so SW = mean |d.c| over directions, whose
    # expectation for uniform unit d in D dims is |c| Gamma(D/2) / (sqrt(pi) Gamma((D+1)/2)).
    rng = np.random.default_rng(7)
    dim = 5
    a = rng.normal(size=(64, dim))
    c = rng.normal(size=dim)
    expected = (
        np.linalg.norm(c) * math.gamma(dim / 2) / (math.sqrt(math.pi) * math.gamma((dim + 1) / 2))
    )
    got = gm.sliced_wasserstein(a, a + c, num_projections=1024, num_repeats=4)
    assert got == pytest.approx(expected, rel=0.04)
    # Duplicating every row leaves the distribution unchanged (unequal-size path).
    assert gm.sliced_wasserstein(a, np.concatenate([a, a])) == pytest.approx(0.0, abs=1e-6)


def _smooth_images(rng, n, sigma, size=32):
    x = ndimage.gaussian_filter(rng.normal(size=(n, size, size, 1)), (0, sigma, sigma, 0))
    return (x / x.std()).astype(np.float32)


SWD_KW = dict(patches_per_image=32, num_projections=64, num_repeats=2)


def test_swd_separates_distributions_and_levels():
    rng = np.random.default_rng(8)
    real = _smooth_images(rng, 48, 1.5)
    other = _smooth_images(rng, 48, 1.5)
    noise = _smooth_images(rng, 48, 0.5)
    self_d = gm.swd(real, real, **SWD_KW)
    assert list(self_d) == ["swd_32x32", "swd_16x16", "swd_mean"]
    same = gm.swd(real, other, **SWD_KW)
    half = gm.real_vs_real(lambda a, b: gm.swd(a, b, **SWD_KW), real)
    diff = gm.swd(real, noise, **SWD_KW)
    for key in ("swd_32x32", "swd_16x16"):
        assert max(self_d[key], same[key], half[key]) < 0.3 * diff[key], key
    assert same["swd_mean"] == pytest.approx((same["swd_32x32"] + same["swd_16x16"]) / 2)


def test_swd_intensity_shift_joint_vs_separate():
    rng = np.random.default_rng(9)
    real = _smooth_images(rng, 32, 1.5)
    base = gm.swd(real, real, **SWD_KW)
    shifted = gm.swd(real, real + 0.5, **SWD_KW)
    # The band-pass level ignores a constant offset; the low-pass level measures it.
    assert shifted["swd_32x32"] == pytest.approx(base["swd_32x32"], rel=1e-4)
    assert shifted["swd_16x16"] > 5 * base["swd_16x16"]
    # Karras' per-set standardisation is blind to it at every level.
    sep_base = gm.swd(real, real, normalization="separate", **SWD_KW)
    sep = gm.swd(real, real + 0.5, normalization="separate", **SWD_KW)
    for key in sep:
        assert sep[key] == pytest.approx(sep_base[key], rel=1e-4)
    # A contrast change is seen by the band-pass level too (joint normalisation).
    assert gm.swd(real, 2 * real, **SWD_KW)["swd_32x32"] > 5 * base["swd_32x32"]


def test_swd_levels_and_errors():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(4, 33, 20, 1))
    y = rng.normal(size=(6, 33, 20, 1))
    # 33x20 -> 17x10: only the first level is >= 16 px on both sides.
    assert list(gm.swd(x, y, **SWD_KW)) == ["swd_33x20", "swd_mean"]
    assert list(gm.swd(x, y, levels=2, **SWD_KW)) == ["swd_33x20", "swd_17x10", "swd_mean"]
    with pytest.raises(ValueError, match="patches"):
        gm.swd(x, y, levels=3, **SWD_KW)
    with pytest.raises(ValueError, match="share H, W, C"):
        gm.swd(x, rng.normal(size=(4, 32, 20, 1)))


def test_real_vs_real_halves():
    real = np.arange(7)[:, None]
    a, b = gm.real_vs_real(lambda p, q: (p, q), real, seed=3)
    assert a.shape == b.shape == (3, 1)
    assert not set(a[:, 0]) & set(b[:, 0])


def test_pixel_gaussian_moments_independence_and_clip():
    rng = np.random.default_rng(11)
    train = 0.5 * _smooth_images(rng, 64, 2.0) + np.linspace(-0.3, 0.3, 32)[None, :, None, None]
    x = gm.pixel_gaussian(train, 4000, seed=5, clip=None)
    assert x.shape == (4000, 32, 32, 1) and x.dtype == np.float32
    std = train.std(axis=0)
    se = std / math.sqrt(4000)  # standard error of each pixel's sample mean
    assert np.all(np.abs(x.mean(0) - train.mean(0)) < 5 * se + 1e-6)
    np.testing.assert_allclose(x.std(0), std, rtol=0.1)

    # neighbouring pixels: strongly correlated in the training images, independent in the samples
    def neighbour_corr(a):
        return np.corrcoef(a[:, 10, 10, 0], a[:, 10, 11, 0])[0, 1]

    assert neighbour_corr(train) > 0.5 and abs(neighbour_corr(x)) < 0.1
    # the default clips the same draws to [-1, 1]
    clipped = gm.pixel_gaussian(train, 4000, seed=5)
    np.testing.assert_array_equal(clipped, np.clip(x, -1, 1))
    with pytest.raises(ValueError, match="NaN"):
        gm.pixel_gaussian(np.full((2, 4, 4, 1), np.nan), 1)


def test_pixel_gaussian_is_far_from_real_structured_images():
    rng = np.random.default_rng(12)
    real = _smooth_images(rng, 96, 1.5)
    train, a, b = real[:32], real[32:64], real[64:]
    trivial = gm.pixel_gaussian(train, 32, seed=0, clip=None)
    assert gm.swd(trivial, b, **SWD_KW)["swd_mean"] > 3 * gm.swd(a, b, **SWD_KW)["swd_mean"]


# =============================================================================================
# Translation metrics (reference: skimage / numpy)
# =============================================================================================

SK = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


def _pair(shape, seed):
    rng = np.random.default_rng(seed)
    target = rng.uniform(-1, 1, shape).astype(np.float32)
    pred = np.clip(target + 0.2 * rng.normal(size=shape), -1, 1).astype(np.float32)
    return pred, target


def _sk_ssim_map(p, t):
    """skimage's full SSIM map per channel, ``[*spatial, C]``."""
    maps = [
        structural_similarity(t[..., c], p[..., c], data_range=2.0, full=True, **SK)[1]
        for c in range(p.shape[-1])
    ]
    return np.stack(maps, axis=-1)


@pytest.mark.parametrize("shape", [(2, 24, 20, 2), (2, 14, 13, 12, 1)])
def test_translation_metrics_vs_skimage(shape):
    pred, target = _pair(shape, 11)
    got = gm.translation_metrics(pred, target)
    for i in range(shape[0]):
        assert got["mae"][i] == pytest.approx(np.mean(np.abs(pred[i] - target[i])), rel=1e-5)
        ref_psnr = peak_signal_noise_ratio(target[i], pred[i], data_range=2.0)
        assert got["psnr"][i] == pytest.approx(ref_psnr, rel=1e-5)
        ref_ssim = structural_similarity(target[i], pred[i], data_range=2.0, channel_axis=-1, **SK)
        assert got["ssim"][i] == pytest.approx(ref_ssim, rel=2e-4, abs=1e-5)


@pytest.mark.parametrize("shape", [(2, 24, 20, 2), (2, 14, 13, 12, 1)])
def test_translation_metrics_masked_vs_skimage(shape):
    pred, target = _pair(shape, 12)
    rng = np.random.default_rng(13)
    spatial = shape[1:-1]
    mask = ndimage.gaussian_filter(rng.normal(size=(shape[0], *spatial)), 2) > 0
    mask[1] = False  # example 1: foreground only near one border
    mask[1][(slice(0, 7),) * len(spatial)] = True
    got = gm.translation_metrics(pred, target, mask)
    pad = 5
    crop = tuple(slice(pad, n - pad) for n in spatial)
    for i in range(shape[0]):
        m = mask[i]
        sel = np.broadcast_to(m[..., None], pred[i].shape)
        assert got["mae"][i] == pytest.approx(np.abs(pred[i] - target[i])[sel].mean(), rel=1e-5)
        ref_psnr = peak_signal_noise_ratio(target[i][sel], pred[i][sel], data_range=2.0)
        assert got["psnr"][i] == pytest.approx(ref_psnr, rel=1e-5)
        smap = _sk_ssim_map(pred[i], target[i])[crop]
        msel = np.broadcast_to(m[crop][..., None], smap.shape)
        assert got["ssim"][i] == pytest.approx(smap[msel].mean(), rel=2e-4, abs=1e-5)


def test_translation_metrics_masked_by_hand_and_empty():
    target = np.zeros((2, 11, 11, 1), np.float32)
    pred = np.zeros((2, 11, 11, 1), np.float32)
    pred[0, 1, 1, 0] = 0.3
    pred[0, 2, 2, 0] = -0.6
    pred[0, 5, 5, 0] = 1.0  # outside the mask
    mask = np.zeros((2, 11, 11), bool)
    mask[0, 1, 1] = mask[0, 2, 2] = mask[0, 3, 3] = True
    got = gm.translation_metrics(pred, target, mask, data_range=2.0)
    assert got["mae"][0] == pytest.approx((0.3 + 0.6 + 0.0) / 3, rel=1e-6)
    mse = (0.09 + 0.36 + 0.0) / 3
    assert got["psnr"][0] == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-5)
    # Example 1 has an empty mask: every metric is NaN.
    assert np.isnan(got["mae"][1]) and np.isnan(got["psnr"][1]) and np.isnan(got["ssim"][1])
    with pytest.raises(ValueError, match="mask shape"):
        gm.translation_metrics(pred, target, mask[..., None])
