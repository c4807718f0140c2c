"""Multi-channel 3D segmentation (nnU-Net, MSD, BraTS, ...) with an N-D U-Net trained on patches.

The recipe (after nnU-Net / the BraTS literature):

* cases are read once by a dataset layout (`medjax.data.volumes`: an nnU-Net v2 raw dataset,
  an MSD task, BraTS 2018-21 or 2023+ naming, the deepmedic BraTS copy, or one folder per case);
  the classes and the evaluation regions come from the dataset (`volumes.label_spec`: nnU-Net's
  `labels` / `regions_class_order`, MSD's `labels`, the BraTS regions WT/TC/ET declared the same
  way), any number of channels and classes;
* host preprocessing per case: z-score inside the brain (or non-zero) mask with percentile
  clipping, crop to its bounding box (plus a margin), resample to `data.spacing` (e.g. 2 mm for a
  CPU);
* training on `patch_size` patches, a fraction `data.fg_fraction` of them centred on labelled
  voxels, with flips, in-plane 90-degree rotations, small affine, intensity and gamma
  augmentation on the device inside the jitted step (`augment` config);
* evaluation on WHOLE volumes by jitted Gaussian-blended sliding-window inference
  (`config.inference`), the prediction resampled back to the original grid and scored there per
  region: Dice, sensitivity, specificity and HD95 (mm);
* `predict.py` writes each case's labels, in the dataset's own label values, as a NIfTI on the
  input's grid.

`config.model.spatial_dims=2` with a 2-D `patch_size` trains the same way on axial slices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medjax import metrics, visualize
from medjax.data import io, paths, sources, transforms, volumes
from medjax.models import UNet
from medjax.train import supervised, task
from medjax.train.supervised import segmentation_loss

REGION_METRICS = ("dice", "sensitivity", "specificity", "hd95")


class PreparedCases(Sequence):
    """Cases read and preprocessed one at a time, when iterated (evaluation on any folder
    holds one volume in memory, not all)."""

    def __init__(self, cases: Sequence[Any], prepare: Callable[[Any], dict[str, Any]]):
        self.cases, self.prepare = list(cases), prepare

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        return self.prepare(self.cases[i])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self.prepare(c) for c in self.cases)


class Task(supervised.Supervised):
    """U-Net on patches of multi-channel volumes, evaluated on whole volumes by sliding window.

    Config: `patch_size`, `data.layout`, `data.modalities` (`()`: every channel the dataset
    declares), `data.directory` / `data.val_directory` (or `data.shared_folder` with
    `data.train_split` / `data.val_split`), `data.val_fraction` (nnU-Net / MSD folders without a
    validation folder), `data.num_classes` (0: from the dataset), `data.class_names`,
    `data.regions`, `data.spacing`, `data.crop_margin`, `data.clip_percentiles`,
    `data.fg_fraction`, `inference.{window, overlap, window_batch, sigma_scale, mode}`, and the
    2D task's `model`, `loss`, `optimizer`, `augment`. `data.backend="tfds"` trains on a dataset
    prepared by `medjax.data.builders` (`data.tfds_name`, `data.tfds_data_dir`,
    `data.tfds_split`, `data.tfds_val_split`), each process reading only its part.
    """

    def __init__(self, config: Any):
        super().__init__(config, None, segmentation_loss(config.loss))
        self.patch_size = tuple(int(p) for p in config.patch_size)
        if len(self.patch_size) != int(config.model.spatial_dims):
            raise ValueError(
                f"config.patch_size={self.patch_size} needs one entry per spatial dim "
                f"(config.model.spatial_dims={config.model.spatial_dims})"
            )
        self.modalities = tuple(str(m) for m in (config.data.get("modalities") or ())) or None
        # data.brain_mask="nonzero": an explicit opt-in to a brain made of the non-zero voxels
        # where the layout has a mask file (deepmedic); "file" (default) requires the file.
        self.mask_name = "" if config.data.get("brain_mask", "file") == "nonzero" else None

    @functools.cached_property
    def spec(self) -> volumes.LabelSpec:
        """Classes and regions: declared by the dataset (nnU-Net / MSD `dataset.json`, read on
        first use) or by the layout (BraTS), overridden by `data.class_names` / `data.regions`."""
        cfg = self.config.data
        layout = str(cfg.layout)
        spec = volumes.label_spec(
            paths.split_dir(cfg, "train") if self._one_folder else None,
            layout,
            num_classes=int(cfg.get("num_classes") or 0),
            class_names=tuple(cfg.get("class_names") or ()),
            regions=dict(cfg.get("regions") or {}) or None,
        )
        n = int(cfg.get("num_classes") or 0)
        if n and n != spec.num_classes:
            raise ValueError(
                f"config.data.num_classes={n} but the {layout} dataset has {spec.num_classes} "
                f"classes {spec.class_names} (0 reads them from the dataset)"
            )
        return spec

    @functools.cached_property
    def model(self) -> UNet:
        return UNet(num_classes=self.num_classes, **dict(self.config.model))

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    @property
    def regions(self) -> dict[str, tuple[int, ...]]:
        return dict(self.spec.regions)

    @property
    def summary_keys(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(f"dice_{r}" for r in self.regions) + ("dice_mean",)

    # -- host data ------------------------------------------------------------------------------
    @property
    def _one_folder(self) -> bool:
        """nnU-Net / MSD: one dataset folder holds every split (imagesTr, imagesTs)."""
        return str(self.config.data.layout) in ("nnunet", "msd")

    def cases(self, directory: str | Path, split: str = "train") -> list[Any]:
        """The cases of a dataset folder (or of its `split` folder) in the run's layout; for
        nnU-Net / MSD folders `split="test"` reads `imagesTs` when there is one."""
        layout = str(self.config.data.layout)
        root = Path(directory)
        subset = "train"
        if self._one_folder:
            subset = "test" if split == "test" and (root / "imagesTs").is_dir() else "train"
        else:
            root = sources.split_folder(root, split)
        return volumes.find_cases(
            root, layout, modalities=self.modalities, subset=subset, mask_name=self.mask_name
        )

    def prepare(self, case: Any) -> dict[str, Any]:
        """Reads one case and preprocesses it for the network (host, numpy).

        Returns the network-grid `image [*grid, C]` (and `label` when the case has one) plus
        what is needed to map a prediction back: `bbox` (crop of the original grid),
        `crop_shape`, the original `label_full`, `geometry`, `spacing`, `id`, `label_scheme`.
        """
        return self.preprocess(volumes.load_case(case, modalities=self.modalities), case.label)

    def preprocess(self, ex: dict[str, Any], label_source: Any = None) -> dict[str, Any]:
        """`prepare` of a case already read (a `volumes.load_case` dict, e.g. from TFDS)."""
        cfg = self.config.data
        clip = tuple(cfg.get("clip_percentiles") or ()) or None
        image = transforms.zscore_in_mask(ex["image"], ex["mask"], clip_percentiles=clip)
        bbox = transforms.foreground_bbox(ex["mask"], margin=int(cfg.get("crop_margin", 0)))
        image = transforms.crop_to_bbox(image, bbox)
        crop_shape = image.shape[:-1]
        spacing = tuple(float(s) for s in ex["spacing"])
        label = ex.get("label")
        if label is not None and label.size and int(label.max()) >= self.num_classes:
            raise ValueError(
                f"case {ex['id']!r} ({label_source}) has label {int(label.max())}; the dataset "
                f"declares {self.num_classes} classes {self.class_names}"
            )
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

    def _own_dir(self, split: str) -> Path | None:
        """A folder of `split`'s own: `data.<split>_directory`, the shared dataset's split
        folder, or a split sub-folder of `data.directory`."""
        cfg = self.config.data
        if paths.has_split_dir(cfg, split):
            return paths.split_dir(cfg, split)
        if cfg.get("directory") and not self._one_folder:
            root = Path(str(cfg.directory))
            sub = sources.split_folder(root, split)
            return sub if sub != root else None
        return None

    def _split_cases(self, split: str) -> list[Any]:
        """The configured cases of `split`. Without a validation folder, `data.val_ids` or a
        seeded `data.val_fraction` of the training cases are held out (and not trained on);
        "test" needs a test folder (an nnU-Net / MSD folder's `imagesTs`)."""
        cfg = self.config.data
        if split == "test":
            own = self._own_dir("test")
            if own is None and not self._one_folder:
                raise FileNotFoundError(
                    "no test folder: set config.data.test_directory or pass evaluate.py "
                    "--data_dir DIR"
                )
            found = self.cases(own or paths.split_dir(cfg, "train"), "test")
        else:
            val_dir = self._own_dir("val")
            if split == "val" and val_dir is not None:
                found = self.cases(val_dir, "val")
            else:
                every = self.cases(self._own_dir("train") or paths.split_dir(cfg, "train"))
                if val_dir is not None:
                    found = every
                else:
                    want = {str(i) for i in (cfg.get("val_ids") or ())}
                    if want:
                        is_val = [c.id in want for c in every]
                    else:
                        _, val_i = sources.split_examples(
                            list(range(len(every))),
                            float(cfg.get("val_fraction", 0.2)),
                            int(self.config.seed),
                        )
                        is_val = [i in set(val_i) for i in range(len(every))]
                    found = [c for c, v in zip(every, is_val, strict=True) if v == (split == "val")]
        if cfg.get("max_examples"):
            found = found[: int(cfg.max_examples)]
        if not found:
            raise ValueError(f"volume segmentation needs at least one {split} case")
        return found

    def _tfds_cases(self, split: str, per_process: bool) -> tuple[list[dict[str, Any]], int]:
        """The cases of TFDS split `split` (`data.tfds_name`, prepared in `data.tfds_data_dir`
        by `medjax.data.builders`), read and preprocessed, sorted by id: this process's part
        when `per_process` (`tfds.split_for_jax_process`), else all; and the split's size."""
        from medjax.data import builders

        cfg = self.config.data
        name, data_dir = str(cfg.get("tfds_name") or ""), cfg.get("tfds_data_dir") or None
        if not name:
            raise ValueError("config.data.backend='tfds' needs config.data.tfds_name")
        kw = {} if per_process else {"process_index": 0, "process_count": 1}
        ds = builders.read_split(name, split, data_dir=data_dir, **kw)
        exs = [builders.from_tfds_example(x) for x in ds.as_numpy_iterator()]
        exs.sort(key=lambda e: e["id"])
        total = builders.split_size(name, split, data_dir=data_dir)
        return [self.preprocess(e, f"TFDS {name} {split}") for e in exs], total

    def _train_volumes(self) -> tuple[list[dict[str, Any]], list[int], int]:
        """(this process's prepared training cases, their data shards, the number of cases).

        `data.backend="files"`: the layout's files, case `i` in shard `i % K`, only this
        process's shards read; `"tfds"`: this process's part of the prepared TFDS split (one
        shard per process)."""
        cfg = self.config.data
        backend = str(cfg.get("backend") or "files")
        if backend == "files":
            every = self._split_cases("train")
            cases, shard_ids = task.owned_cases(every, self.config)
            return [self.prepare(c) for c in cases], shard_ids, len(every)
        if backend != "tfds":
            raise ValueError(f"config.data.backend={backend!r} is not 'files' or 'tfds'")
        procs = jax.process_count()
        if int(cfg.get("shards") or 0) not in (0, procs):
            raise ValueError(
                f"config.data.shards={cfg.shards}: the TFDS backend has one shard per process "
                f"({procs}); set 0"
            )
        train, total = self._tfds_cases(str(cfg.get("tfds_split") or "train"), per_process=True)
        return train, [jax.process_index()] * len(train), total

    def load_data(self) -> task.TaskData:
        train, shard_ids, num_train = self._train_volumes()
        missing = [t["id"] for t in train if "label" not in t]
        if missing:
            raise ValueError(f"training cases without a label map: {missing}")
        if str(self.config.data.get("backend") or "files") == "tfds":
            val_split = str(self.config.data.get("tfds_val_split") or "validation")
            val = self._tfds_cases(val_split, per_process=False)[0]  # every host scores all
        else:
            val = [self.prepare(c) for c in self._split_cases("val")]
        return task.TaskData.from_patches(
            train,
            val,
            patch_size=self.patch_size,
            fg_fraction=float(self.config.data.get("fg_fraction", 0.33)),
            shard_ids=shard_ids,
            num_train=num_train,
        )

    def load_eval(self, directory: str | Path | None, split: str) -> PreparedCases:
        cases = self._split_cases(split) if directory is None else self.cases(directory, split)
        unlabelled = [c.id for c in cases if c.label is None]
        if unlabelled:
            raise ValueError(
                f"{len(unlabelled)} case(s) have no label map to score against, e.g. "
                f"{unlabelled[0]!r}; predict.py writes predictions for unlabelled cases"
            )
        return PreparedCases(cases, self.prepare)

    def example_shape(self) -> tuple[tuple[int, ...], int, int]:
        if self.modalities is None:
            raise self.cannot("make a synthetic batch", "set data.modalities")
        return self.patch_size, len(self.modalities), self.num_classes

    # -- whole-volume prediction and scoring ------------------------------------------------------
    def predict_case(
        self, runner: task.Runner, state: Any, prepared: Mapping[str, Any]
    ) -> np.ndarray:
        """Internal-class label map of one prepared case on its ORIGINAL grid (full shape).

        Sliding-window logits on the network grid -> softmax -> linear resampling back to the
        cropped original grid -> argmax -> pasted into the full volume (background outside).
        """
        logits = runner.sliding_window(state, prepared["image"])
        probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
        # argmax on the cropped grid, then paste: no full-volume probability array
        pred = np.argmax(transforms.to_original_grid(probs, prepared), axis=-1).astype(np.uint8)
        return transforms.paste_into(prepared["full_shape"], pred, prepared["bbox"], 0)

    def case_row(self, prepared: Mapping[str, Any], pred: np.ndarray) -> dict[str, Any]:
        """Per-region metrics of one case scored on the original grid."""
        row: dict[str, Any] = {"id": prepared["id"]}
        row.update(
            metrics.region_scores(
                pred,
                prepared["label_full"],
                self.regions,
                spacing=prepared["spacing"],
                metrics=REGION_METRICS,
            )
        )
        return row

    def evaluate(
        self, runner: task.Runner, state: Any, eval_set: Any, num_pictures: int = 2
    ) -> task.Evaluation:
        """Whole volumes: means over cases (NaNs skipped) and `<metric>_mean` over regions."""
        rows, pictures = [], {}
        for i, prepared in enumerate(eval_set):
            pred = self.predict_case(runner, state, prepared)
            rows.append(self.case_row(prepared, pred))
            if i < num_pictures:
                pictures[str(prepared["id"])] = self.panel(prepared, pred)
        summary = metrics.summarize_rows(rows)
        summary.update(metrics.mean_over_regions(summary, REGION_METRICS, list(self.regions)))
        return task.Evaluation(summary, rows, pictures)

    def panel(self, prepared: Mapping[str, Any], pred: np.ndarray) -> np.ndarray:
        """image | truth | prediction on the axial slice with the most foreground."""
        label = prepared["label_full"]
        ref = label if label is not None else pred
        z = int(np.argmax((ref > 0).reshape(-1, ref.shape[-1]).sum(0))) if ref.ndim == 3 else None
        # the network-grid image mapped back for display: first channel, cropped grid
        image = prepared["image"][..., :1]
        full = transforms.to_original_grid(image, prepared, float(image.min()))
        truth = label if label is not None else np.zeros_like(pred)
        if z is not None:
            full, truth, pred = full[:, :, z], truth[:, :, z], pred[:, :, z]
        # RAS arrays: show with anterior up and the patient's left on the right (radiological)
        show = lambda a: np.flipud(np.swapaxes(a, 0, 1))  # noqa: E731
        return visualize.segmentation_panel(show(full), show(truth), show(pred))

    # -- prediction files ------------------------------------------------------------------------
    def resolve_inputs(self, inputs: Sequence[str | Path]) -> list[Any]:
        """Cases of every input: a dataset folder in the run's layout (its test subset for
        nnU-Net / MSD when it has one), or one case folder of such a dataset."""
        layout = str(self.config.data.layout)
        out = []
        for path in (Path(p) for p in inputs):
            if layout in ("nnunet", "msd"):
                subset = "test" if (path / "imagesTs").is_dir() else "train"
                out.extend(
                    volumes.find_cases(
                        path,
                        layout,
                        modalities=self.modalities,
                        subset=subset,
                        mask_name=self.mask_name,
                    )
                )
                continue
            try:
                out.extend(self.cases(path, "test"))
            except FileNotFoundError as as_dataset:
                # not a dataset folder: maybe ONE case folder of a dataset in this layout
                try:
                    found = [c for c in self.cases(path.parent, "test") if c.id == path.name]
                except (FileNotFoundError, ValueError):
                    found = []
                if not found:
                    raise FileNotFoundError(
                        f"{path} is neither a {layout} dataset folder nor one of its case "
                        f"folders ({as_dataset})"
                    ) from as_dataset
                out.extend(found)
        return out

    def predict_files(
        self,
        runner: task.Runner,
        state: Any,
        inputs: Sequence[str | Path],
        out_dir: str | Path,
        *,
        overwrite: bool = False,
    ) -> list[Path]:
        """One label-map NIfTI per case of `inputs` (dataset or case folders), in the
        dataset's own label values (e.g. BraTS 0/1/2/4), on the input's grid with the input's
        affine and orientation: the file overlays the input exactly in any viewer. Existing
        files are never replaced unless `overwrite`; the check happens before any computation."""
        cases = self.resolve_inputs(inputs)
        targets = [Path(out_dir) / f"{c.id}.nii.gz" for c in cases]
        io.refuse_existing(targets, overwrite, "prediction")
        written = []
        for case, target in zip(cases, targets, strict=True):
            prepared = self.prepare(case)
            pred = self.predict_case(runner, state, prepared)
            native = volumes.to_native(pred, prepared["label_scheme"])
            written.append(
                io.write_nifti(
                    target, native, prepared["geometry"], dtype=np.uint8, overwrite=overwrite
                )
            )
        return written
