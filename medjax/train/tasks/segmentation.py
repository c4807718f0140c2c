"""Semantic segmentation with a U-Net (Ronneberger et al., MICCAI 2015), 2D or 3D.

Default recipe: Dice + cross-entropy loss (as nnU-Net), Adam, random crops and on-device
augmentation (flips, 90-degree rotations, small affine, intensity scale/shift, gamma) keyed by the
step, per-example Dice / IoU / sensitivity / specificity / precision / accuracy on validation.

State is arrays only (`TrainState`); the model, optimizer and loss live on the task object. The
loop (`medjax.train.loop`) owns jit, shardings and checkpoints; nothing here calls them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import losses, metrics, visualize
from medjax.data import transforms
from medjax.models import UNet
from medjax.train.optim import make_optimizer, make_schedule

LOSSES = {
    "ce": losses.cross_entropy,
    "dice": losses.soft_dice_loss,
    "dice_ce": losses.dice_ce_loss,
    "focal": losses.focal_loss,
}


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a plain pytree of arrays (Orbax-friendly)."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    batch_stats: Any  # BatchNorm running statistics ({} for instance/group norm)
    opt_state: Any
    rng: jax.Array  # uint32 key data of the run's base key; step keys are fold_in(rng, step)


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


class Task:
    """U-Net segmentation task. `config` fields used: `data`, `model`, `loss`, `optimizer`,
    `augment`, `crop_size`, `num_steps` (see `medjax/configs/*` for documented examples)."""

    def __init__(self, config: Any):
        self.config = config
        self.num_classes = int(config.data.num_classes)
        model_cfg = dict(config.model)
        self.model = UNet(num_classes=self.num_classes, **model_cfg)
        self.schedule = make_schedule(config.optimizer, config.num_steps)
        self.tx = make_optimizer(config.optimizer, config.num_steps)
        loss_cfg = dict(config.loss)
        name = loss_cfg.pop("name")
        if name not in LOSSES:
            raise ValueError(f"config.loss.name={name!r} is not one of {sorted(LOSSES)}")
        self.loss_fn = functools.partial(LOSSES[name], **loss_cfg)
        aug = dict(config.augment)
        enabled = aug.pop("enabled", True)
        aug = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in aug.items()}
        self.augment = transforms.AugmentConfig(**aug) if enabled else None
        crop = config.get("crop_size")
        self.crop_size = tuple(int(c) for c in crop) if crop else None
        self.class_names: tuple[str, ...] = tuple(f"class{i}" for i in range(self.num_classes))

    # -- data ----------------------------------------------------------------------------------
    def load_data(self) -> dict[str, Any]:
        """`{"train": arrays, "eval": arrays, "eval_examples": [...]}` (host numpy)."""
        from medjax.data import datasets

        data = datasets.load_segmentation(self.config.data, seed=self.config.seed)
        names = tuple(data["class_names"])
        if len(names) != self.num_classes:
            raise ValueError(
                f"config.data.num_classes={self.num_classes} but dataset "
                f"{self.config.data.source!r} has classes {names}"
            )
        self.class_names = names
        return {
            "train": datasets.stack_examples(data["train"]),
            "eval": datasets.stack_examples(data["val"]),
            "eval_examples": data["val"],
            "train_ids": [ex["id"] for ex in data["train"]],
        }

    # -- pure functions --------------------------------------------------------------------------
    def init(self, key: jax.Array, batch: Mapping[str, Any]) -> TrainState:
        """Initial state for input batches shaped like `batch` (arrays or ShapeDtypeStructs)."""
        init_key, base_key = jax.random.split(key)
        image = batch["image"]
        spatial = self.crop_size or tuple(image.shape[1:-1])
        x = jnp.zeros((1, *spatial, image.shape[-1]), jnp.float32)
        variables = self.model.init(init_key, x, train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=self.tx.init(params),
            rng=jax.random.key_data(base_key),
        )

    def _augment(self, key: jax.Array, image: jax.Array, label: jax.Array):
        k_crop, k_aug = jax.random.split(key)
        if self.crop_size and tuple(image.shape[1:-1]) != self.crop_size:
            image, label = transforms.random_crop(k_crop, image, label, self.crop_size)
        if self.augment is not None:
            image, label = transforms.augment_batch(k_aug, image, label, self.augment)
        return image, label

    def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        image, label = self._augment(key, batch["image"], batch["label"])

        def loss_fn(params):
            variables = _variables(params, state.batch_stats)
            if state.batch_stats:
                logits, updates = self.model.apply(
                    variables, image, train=True, mutable=["batch_stats"]
                )
                new_stats = updates["batch_stats"]
            else:
                logits, new_stats = self.model.apply(variables, image, train=True), {}
            per_example = self.loss_fn(logits.astype(jnp.float32), label)
            return jnp.mean(per_example), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=new_stats,
            opt_state=opt_state,
        )
        out = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": self.schedule(state.step),
        }
        return new_state, out

    def predict(self, state: TrainState, image: jax.Array) -> jax.Array:
        """Float32 logits `[B, *spatial, num_classes]` for `image [B, *spatial, C]`."""
        logits = self.model.apply(_variables(state.params, state.batch_stats), image, train=False)
        return logits.astype(jnp.float32)

    def eval_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-example metrics (`[B]` or `[B, C]`) and the predicted label map `pred`."""
        logits = self.predict(state, batch["image"])
        pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        out = metrics.segmentation_metrics(pred, batch["label"], self.num_classes)
        out["loss"] = self.loss_fn(logits, batch["label"])
        out["pred"] = pred
        return out

    # -- host-side summaries -------------------------------------------------------------------
    def summarize(self, per_example: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Means over validation examples: per-class values and `<metric>_mean` over foreground
        classes (class 0 is background). NaN entries (undefined metrics) are skipped."""
        out: dict[str, float] = {}
        for k, v in per_example.items():
            if k == "pred":
                continue
            v = np.asarray(v, np.float64)
            if v.ndim == 1:
                out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                continue
            with np.errstate(all="ignore"):
                per_class = [
                    float(np.nanmean(v[:, c])) if np.isfinite(v[:, c]).any() else float("nan")
                    for c in range(v.shape[1])
                ]
            for name, val in zip(self.class_names, per_class, strict=True):
                out[f"{k}_{name}"] = val
            fg = [x for x in per_class[1:] if np.isfinite(x)] if len(per_class) > 1 else per_class
            out[f"{k}_mean"] = float(np.mean(fg)) if fg else float("nan")
        return out

    def visualize(
        self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], max_rows: int = 4
    ) -> np.ndarray:
        """image | truth | prediction strips for the first rows of an eval batch (RGB uint8).
        3D inputs show their middle slice along the first spatial axis."""
        rows = []
        n = int(np.sum(batch.get("_mask", np.ones(len(batch["image"]), bool))))
        for i in range(min(max_rows, n)):
            img, lab, pred = batch["image"][i], batch["label"][i], outputs["pred"][i]
            if lab.ndim == 3:
                mid = lab.shape[0] // 2
                img, lab, pred = img[mid], lab[mid], pred[mid]
            rows.append(visualize.segmentation_panel(img, lab, pred))
        return visualize.grid(rows, cols=1)

    # -- case-level evaluation (host, full resolution) -------------------------------------------
    def case_metrics(
        self, example: Mapping[str, Any], logits: np.ndarray
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Metrics of one case at its ORIGINAL resolution, and the predicted label map.

        `logits [*spatial_model, C]` come from the model input (possibly resized); class
        probabilities are resampled (linear) to the example's label shape before the argmax.
        Surface distances (HD95, mean surface distance) honour `example["spacing"]` (mm when the
        format gives it, else pixels). Cases with `hc_mm` (HC18) also get the head circumference
        of an ellipse fitted to the predicted head.
        """
        from scipy import ndimage

        label = np.asarray(example["label"])
        probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
        if probs.shape[:-1] != label.shape:
            factors = [t / s for t, s in zip(label.shape, probs.shape[:-1], strict=True)] + [1]
            probs = ndimage.zoom(probs, factors, order=1, grid_mode=True, mode="nearest")
        pred = np.argmax(probs, axis=-1).astype(np.int32)
        counts = metrics.segmentation_metrics(pred[None], label[None], self.num_classes)
        spacing = np.asarray(example.get("spacing", np.ones(label.ndim)), np.float64)
        surf = metrics.surface_metrics(pred, label, self.num_classes, spacing=tuple(spacing))
        row: dict[str, Any] = {"id": example["id"]}
        for k, v in counts.items():
            v = np.asarray(v)[0]
            if v.ndim == 0:
                row[k] = float(v)
                continue
            for name, x in zip(self.class_names, v, strict=True):
                row[f"{k}_{name}"] = float(x)
        for k, v in surf.items():
            for name, x in zip(self.class_names[1:], np.asarray(v)[1:], strict=True):
                row[f"{k}_{name}"] = float(x)
        if "hc_mm" in example:
            hc = metrics.head_circumference_mm(pred == 1, tuple(spacing))
            row["hc_true_mm"] = float(example["hc_mm"])
            row["hc_pred_mm"] = float(hc)
            row["hc_abs_error_mm"] = abs(float(hc) - float(example["hc_mm"]))
        return row, pred
