"""2D semantic segmentation with a U-Net (Ronneberger et al., MICCAI 2015).

Default recipe: Dice + cross-entropy loss (as nnU-Net), Adam, random crops and on-device
augmentation (flips, 90-degree rotations, small affine, intensity scale/shift, gamma) keyed by the
step. Every validation (and `evaluate.py`) case is predicted at the network's input size and
scored at its ORIGINAL resolution: class probabilities are resampled to the label's grid before
the argmax; Dice / IoU / sensitivity / specificity / precision per class, pixel accuracy, HD95
and mean surface distance per foreground class (in mm when the format gives a pixel size),
and the head circumference for HC18-style cases.

Data (`config.data.source`, `medjax.data.datasets`): any image/mask folder pair (`folder`:
PNG, JPEG, TIFF or 2D NIfTI; classes from the mask values or `data.label_values`), or a named
layout (`isbi2012`, `kvasir_seg`, `hc18`, `mni152`, `brats_slices`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medjax import metrics, visualize
from medjax.data import datasets, io, sources
from medjax.models import UNet
from medjax.train import supervised, task
from medjax.train.supervised import segmentation_loss

COUNT_METRICS = ("dice", "iou", "sensitivity", "specificity", "precision")
SURFACE_METRICS = ("hd95", "msd")


def probabilities_on(logits: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Softmax of `logits [*spatial, C]`, resampled (linear, pixel-area aligned) to `shape`."""
    from scipy import ndimage

    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    if probs.shape[:-1] != tuple(shape):
        factors = [t / s for t, s in zip(shape, probs.shape[:-1], strict=True)] + [1]
        probs = ndimage.zoom(probs, factors, order=1, grid_mode=True, mode="nearest")
    return probs


class Task(supervised.Supervised):
    """U-Net segmentation of 2D images. Config: `data`, `model` (`UNet` fields), `loss`,
    `optimizer`, `augment`, `crop_size`, `num_steps` (see `medjax/configs/*`)."""

    summary_keys = None  # every `*_mean` and the accuracy

    def __init__(self, config: Any):
        self.class_names = datasets.class_names(config.data)
        self.num_classes = len(self.class_names)
        model = UNet(num_classes=self.num_classes, **dict(config.model))
        super().__init__(
            config, model, segmentation_loss(config.loss), crop_size=config.get("crop_size")
        )

    # -- data ------------------------------------------------------------------------------------
    def _examples(self, split: str, directory: str | Path | None = None) -> list[dict[str, Any]]:
        return datasets.load_examples(
            self.config.data, split, int(self.config.seed), directory=directory
        )

    def _preprocessed(self, examples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [datasets.preprocess(ex, self.config.data) for ex in examples]

    def load_data(self) -> task.TaskData:
        listing = datasets.list_examples(self.config.data, "train", int(self.config.seed))
        examples, shard_ids, n = task.owned_examples(listing, self.config)
        train = datasets.stack_examples(self._preprocessed(examples))
        return task.TaskData.from_arrays(
            train, self.load_eval(None, "val"), shard_ids=shard_ids, num_train=n
        )

    def load_eval(self, directory: str | Path | None, split: str) -> list[dict[str, Any]]:
        """Examples at their original resolution, each with `net_image` (the network input)."""
        cases = self._examples(split, directory)
        missing = [ex["id"] for ex in cases if ex.get("label") is None]
        if missing:
            raise ValueError(
                f"{len(missing)} {split} cases have no mask to score, e.g. {missing[0]}"
            )
        return [
            {**ex, "net_image": pre["image"]}
            for ex, pre in zip(cases, self._preprocessed(cases), strict=True)
        ]

    def example_shape(self) -> tuple[tuple[int, ...], int, int]:
        size = tuple(int(s) for s in (self.config.get("crop_size") or self.config.data.image_size))
        n_chan = datasets.channels(self.config.data)
        if not size or not n_chan:
            raise self.cannot("make a synthetic batch", "set data.image_size and data.channels")
        return size, n_chan, self.num_classes

    # -- evaluation (host) -------------------------------------------------------------------------
    def predict_logits(self, runner: task.Runner, state: Any, images: list[np.ndarray]) -> list:
        """Network logits of every image; images of one shape go through in batches (the
        network is fully convolutional, so a user's folder may hold any sizes)."""
        out: list[Any] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(tuple(im.shape), []).append(i)
        for idx in groups.values():
            pred = runner.map_batches(state, np.stack([images[i] for i in idx]), "predict")
            for i, lg in zip(idx, pred, strict=True):
                out[i] = lg
        return out

    def case_metrics(self, example: dict[str, Any], logits: np.ndarray) -> tuple[dict, np.ndarray]:
        """Metrics of one case at its ORIGINAL resolution, and the predicted label map.

        `logits [*spatial_model, C]` come from the model input (possibly resized); class
        probabilities are resampled (linear) to the example's label shape before the argmax.
        Surface distances honour `example["spacing"]` (mm when the format gives it, else
        pixels). Cases with `hc_mm` (HC18) also get the head circumference of an ellipse fitted
        to the predicted head.
        """
        label = np.asarray(example["label"])
        pred = np.argmax(probabilities_on(logits, label.shape), axis=-1).astype(np.int32)
        spacing = tuple(float(s) for s in np.asarray(example.get("spacing", np.ones(label.ndim))))
        names = self.class_names
        row: dict[str, Any] = {"id": example["id"]}
        row.update(
            metrics.region_scores(
                pred, label, {n: (c,) for c, n in enumerate(names)}, metrics=COUNT_METRICS
            )
        )
        row["accuracy"] = float(np.mean(pred == label))
        row.update(
            metrics.region_scores(
                pred,
                label,
                {n: (c,) for c, n in enumerate(names) if c},
                spacing=spacing,
                metrics=SURFACE_METRICS,
            )
        )
        if "hc_mm" in example:
            hc = metrics.head_circumference_mm(pred == 1, spacing)
            row["hc_true_mm"] = float(example["hc_mm"])
            row["hc_pred_mm"] = float(hc)
            row["hc_abs_error_mm"] = abs(float(hc) - float(example["hc_mm"]))
        return row, pred

    def evaluate(
        self, runner: task.Runner, state: Any, eval_set: Any, num_pictures: int = 4
    ) -> task.Evaluation:
        logits = self.predict_logits(runner, state, [ex["net_image"] for ex in eval_set])
        rows, pictures = [], {}
        for i, (ex, lg) in enumerate(zip(eval_set, logits, strict=True)):
            row, pred = self.case_metrics(ex, lg)
            rows.append(row)
            if i < num_pictures:
                pictures[str(ex["id"])] = visualize.segmentation_panel(
                    ex["image"], ex["label"], pred
                )
        summary = metrics.summarize_rows(rows)
        summary.update(
            metrics.mean_over_regions(
                summary, COUNT_METRICS + SURFACE_METRICS, self.class_names[1:]
            )
        )
        return task.Evaluation(summary, rows, pictures)

    # -- prediction files ------------------------------------------------------------------------
    def predict_files(
        self,
        runner: task.Runner,
        state: Any,
        inputs: Sequence[str | Path],
        out_dir: str | Path,
        *,
        overwrite: bool = False,
    ) -> list[Path]:
        """One mask per input image (image files, or folders of them): `<id>.png` (8-bit,
        16-bit past 255 classes) in the dataset's own mask values (`datasets.stored_values`), on the
        input's pixel grid; NIfTI inputs give `<id>.nii.gz` with the input's affine."""
        files: list[Path] = []
        for p in (Path(x) for x in inputs):
            files.extend(sources.list_image_files(p) if p.is_dir() else [p])
        out_dir = Path(out_dir)
        targets = [
            out_dir / (sources.image_stem(f) + (".nii.gz" if _is_nifti(f) else ".png"))
            for f in files
        ]
        io.refuse_existing(targets, overwrite, "prediction")
        mode = {1: "L", 3: "RGB"}.get(datasets.channels(self.config.data) or 0)
        lut = datasets.stored_values(self.config.data)
        written = []
        for f, target in zip(files, targets, strict=True):
            image, spacing = sources.read_image_2d(f, mode)
            ex = {"image": image, "label": None, "spacing": spacing, "id": sources.image_stem(f)}
            net = datasets.preprocess(ex, self.config.data)["image"]
            (logits,) = self.predict_logits(runner, state, [net])
            pred = np.argmax(probabilities_on(logits, image.shape[:2]), axis=-1)
            stored = np.vectorize(lut.get, otypes=[np.int64])(pred)
            if _is_nifti(f):
                written.append(
                    io.write_nifti_like(target, stored.astype(np.uint16), f, overwrite=overwrite)
                )
            else:
                written.append(io.write_png(target, stored, overwrite=overwrite))
        return written


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(sources.NIFTI_SUFFIXES)
