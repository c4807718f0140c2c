"""Multi-modal volume segmentation (BraTS-style) with an N-D U-Net trained on patches.

The recipe (after nnU-Net / the BraTS literature):

* cases are read once by a dataset layout (`medjax.data.volumes`: BraTS 2018-21 naming, the
  deepmedic BraTS copy, MSD, generic), labels mapped to one internal scheme
  (0 background, 1 NCR/NET, 2 edema, 3 enhancing tumour);
* host preprocessing per case: z-score inside the brain mask with percentile clipping, crop to the
  brain's bounding box (plus a margin), resample to `data.spacing` (e.g. 2 mm for a CPU);
* training on `patch_size` patches, a fraction `data.fg_fraction` of them centred on tumour voxels,
  with flips, in-plane 90-degree rotations, small affine, intensity and gamma augmentation on the
  device inside the jitted step (`augment` config, inherited from the 2D task);
* evaluation on WHOLE validation volumes by jitted Gaussian-blended sliding-window inference
  (`config.inference`), the prediction resampled back to the original grid and scored there per
  BraTS region (whole tumour WT, tumour core TC, enhancing tumour ET): Dice, sensitivity,
  specificity and HD95 (mm).

`config.model.spatial_dims=2` with a 2-D `patch_size` trains the same way on axial slices.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medjax import metrics, visualize
from medjax.train.tasks import segmentation

REGION_METRICS = ("dice", "sensitivity", "specificity", "hd95")


def resolve_split_dir(data_cfg: Mapping[str, Any], which: str) -> Path:
    """`data.directory` / `data.val_directory`, else `<shared folder>/<train_split|val_split>`."""
    from medjax.data.paths import data_dir

    key, split_key = (
        ("directory", "train_split") if which == "train" else ("val_directory", "val_split")
    )
    if data_cfg.get(key):
        return Path(str(data_cfg[key]))
    if not data_cfg.get("shared_folder"):
        raise ValueError(f"config.data.{key} is empty and config.data.shared_folder is not set")
    return data_dir(str(data_cfg["shared_folder"])) / str(data_cfg.get(split_key, which))


def region_rows(
    pred: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    regions: Mapping[str, Sequence[int]],
) -> dict[str, float]:
    """Dice, sensitivity, specificity and HD95 (in `spacing` units) of every region of one case.

    `pred` and `label` are internal class maps of equal shape; a region is a set of classes.
    Empty-set conventions are those of `medjax.metrics` (Dice 1 when both empty, sensitivity NaN
    without positives, HD95 NaN when exactly one mask is empty).
    """
    row: dict[str, float] = {}
    for name, classes in regions.items():
        p = np.isin(pred, classes)
        t = np.isin(label, classes)
        m = metrics.segmentation_metrics(
            jnp.asarray(p[None], jnp.int32), jnp.asarray(t[None], jnp.int32), 2
        )
        for k in ("dice", "sensitivity", "specificity"):
            row[f"{k}_{name}"] = float(np.asarray(m[k])[0, 1])
        row[f"hd95_{name}"] = metrics.hausdorff_distance(p, t, spacing=tuple(spacing))
    return row


class Task(segmentation.Task):
    """U-Net on patches of multi-modal volumes, evaluated on whole volumes by sliding window.

    Config fields beyond the 2D task's: `patch_size`, `data.layout`, `data.modalities`,
    `data.shared_folder` / `data.train_split` / `data.val_split` (or `data.directory` /
    `data.val_directory`), `data.spacing`, `data.crop_margin`, `data.clip_percentiles`,
    `data.fg_fraction`, `inference.{window, overlap, window_batch, sigma_scale, mode}`.
    """

    def __init__(self, config: Any):
        super().__init__(config)
        from medjax.data import volumes

        self.patch_size = tuple(int(p) for p in config.patch_size)
        if len(self.patch_size) != int(config.model.spatial_dims):
            raise ValueError(
                f"config.patch_size={self.patch_size} needs one entry per spatial dim "
                f"(config.model.spatial_dims={config.model.spatial_dims})"
            )
        self.crop_size = None  # batches arrive at patch size
        self.modalities = tuple(str(m) for m in config.data.modalities)
        self.regions = dict(volumes.BRATS_REGIONS)
        self.class_names = tuple(volumes.BRATS_CLASSES)
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"config.data.num_classes={self.num_classes} but the BraTS scheme has classes "
                f"{self.class_names}"
            )

    # -- host data ------------------------------------------------------------------------------
    def cases(self, directory: str | Path) -> list[Any]:
        from medjax.data import volumes

        return volumes.find_cases(
            directory, str(self.config.data.layout), modalities=self.modalities
        )

    def prepare(self, case: Any) -> dict[str, Any]:
        """Reads one case and preprocesses it for the network (host, numpy).

        Returns the network-grid `image [*grid, C]` (and `label` when the case has one) plus
        what is needed to map a prediction back: `bbox` (crop of the original grid),
        `crop_shape`, the original `label_full`, `geometry`, `spacing`, `id`, `label_scheme`.
        """
        from medjax.data import transforms, volumes

        cfg = self.config.data
        ex = volumes.load_case(case, modalities=self.modalities)
        clip = tuple(cfg.get("clip_percentiles") or ()) or None
        image = transforms.zscore_in_mask(ex["image"], ex["mask"], clip_percentiles=clip)
        bbox = transforms.foreground_bbox(ex["mask"], margin=int(cfg.get("crop_margin", 0)))
        image = transforms.crop_to_bbox(image, bbox)
        crop_shape = image.shape[:-1]
        spacing = tuple(float(s) for s in ex["spacing"])
        label = ex.get("label")
        out: dict[str, Any] = {
            "id": ex["id"],
            "bbox": bbox,
            "crop_shape": crop_shape,
            "full_shape": tuple(ex["image"].shape[:-1]),
            "geometry": ex["geometry"],
            "spacing": spacing,
            "label_scheme": ex["label_scheme"],
            "label_full": label,
        }
        target = tuple(float(s) for s in (cfg.get("spacing") or ()))
        net_spacing = spacing
        if target:
            image, net_spacing = transforms.resample_to_spacing(image, spacing, target, order=1)
        out["image"] = image.astype(np.float32)
        out["net_spacing"] = tuple(float(s) for s in net_spacing)
        if label is not None:
            lab = transforms.crop_to_bbox(label, bbox)
            if target:
                lab, _ = transforms.resample_to_spacing(
                    lab, spacing, target, order=0, shape=image.shape[:-1]
                )
            out["label"] = lab.astype(np.int32)
        return out

    def load_data(self) -> dict[str, Any]:
        cfg = self.config.data
        train_cases = self.cases(resolve_split_dir(cfg, "train"))
        val_cases = self.cases(resolve_split_dir(cfg, "val"))
        if cfg.get("max_examples"):
            train_cases = train_cases[: int(cfg.max_examples)]
            val_cases = val_cases[: int(cfg.max_examples)]
        if not train_cases or not val_cases:
            raise ValueError(
                "volume segmentation needs at least one training and one validation case"
            )
        train = [self.prepare(c) for c in train_cases]
        missing = [t["id"] for t in train if "label" not in t]
        if missing:
            raise ValueError(f"training cases without a label map: {missing}")
        val = [self.prepare(c) for c in val_cases]
        return {"train": train, "eval": val, "train_ids": [t["id"] for t in train]}

    def batch_spec(self, global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        channels = len(self.modalities)
        return {
            "image": jax.ShapeDtypeStruct(
                (global_batch_size, *self.patch_size, channels), np.float32
            ),
            "label": jax.ShapeDtypeStruct((global_batch_size, *self.patch_size), np.int32),
        }

    def make_train_iter(self, data: Mapping[str, Any], **kw: Any) -> Iterator[dict[str, jax.Array]]:
        """Patches drawn as a pure function of (seed, step) from `load_data()`'s volumes."""
        from medjax.data import patches

        return patches.make_patch_train_iter(
            [{"image": t["image"], "label": t["label"]} for t in data["train"]],
            patch_size=self.patch_size,
            fg_fraction=float(self.config.data.get("fg_fraction", 0.33)),
            **kw,
        )

    # -- whole-volume prediction and scoring ------------------------------------------------------
    def predict_case(self, trainer: Any, state: Any, prepared: Mapping[str, Any]) -> np.ndarray:
        """Internal-class label map of one prepared case on its ORIGINAL grid (full shape).

        Sliding-window logits on the network grid -> softmax -> linear resampling back to the
        cropped original grid -> argmax -> pasted into the full volume (background outside).
        """
        from medjax.data import transforms

        logits = trainer.sliding_window(state, prepared["image"])
        probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
        if probs.shape[:-1] != tuple(prepared["crop_shape"]):
            probs, _ = transforms.resample_to_spacing(
                probs, prepared["net_spacing"], None, order=1, shape=prepared["crop_shape"]
            )
        pred = np.argmax(probs, axis=-1).astype(np.uint8)
        return transforms.paste_into(prepared["full_shape"], pred, prepared["bbox"], 0)

    def case_row(self, prepared: Mapping[str, Any], pred: np.ndarray) -> dict[str, Any]:
        """Per-region metrics of one case scored on the original grid."""
        row: dict[str, Any] = {"id": prepared["id"]}
        row.update(region_rows(pred, prepared["label_full"], prepared["spacing"], self.regions))
        return row

    def evaluate(
        self, trainer: Any, state: Any, data: Mapping[str, Any]
    ) -> tuple[dict[str, float], np.ndarray | None]:
        """Validation summary over whole volumes (means over cases, NaNs skipped) and a picture."""
        rows, panels = [], []
        for i, prepared in enumerate(data["eval"]):
            pred = self.predict_case(trainer, state, prepared)
            rows.append(self.case_row(prepared, pred))
            if i < int(self.config.get("num_pictures", 2)):
                panels.append(self.panel(prepared, pred))
        picture = visualize.grid(panels, cols=1, uneven=True) if panels else None
        return self.summarize_rows(rows), picture

    def summarize_rows(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Means over cases (NaNs skipped, `medjax.train.evaluate.summarize_rows`) and, per
        metric, `<metric>_mean` over the regions (the best-checkpoint metric `dice_mean`)."""
        from medjax.train.evaluate import summarize_rows

        out = summarize_rows(rows)
        for k in REGION_METRICS:
            vals = [out[f"{k}_{n}"] for n in self.regions if np.isfinite(out[f"{k}_{n}"])]
            out[f"{k}_mean"] = float(np.mean(vals)) if vals else float("nan")
        return out

    def panel(self, prepared: Mapping[str, Any], pred: np.ndarray) -> np.ndarray:
        """image | truth | prediction on the axial slice with the most tumour (original grid)."""
        from medjax.data import transforms

        label = prepared["label_full"]
        ref = label if label is not None else pred
        z = int(np.argmax((ref > 0).reshape(-1, ref.shape[-1]).sum(0))) if ref.ndim == 3 else None
        # the network-grid image mapped back for display: first modality, cropped grid
        image = prepared["image"][..., :1]
        if image.shape[:-1] != tuple(prepared["crop_shape"]):
            image, _ = transforms.resample_to_spacing(
                image, prepared["net_spacing"], None, order=1, shape=prepared["crop_shape"]
            )
        full = transforms.paste_into(
            prepared["full_shape"], image, prepared["bbox"], float(image.min())
        )
        truth = label if label is not None else np.zeros_like(pred)
        if z is not None:
            full, truth, pred = full[:, :, z], truth[:, :, z], pred[:, :, z]
        # RAS arrays: show with anterior up and the patient's left on the right (radiological)
        show = lambda a: np.flipud(np.swapaxes(a, 0, 1))  # noqa: E731
        return visualize.segmentation_panel(show(full), show(truth), show(pred))
