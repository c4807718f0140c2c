"""One network trained on `(image, label)` batches: what the supervised tasks share.

`Supervised` holds the model, the optimizer (`config.optimizer`), the on-device augmentation
(`config.augment`) and a per-example loss, and implements the pure functions of the task
contract once: `init`, `train_step` (augment inside the jitted step, keyed by the step; one
`value_and_grad`; batch-norm statistics carried in the state) and `predict` (float32 logits).
The segmentation and classification tasks subclass it and add their data and evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import losses
from medjax.data import transforms
from medjax.train import platform, task
from medjax.train.optim import make_optimizer, make_schedule
from medjax.train.state import TrainState, apply_model, new_train_state, step_key

SEGMENTATION_LOSSES = {
    "ce": losses.cross_entropy,
    "dice": losses.soft_dice_loss,
    "dice_ce": losses.dice_ce_loss,
    "focal": losses.focal_loss,
}


def segmentation_loss(loss_cfg: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The per-example loss named by `config.loss.name` with its other keys as arguments."""
    cfg = dict(loss_cfg)
    name = cfg.pop("name")
    if name not in SEGMENTATION_LOSSES:
        raise ValueError(f"config.loss.name={name!r} is not one of {sorted(SEGMENTATION_LOSSES)}")
    return functools.partial(SEGMENTATION_LOSSES[name], **cfg)


class Supervised(task.Task):
    """A model, its optimizer, its augmentation and a per-example loss.

    Subclasses pass the Flax `model` (or None and define `model` themselves) and
    `loss(logits float32, label) -> [B]`, and may set
    `crop_size` (spatial size of the random crop taken on the device before augmentation) and
    `augment_labels` (False: the geometry is applied to the image only, e.g. classification).
    """

    augment_labels: bool = True
    accumulates_gradients = True

    def __init__(
        self,
        config: Any,
        model: Any,
        loss: Callable[[jax.Array, jax.Array], jax.Array],
        *,
        crop_size: Sequence[int] | None = None,
    ):
        super().__init__(config)
        if model is not None:  # else a subclass provides `model` (e.g. built lazily)
            self.model = model
        self.loss = loss
        num_steps = int(config.num_steps)
        self.schedule = make_schedule(config.optimizer, num_steps)
        self.tx = make_optimizer(config.optimizer, num_steps)
        self.augment = transforms.AugmentConfig.from_mapping(config.get("augment"))
        self.crop_size = tuple(int(c) for c in crop_size) if crop_size else None

    # -- pure functions --------------------------------------------------------------------------
    def init(self, key: jax.Array, batch_spec: Mapping[str, Any]) -> TrainState:
        """Step 0 for input batches shaped like `batch_spec["image"]` (a cropped input when the
        task trains on crops)."""
        image = batch_spec["image"]
        spatial = self.crop_size or tuple(image.shape[1:-1])
        x = jnp.zeros((1, *spatial, image.shape[-1]), jnp.float32)
        return new_train_state(self.model, self.tx, key, x)

    def augment_batch(
        self, key: jax.Array, image: jax.Array, label: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """Random crop (when `crop_size` is smaller than the batch) then `config.augment`."""
        k_crop, k_aug = jax.random.split(key)
        geo_label = label if self.augment_labels else None
        if self.crop_size and tuple(image.shape[1:-1]) != self.crop_size:
            image, geo_label = transforms.random_crop(k_crop, image, geo_label, self.crop_size)
        if self.augment is not None:
            image, geo_label = transforms.augment_batch(k_aug, image, geo_label, self.augment)
        return image, (geo_label if self.augment_labels else label)

    def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
        """One optimizer step on the global batch. With `config.grad_accum_steps` k > 1 the
        (augmented) batch is cut into k micro-batches (rows i, i + k, ... so each device keeps
        its share) whose gradients are summed in a `lax.scan` (`platform.scan`: rolled on
        accelerators, with the memory of one micro-batch; unrolled on the CPU, where XLA runs
        convolution gradients in a loop far slower), the update of the whole batch (equal to it
        without batch-dependent layers)."""
        k_aug, k_drop = jax.random.split(step_key(state))
        image, label = self.augment_batch(k_aug, batch["image"], batch["label"])
        accum = int(self.config.get("grad_accum_steps") or 1)

        def loss_fn(params, stats, image, label, key):
            logits, stats = apply_model(self.model, params, stats, image, train=True, key=key)
            return jnp.sum(self.loss(logits.astype(jnp.float32), label)), stats

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        n = image.shape[0]
        if accum == 1:
            (total, stats), grads = grad_fn(state.params, state.batch_stats, image, label, k_drop)
        else:
            if n % accum:
                raise ValueError(
                    f"config.grad_accum_steps={accum} must divide config.batch_size={n}"
                )

            def micro(x: jax.Array) -> jax.Array:  # [n, ...] -> [accum, n / accum, ...]
                return jnp.swapaxes(x.reshape(n // accum, accum, *x.shape[1:]), 0, 1)

            def body(carry, xs):
                total, grads, stats = carry
                img, lab, i = xs
                (t, stats), g = grad_fn(
                    state.params, stats, img, lab, jax.random.fold_in(k_drop, i)
                )
                return (total + t, jax.tree.map(jnp.add, grads, g), stats), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (jnp.zeros((), jnp.float32), zeros, state.batch_stats)
            (total, grads, stats), _ = platform.scan(
                body, init, (micro(image), micro(label), jnp.arange(accum))
            )
        loss = total / n
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=stats,
            opt_state=opt_state,
        )
        return new_state, {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": self.schedule(state.step),
        }

    def predict(self, state: TrainState, image: jax.Array) -> jax.Array:
        """Float32 logits of `image [B, *spatial, C]`."""
        out, _ = apply_model(self.model, state.params, state.batch_stats, image, train=False)
        return out.astype(jnp.float32)

    def synthetic_batch(self, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Random images and labels shaped like one global batch (`example_shape()`)."""
        rng = np.random.default_rng(seed)
        spatial, channels, classes = self.example_shape()
        return {
            "image": rng.standard_normal((batch_size, *spatial, channels)).astype(np.float32),
            "label": rng.integers(0, classes, (batch_size, *self.label_shape(spatial))).astype(
                np.int32
            ),
        }

    def example_shape(self) -> tuple[tuple[int, ...], int, int]:
        """(spatial shape, channels, classes) of one training example from the config alone."""
        raise self.cannot("make a synthetic batch", "its input size is not in the config")

    def label_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one example's label: dense (`spatial`) for segmentation."""
        return spatial
