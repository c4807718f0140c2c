"""Evaluation metrics for GANs and image-to-image translation (host-side numpy/scipy).

Every number below is defined precisely enough to be recomputed by hand. Inputs may be numpy or
JAX arrays; results are numpy arrays / Python floats. Report each distribution metric beside its
:func:`real_vs_real` baseline (the same metric between two random halves of the real set), which
shows the noise floor at the given sample size.

**Paired translation metrics** (:func:`translation_metrics`, e.g. MRI T1 -> T2 synthesis), per
example, for 2D ``[B, H, W, C]`` or 3D ``[B, X, Y, Z, C]`` images and an optional foreground mask
``m`` of shape ``[B, *spatial]`` (shared by the channels). The JAX functions
:func:`medjax.losses.l1_loss`, :func:`medjax.metrics.psnr` and :func:`medjax.metrics.ssim`
compute them (float32):

* ``mae = sum(m |pred - target|) / sum(m)`` over voxels and channels (plain mean without a mask).
* ``psnr = 10 log10(data_range^2 / mse)`` with ``mse`` the same masked mean of squared errors
  (``+inf`` for identical images, as skimage).
* ``ssim``: the SSIM map of Wang et al. (2004) as in ``skimage.metrics.structural_similarity(
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range)``,
  i.e. local statistics from an 11-tap Gaussian window (sigma 1.5, truncated at 3.5 sigma),
  ``K1 = 0.01``, ``K2 = 0.03``, computed on the WHOLE image per channel. The map is averaged over
  the voxels at least 5 voxels from every border (skimage's crop) and over the channels; with a
  mask, only over the cropped voxels inside the mask.

With a mask, an example with no foreground voxel (for SSIM: none in the cropped region) gets NaN.
``data_range`` defaults to 2.0, the range of generator outputs in ``[-1, 1]`` (tanh).

**Sliced Wasserstein distance** (:func:`swd`; Karras et al. 2018, "Progressive Growing of
GANs", Appendix D, and their ``metrics/sliced_wasserstein.py``) for 2D image sets
``[N, H, W, C]`` (for volumes, pass 2D slices):

1. Laplacian pyramid per image (:func:`laplacian_pyramid`): ``G_0 = image``,
   ``G_{l+1} = blur(G_l)[::2, ::2]`` with the separable binomial kernel ``[1, 4, 6, 4, 1] / 16``
   along H and W and scipy's ``mode="mirror"`` boundary (``d c b | a b c d | c b a``, OpenCV's
   ``BORDER_REFLECT_101``, as Karras' ``pyr_down``); ``up(G)`` puts ``G`` on the even pixels of a
   zero image of the finer size and applies ``4 * blur``. Levels ``L_l = G_l - up(G_{l+1})`` and,
   last, the low-pass ``G_{levels-1}``; ``G_0 = L_0 + up(L_1 + up(...))`` is exact.
   Sizes halve as ``ceil(n / 2)``. By default, as many levels are used as have
   ``min(H_l, W_l) >= 16`` (Karras: 16 px is the coarsest level); the returned keys name them.
2. Descriptors: from every image and level, ``patches_per_image`` patches of
   ``patch_size x patch_size`` pixels (all channels) whose centres are drawn uniformly among the
   positions where the patch fits inside the level, flattened to ``patch_size^2 * C`` numbers.
3. Per level and channel, the descriptors are standardised (subtract the mean, divide by the
   standard deviation over all descriptors and patch pixels). ``normalization="joint"`` (the
   default) pools the real and fake descriptors for these statistics, so a global intensity or
   contrast change of the fakes is measured; ``"separate"`` standardises each set with its own
   statistics, exactly as Karras' code (blind to such changes).
4. :func:`sliced_wasserstein`: for each of ``num_repeats`` repeats, ``num_projections`` random
   directions (standard normal, normalised to unit length) project both descriptor sets to 1-D;
   the 1-D Wasserstein-1 distance between the projected sets (with equal sizes: the mean
   absolute difference of the sorted values, Karras' formula; in general the integral of
   ``|F_real - F_fake|`` of the empirical CDFs, as ``scipy.stats.wasserstein_distance``) is
   averaged over directions and repeats.
5. ``swd_<H>x<W>`` per level (``<H>x<W>``: that level's size, finest first) and ``swd_mean``
   (their mean). Values are RAW distances; Karras' tables report ``SWD x 1e3``.

Randomness is from ``numpy.random.default_rng`` streams seeded with ``(seed, 0)`` (real patches),
``(seed, 1)`` (fake patches) and ``(seed, 2, level)`` (directions), so the real patch positions
do not depend on the fake set.

**Fréchet distance** (FID when the features are Inception-v3 pool3 activations; Heusel et al.
2017), from :func:`feature_statistics` (mean and ``np.cov(features, rowvar=False)``, ddof 1,
float64): ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` with ``scipy.linalg.sqrtm``.
As in pytorch-fid, when ``S1 S2`` is singular (scipy warns or the root is not finite) the root
is recomputed from ``(S1 + eps I)(S2 + eps I)``; the real part of the root is used and a
ValueError is raised if its diagonal has an imaginary part above 1e-3.

**Kernel inception distance** (Binkowski et al. 2018): the unbiased MMD^2 estimate with the
polynomial kernel ``k(x, y) = (x.y / F + 1)^degree`` (``F`` features, degree 3), on
``num_subsets`` pairs of random subsets of ``subset_size`` rows (drawn without replacement from
each set; the size is clipped to the smaller set):
``MMD^2 = sum_{i!=j} k(x_i, x_j) / (n (n-1)) + sum_{i!=j} k(y_i, y_j) / (n (n-1))
- 2 sum_{i,j} k(x_i, y_j) / n^2``. Returns the mean and the (population, ddof 0) standard
deviation over subsets. The estimate is unbiased and can be slightly negative.

**Trivial generator** (:func:`pixel_gaussian`): the baseline a GAN must beat from below, as
:func:`real_vs_real` bounds it from above. Each pixel and channel of its images is drawn
independently from a normal distribution with that pixel's mean and standard deviation over the
training images, then clipped to the generator's output range ``[-1, 1]``: it reproduces the mean
image and every pixel's spread, and nothing of the spatial structure.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal, TypeVar

import jax
import numpy as np
import scipy.linalg
from scipy import ndimage

from medjax import losses, metrics

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "kernel_inception_distance",
    "laplacian_pyramid",
    "pixel_gaussian",
    "pixel_moments",
    "real_vs_real",
    "reconstruct_laplacian_pyramid",
    "sliced_wasserstein",
    "swd",
    "translation_metrics",
]

ArrayLike = np.ndarray | jax.Array
T = TypeVar("T")

# =============================================================================================
# Paired image-translation metrics
# =============================================================================================


def translation_metrics(
    pred: ArrayLike,
    target: ArrayLike,
    mask: ArrayLike | None = None,
    data_range: float = 2.0,
) -> dict[str, np.ndarray]:
    """Per-example MAE, PSNR and SSIM of paired images (see the module docstring).

    Args:
      pred, target: ``[B, H, W, C]`` or ``[B, X, Y, Z, C]`` float images of equal shape (each
        spatial size >= 11 for SSIM).
      mask: optional ``[B, *spatial]`` bool/float foreground mask: MAE and PSNR are computed
        over the foreground only, SSIM on the whole image then averaged over the foreground.
      data_range: the images' dynamic range (2.0 for ``[-1, 1]``).

    Returns:
      ``{"mae": [B], "psnr": [B], "ssim": [B]}`` float64 numpy arrays; NaN for an example with
      an empty mask.
    """
    pred = np.asarray(pred, np.float32)
    target = np.asarray(target, np.float32)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
    if pred.ndim not in (4, 5):
        raise ValueError(f"expected [B, H, W, C] or [B, X, Y, Z, C] images, got shape {pred.shape}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != pred.shape[:-1]:
            raise ValueError(
                f"mask shape {mask.shape} must be the image shape without channels "
                f"{pred.shape[:-1]}"
            )
        mask = mask.astype(np.float32)
    mae = np.asarray(losses.l1_loss(pred, target, mask), np.float64)
    if mask is not None:
        # l1_loss follows the loss convention (0 for an empty mask); a metric reports NaN.
        mae = np.where(mask.reshape(mask.shape[0], -1).sum(axis=1) > 0, mae, np.nan)
    return {
        "mae": mae,
        "psnr": np.asarray(metrics.psnr(pred, target, data_range, mask), np.float64),
        "ssim": np.asarray(metrics.ssim(pred, target, data_range, mask=mask), np.float64),
    }


# =============================================================================================
# Laplacian pyramid and sliced Wasserstein distance
# =============================================================================================

_BINOMIAL_5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: np.ndarray) -> np.ndarray:
    """Separable ``[1, 4, 6, 4, 1] / 16`` blur of ``[N, H, W, C]`` along H and W (mirror mode)."""
    for axis in (1, 2):
        x = ndimage.convolve1d(x, _BINOMIAL_5, axis=axis, mode="mirror")
    return x


def _down(x: np.ndarray) -> np.ndarray:
    return _blur(x)[:, ::2, ::2]


def _up(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Upsamples ``x`` ``[N, ceil(H/2), ceil(W/2), C]`` to ``[N, H, W, C]`` (zeros + 4 * blur)."""
    z = np.zeros((x.shape[0], shape[0], shape[1], x.shape[3]), x.dtype)
    z[:, ::2, ::2] = x
    return 4.0 * _blur(z)


def _level_sizes(h: int, w: int, levels: int) -> list[tuple[int, int]]:
    sizes = [(h, w)]
    for _ in range(levels - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def _check_images(x: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must be [N, H, W, C] 2D images, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return x


def laplacian_pyramid(images: ArrayLike, levels: int) -> list[np.ndarray]:
    """Laplacian pyramid of ``[N, H, W, C]`` images (see the module docstring), float64.

    Args:
      images: ``[N, H, W, C]``.
      levels: number of levels (>= 1); level ``l`` has size ``ceil(H / 2^l) x ceil(W / 2^l)``,
        and the coarsest must be at least 2 x 2.

    Returns:
      ``levels`` arrays, finest first: band-pass levels ``G_l - up(G_{l+1})`` and, last, the
      low-pass ``G_{levels-1}``. :func:`reconstruct_laplacian_pyramid` inverts it.
    """
    x = _check_images(images, "images").astype(np.float64)
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    coarsest = _level_sizes(x.shape[1], x.shape[2], levels)[-1]
    if min(coarsest) < 2:
        raise ValueError(
            f"{levels} levels of a {x.shape[1]}x{x.shape[2]} image end at {coarsest}; "
            "the coarsest level must be at least 2x2"
        )
    pyramid = [x]
    for _ in range(levels - 1):
        g = pyramid[-1]
        coarse = _down(g)
        pyramid[-1] = g - _up(coarse, g.shape[1:3])
        pyramid.append(coarse)
    return pyramid


def reconstruct_laplacian_pyramid(pyramid: list[np.ndarray]) -> np.ndarray:
    """Collapses a :func:`laplacian_pyramid` back to the ``[N, H, W, C]`` images (float64)."""
    if not pyramid:
        raise ValueError("empty pyramid")
    x = np.asarray(pyramid[-1], np.float64)
    for level in pyramid[-2::-1]:
        level = np.asarray(level, np.float64)
        x = _up(x, level.shape[1:3]) + level
    return x


def _w1_sorted_equal(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """1-D W1 per row (direction) for equal-size samples: mean |sorted a - sorted b|."""
    pa.sort(axis=1)  # in place: the projections are temporaries
    pb.sort(axis=1)
    return np.mean(np.abs(pa - pb), axis=1, dtype=np.float64)


def _w1_cdf(pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """1-D W1 per row (direction) for any sample sizes: integral of |F_a - F_b|."""
    n, m = pa.shape[1], pb.shape[1]
    vals = np.concatenate([pa, pb], axis=1).astype(np.float64)
    order = np.argsort(vals, axis=1, kind="stable")
    vals = np.take_along_axis(vals, order, axis=1)
    from_a = order < n
    cdf_a = np.cumsum(from_a, axis=1)[:, :-1] / n
    cdf_b = np.cumsum(~from_a, axis=1)[:, :-1] / m
    return np.sum(np.abs(cdf_a - cdf_b) * np.diff(vals, axis=1), axis=1)


def sliced_wasserstein(
    a: ArrayLike,
    b: ArrayLike,
    *,
    num_projections: int = 512,
    num_repeats: int = 4,
    seed: int | np.random.Generator = 0,
) -> float:
    """Sliced Wasserstein-1 distance between two point sets ``a`` ``[n, D]`` and ``b`` ``[m, D]``.

    Mean over ``num_repeats * num_projections`` random unit directions (normalised standard
    normal draws, ``num_projections`` per repeat) of the 1-D Wasserstein-1 distance between the
    projections (see step 4 of the module docstring). Projections use float32 (as Karras),
    distances are accumulated in float64.

    Args:
      a, b: descriptor sets with the same ``D``.
      num_projections: directions per repeat.
      num_repeats: repeats (each draws fresh directions).
      seed: seed or ``numpy.random.Generator`` for the directions.

    Returns:
      The distance (raw, not scaled by 1e3).
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected [n, D] and [m, D] point sets, got {a.shape} and {b.shape}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError("sliced_wasserstein needs non-empty point sets")
    if num_projections < 1 or num_repeats < 1:
        raise ValueError("num_projections and num_repeats must be >= 1")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    w1 = _w1_sorted_equal if a.shape[0] == b.shape[0] else _w1_cdf
    # Directions in chunks so that the projected sets stay around 2^24 numbers.
    chunk = max(1, min(num_projections, (1 << 24) // (a.shape[0] + b.shape[0])))
    total = 0.0
    a_t, b_t = np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    for _ in range(num_repeats):
        dirs = rng.standard_normal((num_projections, a.shape[1]))
        dirs /= np.sqrt(np.sum(dirs * dirs, axis=1, keepdims=True))
        dirs = dirs.astype(np.float32)
        for start in range(0, num_projections, chunk):
            d = dirs[start : start + chunk]
            # [directions, points]: each direction's projections are contiguous for sorting.
            total += float(np.sum(w1(d @ a_t, d @ b_t)))
    return total / (num_repeats * num_projections)


def _descriptors(
    images: np.ndarray,
    levels: int,
    patches_per_image: int,
    patch_size: int,
    rng: np.random.Generator,
    batch: int = 64,
) -> list[np.ndarray]:
    """Random patch descriptors ``[N * patches_per_image, patch_size^2, C]`` per level (float32)."""
    half = patch_size // 2
    offsets = np.arange(-half, half + 1)
    out: list[list[np.ndarray]] = [[] for _ in range(levels)]
    for start in range(0, images.shape[0], batch):
        pyramid = laplacian_pyramid(images[start : start + batch], levels)
        for lvl, level in enumerate(pyramid):
            n, h, w, c = level.shape
            k = n * patches_per_image
            img = np.repeat(np.arange(n), patches_per_image)
            cy = rng.integers(half, h - half, size=k)
            cx = rng.integers(half, w - half, size=k)
            ys = (cy[:, None] + offsets)[:, :, None]
            xs = (cx[:, None] + offsets)[:, None, :]
            patches = level[img[:, None, None], ys, xs]  # [k, p, p, C]
            out[lvl].append(patches.reshape(k, patch_size * patch_size, c).astype(np.float32))
    return [np.concatenate(d, axis=0) for d in out]


def _channel_stats(*descs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean / std over all descriptors and patch pixels of the given sets."""
    count = sum(d.shape[0] * d.shape[1] for d in descs)
    mean = sum(d.sum(axis=(0, 1), dtype=np.float64) for d in descs) / count
    var = sum(((d - mean) ** 2).sum(axis=(0, 1), dtype=np.float64) for d in descs) / count
    std = np.sqrt(var)
    # A constant channel carries no information: leave it at zero rather than divide by zero.
    return mean, np.where(std > 0, std, 1.0)


def swd(
    real: ArrayLike,
    fake: ArrayLike,
    *,
    patches_per_image: int = 128,
    patch_size: int = 7,
    num_projections: int = 512,
    num_repeats: int = 4,
    seed: int = 0,
    levels: int | None = None,
    normalization: Literal["joint", "separate"] = "joint",
) -> dict[str, float]:
    """Multi-scale sliced Wasserstein distance between two image sets (Karras et al. 2018).

    See the module docstring for the exact recipe. Sets may differ in size; images must share
    ``H, W, C``.

    Args:
      real: ``[N, H, W, C]`` images.
      fake: ``[M, H, W, C]`` images.
      patches_per_image: patches drawn per image and level (Karras: 128).
      patch_size: odd patch side (Karras: 7).
      num_projections: random directions per repeat.
      num_repeats: repeats with fresh directions (Karras: 4).
      seed: seed of all random draws.
      levels: pyramid levels; ``None``: as many as keep ``min(H_l, W_l) >= 16`` (at least 1).
      normalization: ``"joint"`` (statistics over both sets) or ``"separate"`` (per set, as
        Karras' code).

    Returns:
      ``{"swd_<H>x<W>": value per level (finest first), ..., "swd_mean": mean over levels}``,
      raw distances (Karras report 1e3 times these).
    """
    real = _check_images(real, "real")
    fake = _check_images(fake, "fake")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(
            f"real images {real.shape[1:]} and fake images {fake.shape[1:]} must share H, W, C"
        )
    if patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be odd and positive, got {patch_size}")
    if patches_per_image < 1:
        raise ValueError(f"patches_per_image must be >= 1, got {patches_per_image}")
    if normalization not in ("joint", "separate"):
        raise ValueError(f"normalization must be 'joint' or 'separate', got {normalization!r}")
    h, w = real.shape[1:3]
    if levels is None:
        sizes = _level_sizes(h, w, max(1, int(np.ceil(np.log2(max(h, w)))) + 1))
        levels = max(1, sum(min(s) >= 16 for s in sizes))
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    sizes = _level_sizes(h, w, levels)
    if min(sizes[-1]) < max(patch_size, 2):
        raise ValueError(
            f"levels={levels} of a {h}x{w} image end at {sizes[-1]}, smaller than the "
            f"{patch_size}x{patch_size} patches"
        )
    desc_real = _descriptors(
        real, levels, patches_per_image, patch_size, np.random.default_rng([seed, 0])
    )
    desc_fake = _descriptors(
        fake, levels, patches_per_image, patch_size, np.random.default_rng([seed, 1])
    )
    out: dict[str, float] = {}
    for lvl, (dr, df) in enumerate(zip(desc_real, desc_fake, strict=True)):
        if normalization == "joint":
            mr, sr = _channel_stats(dr, df)
            mf, sf = mr, sr
        else:
            mr, sr = _channel_stats(dr)
            mf, sf = _channel_stats(df)
        a = ((dr - mr) / sr).astype(np.float32).reshape(dr.shape[0], -1)
        b = ((df - mf) / sf).astype(np.float32).reshape(df.shape[0], -1)
        value = sliced_wasserstein(
            a,
            b,
            num_projections=num_projections,
            num_repeats=num_repeats,
            seed=np.random.default_rng([seed, 2, lvl]),
        )
        out[f"swd_{sizes[lvl][0]}x{sizes[lvl][1]}"] = value
    out["swd_mean"] = float(np.mean(list(out.values())))
    return out


# =============================================================================================
# Feature-based distances: FID and KID
# =============================================================================================


def _check_features(x: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be [N, F] features, got shape {x.shape}")
    return x


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[F]`` and covariance ``[F, F]`` (``np.cov``, ddof 1) of ``[N, F]`` features."""
    f = _check_features(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(
    mu1: ArrayLike,
    sigma1: ArrayLike,
    mu2: ArrayLike,
    sigma2: ArrayLike,
    *,
    eps: float = 1e-6,
) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (the FID formula).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))``, with the
    pytorch-fid ``eps * I`` fallback for a singular product (see the module docstring).

    Args:
      mu1, mu2: ``[F]`` means.
      sigma1, sigma2: ``[F, F]`` covariances.
      eps: diagonal offset used only when the product is singular.

    Returns:
      The distance (float).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise ValueError(
            f"expected means [F] and covariances [F, F]; got {mu1.shape}, {sigma1.shape}, "
            f"{mu2.shape}, {sigma2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    if singular or not np.isfinite(covmean).all():
        offset = np.eye(f) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary component {imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int) -> float:
    """Unbiased MMD^2 of equal-size sets with ``k(a, b) = (a.b / F + 1)^degree``."""
    n, f = x.shape
    kxx = (x @ x.T / f + 1.0) ** degree
    kyy = (y @ y.T / f + 1.0) ** degree
    kxy = (x @ y.T / f + 1.0) ** degree
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within - 2.0 * kxy.mean())


def kernel_inception_distance(
    f1: ArrayLike,
    f2: ArrayLike,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel inception distance (unbiased polynomial-kernel MMD^2; Binkowski et al. 2018).

    Args:
      f1: ``[N1, F]`` features (e.g. of real images).
      f2: ``[N2, F]`` features (e.g. of generated images).
      num_subsets: number of random subset pairs.
      subset_size: rows per subset, clipped to ``min(N1, N2)``.
      degree: polynomial degree of ``k(x, y) = (x.y / F + 1)^degree``.
      seed: seed of the subset draws.

    Returns:
      ``(mean, std)`` of the MMD^2 estimates over the subsets (std with ddof 0).
    """
    x = _check_features(f1, "f1")
    y = _check_features(f2, "f2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"f1 has {x.shape[1]} features but f2 has {y.shape[1]}")
    n = min(subset_size, x.shape[0], y.shape[0])
    if n < 2:
        raise ValueError(f"KID needs subsets of at least 2 rows, got {n}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        xs = x[rng.choice(x.shape[0], n, replace=False)]
        ys = y[rng.choice(y.shape[0], n, replace=False)]
        values[s] = _polynomial_mmd2(xs, ys, degree)
    return float(values.mean()), float(values.std())


# =============================================================================================
# Baseline
# =============================================================================================


def real_vs_real(fn: Callable[[np.ndarray, np.ndarray], T], real: ArrayLike, seed: int = 0) -> T:
    """``fn(half1, half2)`` for two disjoint random halves of the real set: the noise floor.

    The rows of ``real`` (images ``[N, ...]`` or features ``[N, F]``) are shuffled with
    ``numpy.random.default_rng(seed).permutation`` and split into two halves of ``N // 2`` rows
    each (one row is left out when ``N`` is odd).

    Example: ``real_vs_real(lambda a, b: swd(a, b), real_images)``.
    """
    real = np.asarray(real)
    if real.ndim < 1 or real.shape[0] < 2:
        raise ValueError(f"need at least 2 real examples to split, got shape {real.shape}")
    perm = np.random.default_rng(seed).permutation(real.shape[0])
    half = real.shape[0] // 2
    return fn(real[perm[:half]], real[perm[half : 2 * half]])


def pixel_moments(
    images: ArrayLike, *, total: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(mean_p, std_p)`` (float64, ddof 0) of every pixel over ``images`` ``[N, *spatial,
    C]``. ``total`` sums a host array over the processes of a multi-host run when each holds
    some of the images (``medjax.parallel.process_sum``); the moments are then those of all of
    them (two passes: exact, not E[x^2] - E[x]^2)."""
    x = np.asarray(images, np.float64)
    if x.ndim < 2:
        raise ValueError(f"images must be [N, ...], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or Inf: the per-pixel statistics are undefined")
    tot = total or (lambda a: a)
    n = int(np.asarray(tot(np.asarray(x.shape[0], np.float64))))
    if n < 1:
        raise ValueError(f"images must be [N, ...] with N >= 1, got shape {x.shape}")
    mean = np.asarray(tot(x.sum(axis=0))) / n
    return mean, np.sqrt(np.asarray(tot(((x - mean) ** 2).sum(axis=0))) / n)


def pixel_gaussian(
    images: ArrayLike | tuple[np.ndarray, np.ndarray],
    n: int,
    *,
    seed: int = 0,
    clip: tuple[float, float] | None = (-1.0, 1.0),
) -> np.ndarray:
    """``n`` images from the trivial generator of ``images`` ``[N, *spatial, C]`` (see the
    module docstring): pixel ``p`` of every sample is ``mean_p + std_p * z`` with ``z`` standard
    normal (``numpy.random.default_rng(seed)``), independent across pixels and samples, ``mean_p``
    and ``std_p`` (ddof 0) taken over the ``N`` images (or given: a ``(mean, std)`` tuple of
    :func:`pixel_moments`); clipped to ``clip`` (None: not clipped). float32
    ``[n, *spatial, C]``."""
    mean, std = images if isinstance(images, tuple) else pixel_moments(images)
    z = np.random.default_rng(seed).standard_normal((int(n), *np.shape(mean)))
    out = mean + std * z
    if clip is not None:
        out = np.clip(out, clip[0], clip[1])
    return out.astype(np.float32)
