"""Image classification (MedMNIST-style, 2D or 3D) with a small N-D CNN (`models.Classifier`).

Cross-entropy, Adam, on-device flips / small affine / intensity augmentation; evaluation reports
accuracy, balanced accuracy, the mean cross-entropy and (two classes) the ROC AUC of class 1.
Data (`medjax.data.image_sets.load_labelled_images`): a MedMNIST `.npz` (2D `[N, H, W(, C)]`, or
3D `[N, D, H, W]` volumes for `model.spatial_dims=3`) or a folder per class (`train/<class>/*`,
PNG / JPEG / TIFF / NIfTI), images scaled to [-1, 1].

A finished run doubles as medjax's own feature extractor for GAN metrics: the GAN tasks compute
FID and KID on the penultimate features (`features`) of a classifier trained here on the same
kind of images (`eval.classifier_workdir`), so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import metrics
from medjax.data import image_sets
from medjax.models import Classifier
from medjax.train import supervised, task
from medjax.train.state import TrainState, apply_model


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


class Task(supervised.Supervised):
    """Classifier of whole images. Config: `model` (`Classifier` fields, `spatial_dims`),
    `data.{source, shared_folder, directory, image_size, num_classes, class_names}`,
    `optimizer`, `augment`."""

    summary_keys = ("accuracy", "balanced_accuracy", "auc", "loss")
    augment_labels = False  # labels are classes: geometry applies to the image only

    def __init__(self, config: Any):
        self.num_classes = int(config.data.num_classes)
        model = Classifier(num_classes=self.num_classes, **dict(config.model))
        super().__init__(config, model, _cross_entropy)

    def _load(self, split: str, directory: str | Path | None = None) -> dict[str, np.ndarray]:
        d = image_sets.load_labelled_images(self.config.data, split, directory=directory)
        return self._checked(d, split)

    def _checked(self, d: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
        bad = sorted(set(np.unique(d["label"]).tolist()) - set(range(self.num_classes)))
        if bad:
            raise ValueError(
                f"{split} labels {bad} are outside 0..{self.num_classes - 1} "
                f"(config.data.num_classes={self.num_classes})"
            )
        dims = int(self.config.model.get("spatial_dims", 2))
        if d["image"].ndim - 2 != dims:
            raise ValueError(
                f"{split} images have shape {d['image'].shape[1:]} ({d['image'].ndim - 2}D) but "
                f"config.model.spatial_dims={dims}"
            )
        return {"image": d["image"], "label": d["label"].astype(np.int32)}

    def load_data(self) -> task.TaskData:
        listing = image_sets.list_labelled_images(self.config.data, "train")
        train, shard_ids, n = task.owned_examples(listing, self.config)
        return task.TaskData.from_arrays(
            self._checked(train, "train"), self._load("val"), shard_ids=shard_ids, num_train=n
        )

    def load_eval(self, directory: str | Path | None, split: str) -> dict[str, np.ndarray]:
        return self._load(split, directory)

    def features(self, state: TrainState, image: jax.Array) -> jax.Array:
        """Penultimate (global-average-pooled) features `[B, F]`, float32."""
        (_, feats), _ = apply_model(
            self.model, state.params, state.batch_stats, image, train=False, return_features=True
        )
        return feats.astype(jnp.float32)

    def evaluate(
        self, runner: task.Runner, state: Any, eval_set: Any, num_pictures: int = 0
    ) -> task.Evaluation:
        logits = runner.map_batches(state, eval_set["image"], "predict")
        labels = np.asarray(eval_set["label"])
        probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))
        rows = [
            {
                "id": i,
                "label": int(y),
                "pred": int(p.argmax()),
                **{f"p{c}": float(v) for c, v in enumerate(p)},
            }
            for i, (y, p) in enumerate(zip(labels, probs, strict=True))
        ]
        return task.Evaluation(metrics.classification_scores(logits, labels), rows)

    def example_shape(self) -> tuple[tuple[int, ...], int, int]:
        size = tuple(int(s) for s in self.config.data.image_size)
        return size, int(self.config.data.get("channels", 1) or 1), self.num_classes

    def label_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        return ()
