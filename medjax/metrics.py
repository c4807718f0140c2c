"""Segmentation, surface-distance, ellipse (HC18) and image-quality metrics.

Four families live here:

1. **Count-based segmentation metrics** (jit-able JAX, 2D and 3D). ``pred`` and ``labels`` are
   integer class maps ``[B, *spatial]``; an optional ``mask`` ``[B, *spatial]`` excludes voxels
   where it is False. :func:`confusion_counts` returns per-example, per-class ``tp``, ``fp``,
   ``fn``, ``tn`` of shape ``[B, C]`` (float32, accumulated exactly in int32 first), and
   :func:`dice`, :func:`iou`, :func:`sensitivity`, :func:`specificity`, :func:`precision`
   (``[B, C]``) and :func:`accuracy` (``[B]``) are derived from them. Values outside
   ``[0, num_classes)`` one-hot encode to "no class"; mask them out explicitly.

   Empty-set conventions (per example and class):

   * Dice and IoU are **1.0** when both the ground truth and the prediction are empty for the
     class (``tp + fp + fn == 0``), and **0.0** when exactly one of them is empty.
   * Sensitivity (recall) ``tp / (tp + fn)`` is **NaN** when the ground truth has no positives.
   * Specificity ``tn / (tn + fp)`` is **NaN** when there are no negatives.
   * Precision ``tp / (tp + fp)`` is **NaN** when nothing is predicted positive.
   * Accuracy is **NaN** for an example whose voxels are all masked out.

   Aggregate with :func:`nanmean` / :func:`nanmean_metrics`, which skip NaNs (and return NaN
   only when every entry is NaN).

2. **Surface distances** (host-side numpy/scipy, not jit-able) for binary N-D masks:
   :func:`hausdorff_distance` (HD95 by default), :func:`mean_surface_distance` and the per-class
   wrapper :func:`surface_metrics`. The surface of a mask is ``mask & ~binary_erosion(mask)``
   with **face connectivity** (scipy's default structuring element, which is what MONAI's
   ``get_mask_edges`` uses) and zero padding, so foreground voxels on the image border belong to
   the surface. Distances are Euclidean in physical units, from
   ``scipy.ndimage.distance_transform_edt(~surface, sampling=spacing)`` (anisotropic ``spacing``
   honoured). HD-percentile follows **MONAI's definition**:
   ``max(percentile(d(pred -> gt), q), percentile(d(gt -> pred), q))`` with numpy's linear
   interpolation. Conventions: both masks empty -> **0.0**; exactly one empty -> **NaN** (MONAI
   returns nan or inf there).

3. **Ellipse fitting / head circumference** (HC18, numpy): :func:`fit_ellipse` (Fitzgibbon et al.
   1999 direct least squares in the numerically stable form of Halir & Flusser 1998),
   :func:`ellipse_circumference` (Ramanujan) and :func:`head_circumference_mm`.

4. **Image quality** (jit-able JAX): :func:`psnr` and :func:`ssim` (skimage-compatible Gaussian
   SSIM), per example, optionally averaged over a foreground ``mask`` only.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

Array = jax.Array

__all__ = [
    "accuracy",
    "classification_scores",
    "confusion_counts",
    "dice",
    "ellipse_circumference",
    "fit_ellipse",
    "hausdorff_distance",
    "head_circumference_mm",
    "iou",
    "mean_over_regions",
    "mean_surface_distance",
    "nanmean",
    "nanmean_metrics",
    "precision",
    "psnr",
    "region_scores",
    "roc_auc",
    "segmentation_metrics",
    "sensitivity",
    "specificity",
    "ssim",
    "summarize_columns",
    "summarize_rows",
    "surface_metrics",
]

Counts = Mapping[str, Array]


# =============================================================================================
# Count-based metrics
# =============================================================================================


@functools.partial(jax.jit, static_argnames=("num_classes",))
def confusion_counts(
    pred: Array, labels: Array, num_classes: int, *, mask: Array | None = None
) -> dict[str, Array]:
    """Per-example, per-class confusion counts of two integer class maps.

    Args:
      pred: ``[B, *spatial]`` integer predicted class map (e.g. ``argmax`` of the logits).
      labels: ``[B, *spatial]`` integer ground-truth class map.
      num_classes: number of classes ``C`` (static).
      mask: optional ``[B, *spatial]`` bool/float; voxels where it is False/0 are not counted.
        A float mask is thresholded at ``> 0`` (counts stay integers).

    Returns:
      dict with keys ``tp``, ``fp``, ``fn``, ``tn``, each ``[B, C]`` float32. For class ``c``,
      ``tp`` counts voxels with ``pred == c`` and ``labels == c``, ``fp`` those with
      ``pred == c != labels``, ``fn`` those with ``labels == c != pred``, and ``tn`` the rest of
      the unmasked voxels.
    """
    pred = jnp.asarray(pred)
    labels = jnp.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"pred shape {pred.shape} != labels shape {labels.shape}")
    p = jax.nn.one_hot(pred, num_classes, dtype=jnp.int32)
    g = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32)
    if mask is None:
        valid = jnp.ones(pred.shape, jnp.int32)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != pred.shape:
            raise ValueError(f"mask shape {mask.shape} != pred shape {pred.shape}")
        valid = (mask > 0).astype(jnp.int32)
    valid_c = valid[..., None]
    axes = tuple(range(1, pred.ndim))
    tp = jnp.sum(p * g * valid_c, axis=axes)
    pred_pos = jnp.sum(p * valid_c, axis=axes)
    gt_pos = jnp.sum(g * valid_c, axis=axes)
    total = jnp.sum(valid, axis=axes)[:, None]
    fp = pred_pos - tp
    fn = gt_pos - tp
    tn = total - tp - fp - fn
    f32 = lambda x: x.astype(jnp.float32)
    return {"tp": f32(tp), "fp": f32(fp), "fn": f32(fn), "tn": f32(tn)}


def _ratio(num: Array, den: Array, empty_value: float) -> Array:
    """``num / den`` with ``empty_value`` where ``den == 0`` (no NaN warnings, jit-able)."""
    num = jnp.asarray(num, jnp.float32)
    den = jnp.asarray(den, jnp.float32)
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, num / safe, jnp.float32(empty_value))


def dice(counts: Counts) -> Array:
    """Dice ``2 tp / (2 tp + fp + fn)``, ``[B, C]``; 1.0 if gt and prediction are both empty."""
    return _ratio(2.0 * counts["tp"], 2.0 * counts["tp"] + counts["fp"] + counts["fn"], 1.0)


def iou(counts: Counts) -> Array:
    """Jaccard ``tp / (tp + fp + fn)``, ``[B, C]``; 1.0 if gt and prediction are both empty."""
    return _ratio(counts["tp"], counts["tp"] + counts["fp"] + counts["fn"], 1.0)


def sensitivity(counts: Counts) -> Array:
    """Sensitivity / recall ``tp / (tp + fn)``, ``[B, C]``; NaN if the gt has no positives."""
    return _ratio(counts["tp"], counts["tp"] + counts["fn"], jnp.nan)


def specificity(counts: Counts) -> Array:
    """Specificity ``tn / (tn + fp)``, ``[B, C]``; NaN if there are no negatives."""
    return _ratio(counts["tn"], counts["tn"] + counts["fp"], jnp.nan)


def precision(counts: Counts) -> Array:
    """Precision ``tp / (tp + fp)``, ``[B, C]``; NaN if nothing is predicted positive."""
    return _ratio(counts["tp"], counts["tp"] + counts["fp"], jnp.nan)


def accuracy(counts: Counts) -> Array:
    """Pixel accuracy per example, ``[B]``: correctly classified / unmasked voxels.

    Voxels whose label lies outside ``[0, C)`` count as unmasked but never as correct.
    NaN for an example with no unmasked voxels.
    """
    tp = counts["tp"]
    total = tp[:, 0] + counts["fp"][:, 0] + counts["fn"][:, 0] + counts["tn"][:, 0]
    return _ratio(jnp.sum(tp, axis=-1), total, jnp.nan)


@functools.partial(jax.jit, static_argnames=("num_classes",))
def segmentation_metrics(
    pred: Array, labels: Array, num_classes: int, mask: Array | None = None
) -> dict[str, Array]:
    """All count-based metrics at once (jit-able with ``num_classes`` static).

    Returns:
      dict with ``dice``, ``iou``, ``sensitivity``, ``specificity``, ``precision`` (each
      ``[B, C]``) and ``accuracy`` (``[B]``); see the module docstring for empty conventions.
    """
    counts = confusion_counts(pred, labels, num_classes, mask=mask)
    return {
        "dice": dice(counts),
        "iou": iou(counts),
        "sensitivity": sensitivity(counts),
        "specificity": specificity(counts),
        "precision": precision(counts),
        "accuracy": accuracy(counts),
    }


def nanmean(x: Array | np.ndarray, axis: int | Sequence[int] | None = None) -> Array:
    """Mean over ``axis`` ignoring NaNs; NaN where every entry is NaN (no warnings, jit-able).

    E.g. ``nanmean(metrics["sensitivity"], axis=0)`` gives the per-class mean over the examples
    in which the class is present.
    """
    if isinstance(axis, Sequence):
        axis = tuple(axis)
    return _nanmean(x, axis=axis)


@functools.partial(jax.jit, static_argnames=("axis",))
def _nanmean(x: Array, axis: int | tuple[int, ...] | None) -> Array:
    x = jnp.asarray(x, jnp.float32)
    valid = ~jnp.isnan(x)
    total = jnp.sum(jnp.where(valid, x, 0.0), axis=axis)
    count = jnp.sum(valid, axis=axis)
    return _ratio(total, count, jnp.nan)


def nanmean_metrics(
    metrics: Mapping[str, Array] | Sequence[Mapping[str, Array]], axis: int | None = 0
) -> dict[str, Array]:
    """Applies :func:`nanmean` to every entry of a metric dict.

    ``metrics`` may be one dict (e.g. from :func:`segmentation_metrics`) or a list of such
    dicts (e.g. one per evaluation batch), which are concatenated along axis 0 first. With the
    default ``axis=0`` a ``[B, C]`` entry becomes a per-class ``[C]`` mean over examples and a
    ``[B]`` entry a scalar; ``axis=None`` reduces everything to scalars.
    """
    if not isinstance(metrics, Mapping):
        metrics = list(metrics)
        if not metrics:
            return {}
        metrics = {
            k: jnp.concatenate([jnp.atleast_1d(jnp.asarray(m[k])) for m in metrics], axis=0)
            for k in metrics[0]
        }
    return {k: nanmean(v, axis=axis) for k, v in metrics.items()}


# =============================================================================================
# Case-level scores and their summary (host side)
# =============================================================================================

REGION_METRICS = ("dice", "iou", "sensitivity", "specificity", "precision", "hd95", "msd")


def _host_ratio(num: float, den: float, empty_value: float) -> float:
    return float(num) / float(den) if den > 0 else float(empty_value)


def _region_value(
    metric: str,
    p: np.ndarray,
    g: np.ndarray,
    tp: int,
    fp: int,
    fn: int,
    tn: int,
    spacing: float | Sequence[float] | None,
) -> float:
    if metric == "dice":
        return _host_ratio(2 * tp, 2 * tp + fp + fn, 1.0)
    if metric == "iou":
        return _host_ratio(tp, tp + fp + fn, 1.0)
    if metric == "sensitivity":
        return _host_ratio(tp, tp + fn, np.nan)
    if metric == "specificity":
        return _host_ratio(tn, tn + fp, np.nan)
    if metric == "precision":
        return _host_ratio(tp, tp + fp, np.nan)
    if metric == "hd95":
        return hausdorff_distance(p, g, spacing=spacing)
    return mean_surface_distance(p, g, spacing=spacing)


def region_scores(
    pred: np.ndarray | Array,
    labels: np.ndarray | Array,
    regions: Mapping[str, Sequence[int]],
    *,
    spacing: float | Sequence[float] | None = None,
    metrics: Sequence[str] = REGION_METRICS,
) -> dict[str, float]:
    """Scores of ONE case (no batch axis) per region: a region is a set of classes.

    For region ``r`` with classes ``S``, the binary masks are ``isin(pred, S)`` and
    ``isin(labels, S)`` (a single class is ``(c,)``; BraTS whole tumour is ``(1, 2, 3)``).
    ``metrics`` picks among :data:`REGION_METRICS`: the count-based ones follow the empty-set
    conventions of the module docstring (exact integer counts, as :func:`confusion_counts`),
    ``hd95`` / ``msd`` those of :func:`hausdorff_distance` / :func:`mean_surface_distance`, in
    ``spacing`` units. Returns ``{"<metric>_<region>": float}``.
    """
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"pred shape {pred.shape} != labels shape {labels.shape}")
    unknown = sorted(set(metrics) - set(REGION_METRICS))
    if unknown:
        raise ValueError(f"unknown region metrics {unknown}; expected some of {REGION_METRICS}")
    out: dict[str, float] = {}
    for name, classes in regions.items():
        p, g = np.isin(pred, classes), np.isin(labels, classes)
        tp = int(np.count_nonzero(p & g))
        fp = int(np.count_nonzero(p)) - tp
        fn = int(np.count_nonzero(g)) - tp
        tn = p.size - tp - fp - fn
        for m in metrics:
            out[f"{m}_{name}"] = _region_value(m, p, g, tp, fp, fn, tn, spacing)
    return out


def summarize_rows(rows: Sequence[Mapping[str, object]]) -> dict[str, float]:
    """Means over cases of every numeric column of per-case rows, NaNs skipped.

    ``cases`` is the number of rows; a column with undefined (NaN) entries also gets
    ``<column>_n``, the number of cases its mean is over (NaN when no case defines it).
    """
    keys = list(dict.fromkeys(k for r in rows for k in r))
    columns = {
        key: [float(r[key]) for r in rows if isinstance(r.get(key), int | float | np.number)]
        for key in keys
        if not isinstance(rows[0].get(key), bool)
    }
    return {"cases": len(rows), **summarize_columns(columns)}


def summarize_columns(columns: Mapping[str, Sequence[float] | np.ndarray]) -> dict[str, float]:
    """NaN-skipping mean of every column of per-case values (`summarize_rows` without the
    rows): `<column>` and, when some entries are NaN, `<column>_n` (the defined ones)."""
    out: dict[str, float] = {}
    for key, values in columns.items():
        vals = np.asarray(values, np.float64).reshape(-1)
        if not vals.size:
            continue
        finite = vals[np.isfinite(vals)]
        out[key] = float(finite.mean()) if finite.size else float("nan")
        if finite.size != vals.size:
            out[f"{key}_n"] = int(finite.size)
    return out


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score_pos > score_neg) + 0.5 P(tie) (Mann-Whitney U);
    NaN without positives or negatives."""
    from scipy.stats import rankdata

    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def classification_scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean recall over the classes present), mean cross-entropy
    and, for two classes, the ROC AUC of class 1, from logits ``[N, K]`` and labels ``[N]``."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels).astype(int)
    pred = logits.argmax(-1)
    recalls = [
        np.mean(pred[labels == c] == c) for c in range(logits.shape[-1]) if (labels == c).any()
    ]
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    out = {
        "accuracy": float(np.mean(pred == labels)),
        "balanced_accuracy": float(np.mean(recalls)),
        "loss": float(-np.mean(log_p[np.arange(len(labels)), labels])),
    }
    if logits.shape[-1] == 2:
        out["auc"] = roc_auc(np.exp(log_p[:, 1]), labels == 1)
    return out


def mean_over_regions(
    summary: Mapping[str, float], metrics: Sequence[str], regions: Sequence[str]
) -> dict[str, float]:
    """``<metric>_mean``: the mean of ``summary["<metric>_<region>"]`` over ``regions`` (NaN
    entries skipped; NaN when none is defined), for every metric present in ``summary``."""
    out: dict[str, float] = {}
    for m in metrics:
        vals = [summary.get(f"{m}_{r}", np.nan) for r in regions]
        if all(f"{m}_{r}" not in summary for r in regions):
            continue
        finite = [float(v) for v in vals if np.isfinite(v)]
        out[f"{m}_mean"] = float(np.mean(finite)) if finite else float("nan")
    return out


# =============================================================================================
# Surface distances (host side)
# =============================================================================================


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if np.ndim(spacing) == 0:
        return (float(spacing),) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing has {len(spacing)} entries for a {ndim}-D mask")
    return spacing


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: ``mask & ~erosion(mask)`` with face connectivity and zero padding."""
    eroded = ndimage.binary_erosion(mask, border_value=0)
    return mask & ~eroded


def _directed_distances(
    pred_mask: np.ndarray | Array,
    gt_mask: np.ndarray | Array,
    spacing: float | Sequence[float] | None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Distances from each pred surface voxel to the gt surface and vice versa.

    Returns ``(d_pred_to_gt, d_gt_to_pred)``, ``None`` if exactly one mask is empty, and a pair
    of zero-length arrays if both are.
    """
    pred = np.asarray(pred_mask).astype(bool)
    gt = np.asarray(gt_mask).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
    sampling = _spacing(spacing, pred.ndim)
    pred_any, gt_any = bool(pred.any()), bool(gt.any())
    if not pred_any and not gt_any:
        return np.zeros(0), np.zeros(0)
    if pred_any != gt_any:
        return None
    # Crop to the union's bounding box plus a one-voxel margin (clipped to the image): the
    # surfaces, and the distances between them, are unchanged, and the EDTs get much cheaper.
    coords = np.nonzero(pred | gt)
    box = tuple(
        slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n))
        for c, n in zip(coords, pred.shape, strict=True)
    )
    pred, gt = pred[box], gt[box]
    surf_pred, surf_gt = _surface(pred), _surface(gt)
    dt_gt = ndimage.distance_transform_edt(~surf_gt, sampling=sampling)
    dt_pred = ndimage.distance_transform_edt(~surf_pred, sampling=sampling)
    return dt_gt[surf_pred], dt_pred[surf_gt]


def hausdorff_distance(
    pred_mask: np.ndarray | Array,
    gt_mask: np.ndarray | Array,
    *,
    percentile: float | None = 95.0,
    spacing: float | Sequence[float] | None = None,
) -> float:
    """(Percentile) Hausdorff distance between the surfaces of two binary N-D masks.

    MONAI's definition: ``max(P_q(d(pred -> gt)), P_q(d(gt -> pred)))`` where ``d(A -> B)`` are
    the distances from every surface voxel of ``A`` to the nearest surface voxel of ``B`` and
    ``P_q`` is ``np.percentile`` (linear interpolation). ``percentile=None`` (or 100) gives the
    classic Hausdorff distance (maximum).

    Args:
      pred_mask, gt_mask: binary masks of equal shape (any number of dimensions).
      percentile: ``q`` in [0, 100]; default 95 (HD95).
      spacing: voxel size per axis (scalar for isotropic); distances are in these units.

    Returns:
      The distance as a float; 0.0 if both masks are empty, NaN if exactly one is empty.
    """
    d = _directed_distances(pred_mask, gt_mask, spacing)
    if d is None:
        return float("nan")
    d_pg, d_gp = d
    if d_pg.size == 0:
        return 0.0
    if percentile is None:
        return float(max(d_pg.max(), d_gp.max()))
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))


def mean_surface_distance(
    pred_mask: np.ndarray | Array,
    gt_mask: np.ndarray | Array,
    *,
    spacing: float | Sequence[float] | None = None,
    symmetric: bool = True,
) -> float:
    """Mean surface distance between two binary N-D masks (MONAI's average surface distance).

    ``symmetric=True``: mean of the pooled distances ``concat(d(pred -> gt), d(gt -> pred))``
    (the average symmetric surface distance, ASSD). ``symmetric=False``: mean of
    ``d(pred -> gt)`` only. Surfaces and distances as in the module docstring.

    Returns:
      The distance as a float; 0.0 if both masks are empty, NaN if exactly one is empty.
    """
    d = _directed_distances(pred_mask, gt_mask, spacing)
    if d is None:
        return float("nan")
    d_pg, d_gp = d
    if d_pg.size == 0:
        return 0.0
    pooled = np.concatenate([d_pg, d_gp]) if symmetric else d_pg
    return float(pooled.mean())


def surface_metrics(
    pred: np.ndarray | Array,
    labels: np.ndarray | Array,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    *,
    percentile: float | None = 95.0,
) -> dict[str, np.ndarray]:
    """Per-class HD95 and symmetric MSD for ONE example (host side).

    Args:
      pred, labels: integer class maps ``[*spatial]`` (no batch axis).
      num_classes: ``C``; every class, background included, is evaluated.
      spacing: voxel size per spatial axis.
      percentile: Hausdorff percentile (``None`` for the maximum).

    Returns:
      ``{"hd95": [C], "msd": [C]}`` float64 arrays, with the empty conventions of
      :func:`hausdorff_distance` (0.0 both empty, NaN exactly one empty).
    """
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    hd = np.zeros(num_classes)
    msd = np.zeros(num_classes)
    for c in range(num_classes):
        p, g = pred == c, labels == c
        hd[c] = hausdorff_distance(p, g, percentile=percentile, spacing=spacing)
        msd[c] = mean_surface_distance(p, g, spacing=spacing, symmetric=True)
    return {"hd95": hd, "msd": msd}


# =============================================================================================
# Ellipse fitting and head circumference (HC18)
# =============================================================================================


def _ellipse_points(
    mask: np.ndarray, spacing: tuple[float, float], largest_component: bool
) -> np.ndarray:
    """Boundary pixel centres ``[N, 2]`` as ``(y, x)`` in physical units."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    if largest_component and mask.any():
        lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        if n > 1:
            sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
            mask = lab == (int(np.argmax(sizes)) + 1)
    # Filling holes makes an outline annotation (HC18 style ellipse contour) behave like a disc.
    mask = ndimage.binary_fill_holes(mask)
    rows, cols = np.nonzero(_surface(mask))
    return np.stack([rows * spacing[0], cols * spacing[1]], axis=1).astype(np.float64)


def _fit_conic(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Direct least-squares ellipse fit (Fitzgibbon 1999; Halir & Flusser 1998 formulation).

    Returns conic coefficients ``(A, B, C, D, E, F)`` of ``A x^2 + B xy + C y^2 + D x + E y + F``.
    """
    d1 = np.stack([x * x, x * y, y * y], axis=1)
    d2 = np.stack([x, y, np.ones_like(x)], axis=1)
    s1 = d1.T @ d1
    s2 = d1.T @ d2
    s3 = d2.T @ d2
    t = -np.linalg.solve(s3, s2.T)
    m = s1 + s2 @ t
    # Premultiply by inv(C1) for the constraint 4AC - B^2 = 1.
    m = np.stack([m[2] / 2.0, -m[1], m[0] / 2.0])
    _, vecs = np.linalg.eig(m)
    vecs = np.real(vecs)
    cond = 4.0 * vecs[0] * vecs[2] - vecs[1] ** 2
    idx = np.flatnonzero(cond > 0)
    if idx.size == 0:
        raise ValueError("no ellipse fits these points")
    a1 = vecs[:, idx[np.argmax(cond[idx])]]
    return np.concatenate([a1, t @ a1])


def fit_ellipse(
    mask: np.ndarray | Array,
    *,
    spacing: float | Sequence[float] | None = None,
    largest_component: bool = True,
) -> tuple[float, float, float, float, float]:
    """Fits an ellipse to the boundary pixels of a 2-D binary mask.

    The mask is (optionally) reduced to its largest connected component and hole-filled (so
    both filled masks and closed outlines work); its boundary pixel centres (face-connectivity
    surface, see the module docstring) are fitted with the direct least-squares ellipse fit of
    Fitzgibbon, Pilu & Fisher (1999) in Halir & Flusser's numerically stable form, on centred
    and scaled coordinates. Pixel centres lie ~0.5 px inside the drawn outline, so the axes
    are typically ~0.5 px smaller than those used to rasterise a filled ellipse.

    Args:
      mask: ``[H, W]`` binary mask (rows = y, columns = x).
      spacing: pixel size ``(row, col)`` or a scalar; results are in those units.
      largest_component: keep only the largest 8-connected component (so thin drawn
        outlines stay in one piece) before filling holes.

    Returns:
      ``(cy, cx, semi_axis_a, semi_axis_b, angle)``: centre (row, col), semi-major ``a >= b``
      semi-minor, and ``angle`` in radians in ``[0, pi)``: the direction of the major axis
      measured from the +x (column) axis towards the +y (row) axis, i.e. the major axis points
      along ``(dy, dx) = (sin(angle), cos(angle))`` (clockwise on a displayed image).

    Raises:
      ValueError: fewer than 6 boundary pixels, or the points admit no ellipse.
    """
    sp = _spacing(spacing, 2)
    pts = _ellipse_points(np.asarray(mask), sp, largest_component)
    if pts.shape[0] < 6:
        raise ValueError("need at least 6 boundary pixels to fit an ellipse")
    mean = pts.mean(axis=0)
    scale = float(np.sqrt(np.mean(np.sum((pts - mean) ** 2, axis=1))))
    scale = scale if scale > 0 else 1.0
    yn = (pts[:, 0] - mean[0]) / scale
    xn = (pts[:, 1] - mean[1]) / scale
    a, b, c, d, e, f = _fit_conic(yn, xn)
    q = np.array([[a, b / 2.0], [b / 2.0, c]])
    centre = np.linalg.solve(2.0 * q, -np.array([d, e]))  # (x0, y0) in normalised units
    x0, y0 = centre
    f_c = f + 0.5 * (d * x0 + e * y0)
    evals, evecs = np.linalg.eigh(q)
    radii_sq = -f_c / evals
    if np.any(radii_sq <= 0):
        raise ValueError("degenerate ellipse fit")
    radii = np.sqrt(radii_sq) * scale
    major = int(np.argmax(radii))
    vx, vy = evecs[:, major]
    angle = float(np.arctan2(vy, vx) % np.pi)
    cy = float(y0 * scale + mean[0])
    cx = float(x0 * scale + mean[1])
    return cy, cx, float(radii[major]), float(radii[1 - major]), angle


def ellipse_circumference(
    a: float | np.ndarray,
    b: float | np.ndarray,
    *,
    method: Literal["ramanujan2", "ramanujan1"] = "ramanujan2",
) -> float | np.ndarray:
    """Circumference of an ellipse with semi-axes ``a``, ``b`` (Ramanujan's approximations).

    ``ramanujan2`` (default): ``pi (a + b) (1 + 3h / (10 + sqrt(4 - 3h)))`` with
    ``h = ((a - b) / (a + b))^2`` (relative error < 1e-9 for head-like eccentricities).
    ``ramanujan1``: ``pi (3 (a + b) - sqrt((3a + b)(a + 3b)))``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if method == "ramanujan1":
        out = np.pi * (3.0 * (a + b) - np.sqrt((3.0 * a + b) * (a + 3.0 * b)))
    elif method == "ramanujan2":
        s = a + b
        h = np.where(s > 0, ((a - b) / np.where(s > 0, s, 1.0)) ** 2, 0.0)
        out = np.pi * s * (1.0 + 3.0 * h / (10.0 + np.sqrt(4.0 - 3.0 * h)))
    else:
        raise ValueError(f"unknown method {method!r}")
    return float(out) if out.ndim == 0 else out


def head_circumference_mm(
    mask: np.ndarray | Array, pixel_size_mm: float | Sequence[float]
) -> float:
    """HC18 head circumference: circumference (mm) of the ellipse fitted to ``mask``.

    Args:
      mask: ``[H, W]`` binary head segmentation (filled, or a closed outline).
      pixel_size_mm: pixel size in mm (scalar, or ``(row, col)`` for anisotropic pixels).

    Returns:
      The circumference in mm, or NaN when no ellipse can be fitted (e.g. an empty mask or
      fewer than 6 boundary pixels).
    """
    try:
        _, _, a, b, _ = fit_ellipse(mask, spacing=pixel_size_mm)
    except (ValueError, np.linalg.LinAlgError):
        return float("nan")
    return float(ellipse_circumference(a, b))


# =============================================================================================
# Image quality
# =============================================================================================


def _voxel_weights(mask: Array, shape: tuple[int, ...], name: str) -> Array:
    """Float32 ``mask`` expanded with trailing unit axes so it broadcasts against ``shape``.

    ``mask`` must have shape ``shape`` or ``shape[:-1]`` (one weight per voxel, shared by the
    channels).
    """
    mask = jnp.asarray(mask)
    if mask.shape not in (tuple(shape), tuple(shape[:-1])):
        raise ValueError(
            f"{name}: mask shape {mask.shape} must be the image shape {tuple(shape)} or that "
            f"shape without channels {tuple(shape[:-1])}"
        )
    mask = mask.astype(jnp.float32)
    return mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))


@jax.jit
def psnr(x: Array, y: Array, data_range: float, mask: Array | None = None) -> Array:
    """Peak signal-to-noise ratio per example, ``[B]``: ``10 log10(data_range^2 / MSE)``.

    ``x``, ``y``: ``[B, ...]``; the MSE is over all non-batch axes (float32). Identical images
    give ``+inf`` (as skimage).

    ``mask`` (optional, bool/float, shape ``x.shape`` or ``x.shape[:-1]``, the latter shared
    by the channels) restricts the MSE to the masked voxels:
    ``MSE = sum(m * (x - y)^2) / sum(m broadcast to x.shape)``. An example with an empty mask
    gets NaN.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    axes = tuple(range(1, x.ndim))
    if mask is None:
        mse = jnp.mean((x - y) ** 2, axis=axes)
    else:
        m = jnp.broadcast_to(_voxel_weights(mask, x.shape, "psnr"), x.shape)
        den = jnp.sum(m, axis=axes)
        mse = jnp.where(
            den > 0, jnp.sum(m * (x - y) ** 2, axis=axes) / jnp.maximum(den, 1e-12), jnp.nan
        )
    return 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)


def _gaussian_window(sigma: float, truncate: float) -> tuple[np.ndarray, int]:
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return (w / w.sum()).astype(np.float32), radius


def _valid_filter(x: Array, w: np.ndarray, axes: Sequence[int]) -> Array:
    """Separable 'valid' correlation of ``x`` with the 1-D window ``w`` along ``axes``.

    Each axis is one contraction with a banded ``[n - k + 1, n]`` matrix (cheap to compile).
    """
    k = len(w)
    for ax in axes:
        n = x.shape[ax]
        band = np.zeros((n - k + 1, n), np.float32)
        for i in range(n - k + 1):
            band[i, i : i + k] = w
        x = jnp.moveaxis(
            jnp.tensordot(x, band, axes=([ax], [1]), precision=jax.lax.Precision.HIGHEST),
            -1,
            ax,
        )
    return x


@functools.partial(jax.jit, static_argnames=("sigma",))
def ssim(
    x: Array,
    y: Array,
    data_range: float,
    *,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    mask: Array | None = None,
) -> Array:
    """Structural similarity per example, ``[B]`` (2D or 3D, channels-last).

    Matches ``skimage.metrics.structural_similarity(x_b, y_b, data_range=data_range,
    channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``: local
    statistics from a Gaussian window (sigma 1.5, truncated at 3.5 sigma -> 11 taps), the SSIM
    map averaged over the region at least 5 voxels from every border and over channels. Since
    that region only sees interior voxels, a 'valid' filter is used (no padding).

    Args:
      x, y: ``[B, *spatial, C]`` images (spatial rank 2 or 3; each spatial size >= 11).
      data_range: dynamic range of the images (e.g. 1.0 or 255.0).
      mask: optional ``[B, *spatial]`` (shared by the channels) or ``[B, *spatial, C]``
        bool/float. The SSIM map is still computed from the whole image (the local windows see
        unmasked neighbours); only its average is restricted: the mean of the SSIM map over
        the voxels that are both inside the mask and in the border-cropped region, i.e.
        ``skimage``'s ``full=True`` map, cropped by 5 voxels per side, averaged with the mask
        weights. An example with no masked voxel in that region gets NaN.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if x.shape != y.shape:
        raise ValueError(f"x shape {x.shape} != y shape {y.shape}")
    if x.ndim not in (4, 5):
        raise ValueError(f"expected [B, *spatial, C] with 2 or 3 spatial axes, got {x.shape}")
    w, radius = _gaussian_window(sigma, 3.5)
    axes = tuple(range(1, x.ndim - 1))
    if any(x.shape[a] < 2 * radius + 1 for a in axes):
        raise ValueError(f"spatial sizes must be >= {2 * radius + 1}")
    stats = _valid_filter(jnp.stack([x, y, x * x, y * y, x * y]), w, [a + 1 for a in axes])
    ux, uy, uxx, uyy, uxy = stats
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    red = tuple(range(1, x.ndim))
    if mask is None:
        return jnp.mean(s, axis=red)
    m = _voxel_weights(mask, x.shape, "ssim")
    # The 'valid' map covers voxels radius..n-radius-1 of each spatial axis: crop the mask alike.
    crop = (slice(None), *(slice(radius, m.shape[a] - radius) for a in axes))
    m = jnp.broadcast_to(m[crop], s.shape)
    den = jnp.sum(m, axis=red)
    return jnp.where(den > 0, jnp.sum(m * s, axis=red) / jnp.maximum(den, 1e-12), jnp.nan)
