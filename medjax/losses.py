"""Segmentation losses for multi-class, channels-last logits, and GAN / image-translation losses.

Conventions shared by every segmentation loss in this module:

* ``logits`` are unnormalised scores of shape ``[B, *spatial, C]`` (2D or 3D, any float dtype;
  they are cast to float32 before any reduction).
* ``labels`` are integer class maps of shape ``[B, *spatial]`` (not one-hot). A label outside
  ``[0, C)`` one-hot encodes to all zeros; use ``mask`` to ignore such voxels explicitly.
* ``mask`` (optional) has shape ``[B, *spatial]`` (bool or float); voxels where it is False / 0
  contribute nothing. Float masks act as per-voxel weights.
* Every loss returns PER-EXAMPLE values of shape ``[B]``; the caller reduces over the batch.
* Everything is jit-able and differentiable with respect to ``logits``.

The GAN section at the end (:func:`gan_discriminator_loss`, :func:`gan_generator_loss`,
:func:`gradient_penalty`, :func:`interpolate`, :func:`l1_loss`) follows the same rules: inputs are
cast to float32 first and every loss returns per-example ``[B]`` float32 values, averaging over
all non-batch axes (so scalar critic outputs ``[B]`` and PatchGAN maps ``[B, h, w, 1]`` both work).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from medjax.models import layers

Array = jax.Array

__all__ = [
    "GAN_LOSS_KINDS",
    "cross_entropy",
    "dice_ce_loss",
    "focal_loss",
    "gan_discriminator_loss",
    "gan_generator_loss",
    "gradient_penalty",
    "interpolate",
    "l1_loss",
    "soft_dice_loss",
]

_TINY = 1e-12


def _prepare(logits: Array, labels: Array, mask: Array | None) -> tuple[Array, Array, Array | None]:
    """Casts logits to float32, checks shapes and returns ``(logits, one_hot, mask)``.

    ``one_hot`` has shape ``[B, *spatial, C]`` float32; ``mask`` (if given) is float32
    ``[B, *spatial]``.
    """
    logits = jnp.asarray(logits).astype(jnp.float32)
    labels = jnp.asarray(labels)
    if logits.ndim < 3:
        raise ValueError(f"logits must be [B, *spatial, C], got shape {logits.shape}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {labels.shape} must equal logits shape without channels "
            f"{logits.shape[:-1]}"
        )
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != labels.shape:
            raise ValueError(f"mask shape {mask.shape} must equal labels shape {labels.shape}")
        mask = mask.astype(jnp.float32)
    return logits, one_hot, mask


def _masked_mean(values: Array, weights: Array | None) -> Array:
    """Per-example (weighted) mean of ``values`` ``[B, *spatial]`` over the spatial axes.

    Returns 0 for an example whose weights sum to zero.
    """
    axes = tuple(range(1, values.ndim))
    if weights is None:
        return jnp.mean(values, axis=axes)
    num = jnp.sum(values * weights, axis=axes)
    den = jnp.sum(weights, axis=axes)
    return jnp.where(den > 0, num / jnp.maximum(den, _TINY), 0.0)


@jax.jit
def cross_entropy(
    logits: Array,
    labels: Array,
    *,
    mask: Array | None = None,
    class_weights: Sequence[float] | Array | None = None,
) -> Array:
    """Softmax cross-entropy averaged over voxels, per example.

    For voxel ``v`` with label ``y_v`` the loss is ``-log softmax(logits_v)[y_v]``. The
    per-example value is the weighted mean over voxels

        ``sum_v w_v * ce_v / sum_v w_v``,  with ``w_v = mask_v * class_weights[y_v]``

    (``mask_v = 1`` / ``class_weights = 1`` when not given). With ``class_weights`` this is
    PyTorch's ``nn.CrossEntropyLoss(weight=...)`` normalisation (divide by the summed weights
    of the contributing voxels, not by the voxel count). An example with zero total weight
    (e.g. fully masked) gets 0.

    Args:
      logits: ``[B, *spatial, C]`` unnormalised scores.
      labels: ``[B, *spatial]`` integer class map.
      mask: optional ``[B, *spatial]`` bool/float; False voxels are ignored.
      class_weights: optional ``[C]`` per-class weights.

    Returns:
      ``[B]`` float32 loss.
    """
    logits, one_hot, mask = _prepare(logits, labels, mask)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    ce = -jnp.sum(one_hot * log_p, axis=-1)
    weights = mask
    if class_weights is not None:
        cw = jnp.asarray(class_weights, dtype=jnp.float32)
        voxel_w = jnp.sum(one_hot * cw, axis=-1)
        weights = voxel_w if weights is None else weights * voxel_w
    return _masked_mean(ce, weights)


@functools.partial(jax.jit, static_argnames=("include_background", "squared_pred", "batch_dice"))
def soft_dice_loss(
    logits: Array,
    labels: Array,
    *,
    include_background: bool = True,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    squared_pred: bool = False,
    batch_dice: bool = False,
    mask: Array | None = None,
) -> Array:
    """Multi-class softmax soft Dice loss with MONAI ``DiceLoss`` semantics.

    Equivalent to ``monai.losses.DiceLoss(softmax=True, to_onehot_y=True,
    include_background=include_background, smooth_nr=smooth_nr, smooth_dr=smooth_dr,
    squared_pred=squared_pred, batch=batch_dice, reduction="none")`` followed by a mean over
    the class axis. With ``p = softmax(logits)`` and ``g = one_hot(labels)``, per class ``c``:

        ``I_c = sum p_c * g_c``,  ``P_c = sum p_c`` (``sum p_c**2`` if ``squared_pred``),
        ``G_c = sum g_c`` (``sum g_c**2`` if ``squared_pred``, identical for one-hot),
        ``loss_c = 1 - (2 * I_c + smooth_nr) / (P_c + G_c + smooth_dr)``

    where sums run over the spatial axes of one example (and also over the batch if
    ``batch_dice``). The result is the mean of ``loss_c`` over classes (class 0 dropped when
    ``include_background`` is False). A masked-out voxel is removed from every sum.

    Args:
      logits: ``[B, *spatial, C]`` unnormalised scores.
      labels: ``[B, *spatial]`` integer class map.
      include_background: keep channel 0 in the class mean.
      smooth_nr, smooth_dr: numerator / denominator smoothing constants.
      squared_pred: square predictions (and targets) in the denominator.
      batch_dice: pool the sums over the whole batch (one Dice per class for the batch); the
        resulting scalar is broadcast to ``[B]`` so that ``mean`` over the batch matches MONAI.
      mask: optional ``[B, *spatial]`` bool/float.

    Returns:
      ``[B]`` float32 loss.
    """
    logits, one_hot, mask = _prepare(logits, labels, mask)
    probs = jax.nn.softmax(logits, axis=-1)
    if not include_background:
        if logits.shape[-1] == 1:
            raise ValueError("include_background=False needs at least two classes")
        probs = probs[..., 1:]
        one_hot = one_hot[..., 1:]
    if mask is not None:
        probs = probs * mask[..., None]
        one_hot = one_hot * mask[..., None]
    axes = tuple(range(1, probs.ndim - 1))
    if batch_dice:
        axes = (0, *axes)
    intersection = jnp.sum(probs * one_hot, axis=axes)
    if squared_pred:
        pred_o = jnp.sum(probs * probs, axis=axes)
        ground_o = jnp.sum(one_hot * one_hot, axis=axes)
    else:
        pred_o = jnp.sum(probs, axis=axes)
        ground_o = jnp.sum(one_hot, axis=axes)
    per_class = 1.0 - (2.0 * intersection + smooth_nr) / (pred_o + ground_o + smooth_dr)
    loss = jnp.mean(per_class, axis=-1)
    if batch_dice:
        loss = jnp.broadcast_to(loss, (logits.shape[0],))
    return loss


def dice_ce_loss(
    logits: Array,
    labels: Array,
    *,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
    mask: Array | None = None,
    class_weights: Sequence[float] | Array | None = None,
    **dice_kwargs: Any,
) -> Array:
    """Weighted sum ``dice_weight * soft_dice_loss + ce_weight * cross_entropy``, per example.

    ``mask`` is applied to both terms; ``class_weights`` goes to the cross-entropy only; any
    other keyword (``include_background``, ``smooth_nr``, ``smooth_dr``, ``squared_pred``,
    ``batch_dice``) goes to :func:`soft_dice_loss`.

    Returns:
      ``[B]`` float32 loss.
    """
    dice = soft_dice_loss(logits, labels, mask=mask, **dice_kwargs)
    ce = cross_entropy(logits, labels, mask=mask, class_weights=class_weights)
    return dice_weight * dice + ce_weight * ce


@functools.partial(jax.jit, static_argnames=("gamma",))
def focal_loss(
    logits: Array,
    labels: Array,
    *,
    gamma: float = 2.0,
    alpha: float | Sequence[float] | Array | None = None,
    mask: Array | None = None,
) -> Array:
    """Softmax multi-class focal loss (Lin et al., 2017), averaged over voxels, per example.

    Per voxel, with ``p_t = softmax(logits)[y]``:

        ``fl = -alpha_t * (1 - p_t) ** gamma * log(p_t)``

    ``alpha`` may be ``None`` (``alpha_t = 1``), a sequence of ``C`` per-class weights
    (``alpha_t = alpha[y]``), or a scalar, which follows MONAI's softmax focal loss:
    ``1 - alpha`` for the background class 0 and ``alpha`` for every other class. The
    per-example value is the (masked) mean of ``fl`` over voxels (unlike MONAI's
    ``reduction="mean"``, which also divides by ``C``), so ``gamma=0, alpha=None`` equals
    :func:`cross_entropy`. Fully masked examples get 0.

    Args:
      logits: ``[B, *spatial, C]`` unnormalised scores.
      labels: ``[B, *spatial]`` integer class map.
      gamma: focusing parameter (>= 0).
      alpha: class balancing, see above.
      mask: optional ``[B, *spatial]`` bool/float.

    Returns:
      ``[B]`` float32 loss.
    """
    logits, one_hot, mask = _prepare(logits, labels, mask)
    num_classes = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    log_pt = jnp.sum(one_hot * log_p, axis=-1)
    pt = jnp.exp(log_pt)
    # (1 - pt) ** gamma with a safe gradient at pt == 1 (0 ** gamma for gamma > 0).
    one_minus = jnp.maximum(1.0 - pt, 0.0)
    if gamma == 0:
        modulator = jnp.ones_like(pt)
    else:
        modulator = one_minus**gamma
    fl = -modulator * log_pt
    if alpha is not None:
        alpha_arr = jnp.asarray(alpha, dtype=jnp.float32)
        if alpha_arr.ndim == 0:
            alpha_vec = jnp.concatenate(
                [jnp.reshape(1.0 - alpha_arr, (1,)), jnp.full((num_classes - 1,), alpha_arr)]
            )
        else:
            if alpha_arr.shape != (num_classes,):
                raise ValueError(f"alpha must be a scalar or have shape ({num_classes},)")
            alpha_vec = alpha_arr
        fl = fl * jnp.sum(one_hot * alpha_vec, axis=-1)
    return _masked_mean(fl, mask)


# =============================================================================================
# GAN losses
# =============================================================================================

GAN_LOSS_KINDS: tuple[str, ...] = ("non_saturating", "lsgan", "hinge", "wasserstein")
"""Valid ``kind`` values of :func:`gan_discriminator_loss` / :func:`gan_generator_loss`."""


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSS_KINDS:
        raise ValueError(f"unknown GAN loss kind {kind!r}; expected one of {GAN_LOSS_KINDS}")


def _per_example_mean(x: Array) -> Array:
    """Mean over all non-batch axes of a float32 array (identity for ``[B]``)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _as_logits(x: Array, name: str) -> Array:
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"{name} must have a batch axis, e.g. [B] or [B, h, w, 1]; got a scalar")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point logits, got dtype {x.dtype}")
    return x.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("kind",))
def gan_discriminator_loss(real_logits: Array, fake_logits: Array, kind: str) -> Array:
    """Discriminator (critic) loss per example, ``[B]`` float32.

    ``r`` / ``f`` are the critic outputs on real / generated examples; every term is averaged
    over the non-batch axes (``mean`` below) before the terms are combined:

    * ``"non_saturating"`` (Goodfellow et al. 2014): ``mean(softplus(-r)) + mean(softplus(f))``,
      i.e. sigmoid cross-entropy with label 1 for real and 0 for fake.
    * ``"lsgan"`` (Mao et al. 2017): MSE to the targets 1 / 0,
      ``mean((r - 1)^2) + mean(f^2)``.

    No kind halves the sum: pix2pix and CycleGAN multiply the discriminator loss by 0.5 "to slow
    down the rate at which D learns relative to G" in their task files, for every
    kind alike.
    * ``"hinge"`` (Lim & Ye 2017; Miyato et al. 2018): ``mean(relu(1 - r)) + mean(relu(1 + f))``.
    * ``"wasserstein"`` (Arjovsky et al. 2017; add :func:`gradient_penalty` for WGAN-GP):
      ``mean(f) - mean(r)``.

    Args:
      real_logits: ``[B, ...]`` float critic outputs on real examples (``[B]`` or a PatchGAN
        map ``[B, h, w, 1]``).
      fake_logits: same shape, on generated examples.
      kind: one of :data:`GAN_LOSS_KINDS` (static).

    Returns:
      ``[B]`` float32 loss.
    """
    _check_kind(kind)
    r = _as_logits(real_logits, "real_logits")
    f = _as_logits(fake_logits, "fake_logits")
    if r.shape != f.shape:
        raise ValueError(f"real_logits shape {r.shape} != fake_logits shape {f.shape}")
    if kind == "non_saturating":
        return _per_example_mean(jax.nn.softplus(-r)) + _per_example_mean(jax.nn.softplus(f))
    if kind == "lsgan":
        return _per_example_mean((r - 1.0) ** 2) + _per_example_mean(f**2)
    if kind == "hinge":
        return _per_example_mean(jax.nn.relu(1.0 - r)) + _per_example_mean(jax.nn.relu(1.0 + f))
    return _per_example_mean(f) - _per_example_mean(r)  # wasserstein


@functools.partial(jax.jit, static_argnames=("kind",))
def gan_generator_loss(fake_logits: Array, kind: str) -> Array:
    """Generator loss per example, ``[B]`` float32 (``f``: critic output on generated examples).

    * ``"non_saturating"``: ``mean(softplus(-f))`` (= ``-log sigmoid(f)``, label 1).
    * ``"lsgan"``: ``mean((f - 1)^2)`` (pix2pix/CycleGAN convention: plain MSE to 1, no 0.5).
    * ``"hinge"`` and ``"wasserstein"``: ``-mean(f)``.

    Args:
      fake_logits: ``[B, ...]`` float critic outputs (``[B]`` or ``[B, h, w, 1]``).
      kind: one of :data:`GAN_LOSS_KINDS` (static).

    Returns:
      ``[B]`` float32 loss.
    """
    _check_kind(kind)
    f = _as_logits(fake_logits, "fake_logits")
    if kind == "non_saturating":
        return _per_example_mean(jax.nn.softplus(-f))
    if kind == "lsgan":
        return _per_example_mean((f - 1.0) ** 2)
    return -_per_example_mean(f)  # hinge, wasserstein


def interpolate(real: Array, fake: Array, key: Array) -> tuple[Array, Array]:
    """Random points on the segments between real and fake examples (WGAN-GP sampling).

    ``eps ~ U[0, 1)`` is drawn once per example with shape ``[B, 1, ..., 1]`` (as
    ``jax.random.uniform(key, eps.shape, float32)``) and
    ``x_hat = eps * real + (1 - eps) * fake``, all in float32.

    Args:
      real, fake: ``[B, ...]`` arrays of equal shape (any float dtype).
      key: a JAX PRNG key.

    Returns:
      ``(x_hat, eps)``: ``x_hat`` ``[B, ...]`` float32 and ``eps`` ``[B, 1, ..., 1]`` float32.
    """
    real = jnp.asarray(real)
    fake = jnp.asarray(fake)
    if real.shape != fake.shape:
        raise ValueError(f"real shape {real.shape} != fake shape {fake.shape}")
    if real.ndim < 1:
        raise ValueError("real/fake need a batch axis")
    real = real.astype(jnp.float32)
    fake = fake.astype(jnp.float32)
    eps = jax.random.uniform(key, (real.shape[0],) + (1,) * (real.ndim - 1), jnp.float32)
    return eps * real + (1.0 - eps) * fake, eps


def gradient_penalty(
    critic_fn: Callable[[Array], Array],
    real: Array,
    fake: Array,
    key: Array,
    *,
    target: float = 1.0,
) -> Array:
    """WGAN-GP gradient penalty (Gulrajani et al. 2017), per example, ``[B]`` float32.

    With ``x_hat, eps = interpolate(real, fake, key)`` and ``g = d sum(critic_fn(x_hat)) /
    d x_hat``, returns ``(||g_b||_2 - target)^2`` per example ``b`` (norm over all non-batch
    axes). Summing the critic outputs before differentiating gives each example's own
    gradient only when the examples do not interact inside the critic: use a critic WITHOUT
    batch normalisation (layer/instance norm or none), as the paper prescribes. For a
    PatchGAN critic the outputs of the map are summed, as in pytorch-CycleGAN-and-pix2pix.

    The norm has a zero (instead of NaN) gradient where ``g = 0``, so the penalty can be
    differentiated again with respect to the critic parameters. Not jitted itself (``critic_fn``
    usually closes over parameters); call it inside your jitted step, where it traces cleanly.
    The typical weight is ``lambda = 10``: ``d_loss = wasserstein_d_loss + 10 * gp``.

    Args:
      critic_fn: maps a float32 batch ``[B, ...]`` to critic outputs ``[B, ...]``.
      real, fake: ``[B, ...]`` arrays of equal shape (any float dtype, e.g. bfloat16).
      key: PRNG key for the interpolation coefficients (see :func:`interpolate`).
      target: the desired gradient norm (1 in the paper).

    Returns:
      ``[B]`` float32 penalty.
    """
    x_hat, _ = interpolate(real, fake, key)
    with layers.second_order_convolutions():  # this gradient is differentiated again
        g = jax.grad(lambda x: jnp.sum(jnp.asarray(critic_fn(x), jnp.float32)))(x_hat)
    sq = jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return (norm - jnp.float32(target)) ** 2


@jax.jit
def l1_loss(pred: Array, target: Array, mask: Array | None = None) -> Array:
    """Mean absolute error per example, ``[B]`` float32 (e.g. the pix2pix L1 term).

    Without ``mask``: ``mean(|pred - target|)`` over all non-batch axes. With ``mask`` (bool or
    float weights, shape ``[B, *spatial]`` = ``pred.shape[:-1]``, shared by the channels, or
    ``pred.shape``): ``sum(m * |pred - target|) / sum(m)`` with ``m`` broadcast to
    ``pred.shape``, i.e. the mean over the masked voxels and all channels. An example with an
    empty mask gets 0 (as the segmentation losses).

    Args:
      pred, target: ``[B, ..., C]`` arrays of equal shape (any float dtype).
      mask: optional, see above.

    Returns:
      ``[B]`` float32 loss.
    """
    pred = jnp.asarray(pred).astype(jnp.float32)
    target = jnp.asarray(target).astype(jnp.float32)
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
    if pred.ndim < 2:
        raise ValueError(f"pred must be [B, ..., C], got shape {pred.shape}")
    err = jnp.abs(pred - target)
    if mask is None:
        return _per_example_mean(err)
    mask = jnp.asarray(mask)
    if mask.shape == pred.shape:
        return _masked_mean(err, mask.astype(jnp.float32))
    if mask.shape == pred.shape[:-1]:
        # Mean over channels first; equal to the masked mean over voxels and channels.
        return _masked_mean(jnp.mean(err, axis=-1), mask.astype(jnp.float32))
    raise ValueError(
        f"mask shape {mask.shape} must be pred shape {pred.shape} or pred shape without "
        f"channels {pred.shape[:-1]}"
    )
