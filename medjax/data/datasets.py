"""Named 2D segmentation datasets: which reader, which classes, how to preprocess and split.

`load_segmentation(cfg)` turns a config's `data` block into train/validation example lists of one
fixed image size, and `stack_examples` into the `{name: [N, ...]}` arrays the pipelines feed.
Every reader takes a directory: `cfg.directory` when set, else the shared data folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from medjax.data import sources, transforms
from medjax.data.paths import data_dir


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset layout: `load(directory) -> examples`, its class names and its shared folder."""

    load: Callable[[str | None, Mapping[str, Any]], list[dict[str, Any]]]
    class_names: tuple[str, ...]
    shared_folder: str | None
    channels: int
    shared_val_folder: str | None = None  # a separate validation folder, when the data has one


SOURCES: dict[str, Source] = {
    "mni152": Source(
        lambda d, cfg: sources.load_mni152_slices(axis=2, directory=d),
        sources.MNI152_CLASSES,
        None,
        1,
    ),
    "isbi2012": Source(
        lambda d, cfg: sources.load_isbi2012(d, "train"),
        sources.ISBI2012_CLASSES,
        "isbi2012_em_membrane",
        1,
    ),
    "kvasir_seg": Source(
        lambda d, cfg: sources.load_kvasir_seg(d), sources.KVASIR_CLASSES, "kvasir_seg_polyps", 3
    ),
    "hc18": Source(
        lambda d, cfg: sources.load_hc18(d), sources.HC18_CLASSES, "hc18_fetal_head_ultrasound", 1
    ),
}


def load_brats_slices(directory: str | None, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Axial 2D slices of BraTS-like volumes, binary: `cfg.region` (WT, TC or ET) vs the rest.

    Every case of `directory` (layout `cfg.layout`, see `medjax.data.volumes`) is z-scored inside
    its brain mask (`cfg.clip_percentiles` clipping first), then cut into the axial slices that
    contain the region. With `cfg.slice_crop=(h, w)` each slice is cropped to the h x w window
    holding the most region pixels (the review recipe's "64x64 crops at the most tumour-dense
    regions"; note the window is chosen from the ground truth, so this protocol scores a
    detection-free task); with `()` whole slices are kept. Ids are `<case>_z<slice>`.
    """
    from medjax.data import patches, volumes

    if directory is None:
        raise ValueError("brats_slices needs config.data.directory (a folder of cases)")
    modalities = tuple(cfg.get("modalities") or ("t1ce",))
    classes = volumes.BRATS_REGIONS[str(cfg.get("region", "WT"))]
    crop = tuple(int(v) for v in (cfg.get("slice_crop") or ()))
    clip = tuple(cfg.get("clip_percentiles") or ()) or None
    out = []
    for case in volumes.find_cases(
        directory, str(cfg.get("layout", "deepmedic")), modalities=modalities
    ):
        ex = volumes.load_case(case, modalities=modalities)
        if "label" not in ex:
            raise ValueError(f"case {case.id} in {directory} has no label map")
        image = transforms.zscore_in_mask(ex["image"], ex["mask"], clip_percentiles=clip)
        region = np.isin(ex["label"], classes).astype(np.int32)
        spacing = np.asarray(ex["spacing"][:2], np.float32)
        for z in np.flatnonzero(region.reshape(-1, region.shape[-1]).any(axis=0)):
            img, lab = image[:, :, z], region[:, :, z]
            if crop:
                img, lab, _ = patches.tumour_dense_crops(img, lab, crop)
            out.append(
                {
                    "id": f"{ex['id']}_z{int(z):03d}",
                    "case": ex["id"],
                    "slice_index": int(z),
                    "image": img.astype(np.float32),
                    "label": lab.astype(np.int32),
                    "spacing": spacing,
                }
            )
    return out


SOURCES["brats_slices"] = Source(
    load_brats_slices,
    ("background", "tumour"),
    "brats2015_deepmedic_3d/train",
    1,
    "brats2015_deepmedic_3d/validation",
)


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"config.data.source={name!r} is not one of {sorted(SOURCES)}")
    return SOURCES[name]


def resolve_directory(cfg: Mapping[str, Any]) -> str | None:
    """`cfg.directory`, else the shared folder of `cfg.source` (None for embedded data)."""
    if cfg.get("directory"):
        return str(cfg["directory"])
    folder = get_source(cfg["source"]).shared_folder
    return None if folder is None else str(data_dir(folder))


def resolve_val_directory(cfg: Mapping[str, Any]) -> str | None:
    """`cfg.val_directory`, else the source's shared validation folder, else None (the
    validation split is then cut from the training folder by `split`)."""
    if cfg.get("val_directory"):
        return str(cfg["val_directory"])
    folder = get_source(cfg["source"]).shared_val_folder
    return None if folder is None or cfg.get("directory") else str(data_dir(folder))


def preprocess(ex: dict[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Resize (`image_size` (H, W) or `scale`) and normalise one example (host side, numpy)."""
    if cfg.get("image_size"):
        ex = transforms.resize_example(ex, tuple(cfg["image_size"]))
    elif cfg.get("scale") and float(cfg["scale"]) != 1.0:
        ex = transforms.resize_example(ex, scale=float(cfg["scale"]))
    ex = dict(ex)
    ex["image"] = transforms.normalize_image(ex["image"], cfg.get("normalize", "zscore"))
    return ex


def split(
    examples: list[dict[str, Any]], cfg: Mapping[str, Any], seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train/validation split (when there is no validation folder): explicit `val_ids`, else a
    `val_slices=(lo, hi)` block (with `val_gap` slices either side dropped from training), else
    a seeded `val_fraction`."""
    ids = [ex["id"] for ex in examples]
    if cfg.get("val_ids"):
        want = [str(i) for i in cfg["val_ids"]]
        missing = sorted(set(want) - set(ids))
        if missing:
            raise ValueError(
                f"config.data.val_ids {missing} are not in the dataset (ids: {ids[:8]}...)"
            )
        val = [ex for ex in examples if ex["id"] in want]
        return [ex for ex in examples if ex["id"] not in want], val
    if cfg.get("val_slices"):
        lo, hi = (int(v) for v in cfg["val_slices"])
        gap = int(cfg.get("val_gap", 0))
        if any("slice_index" not in ex for ex in examples):
            raise ValueError(
                f"config.data.val_slices needs examples with a 'slice_index' (volume slices); "
                f"source {cfg['source']!r} has none: use val_ids or val_fraction"
            )
        val = [ex for ex in examples if lo <= ex["slice_index"] < hi]
        train = [ex for ex in examples if not lo - gap <= ex["slice_index"] < hi + gap]
        return train, val
    return sources.split_examples(examples, float(cfg.get("val_fraction", 0.2)), seed)


def load_segmentation(cfg: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
    """Reads, preprocesses and splits the dataset named by `cfg.source`.

    Returns `{"train": [...], "val": [...], "class_names": (...), "directory": str | None}`.
    """
    src = get_source(cfg["source"])
    directory = resolve_directory(cfg)
    examples = [preprocess(ex, cfg) for ex in src.load(directory, cfg)]
    val_dir = resolve_val_directory(cfg)
    if val_dir:  # validation cases live in their own folder
        train = examples
        val = [preprocess(ex, cfg) for ex in src.load(val_dir, cfg)]
    else:
        train, val = split(examples, cfg, seed)
    if cfg.get("max_examples"):  # smoke runs: cap each split after splitting
        train, val = train[: int(cfg["max_examples"])], val[: int(cfg["max_examples"])]
    if not train or not val:
        raise ValueError(
            f"dataset {cfg['source']!r} at {directory} split into {len(train)} training and "
            f"{len(val)} validation examples; both must be non-empty"
        )
    return {"train": train, "val": val, "class_names": src.class_names, "directory": directory}


def stack_examples(
    examples: Sequence[dict[str, Any]], keys: Sequence[str] = ("image", "label", "spacing")
) -> dict[str, np.ndarray]:
    """List of same-size examples -> `{key: [N, ...]}` (image float32, label int32)."""
    if not examples:
        raise ValueError("no examples to stack")
    shapes = {tuple(ex["image"].shape) for ex in examples}
    if len(shapes) != 1:
        raise ValueError(
            f"examples have different image shapes {sorted(shapes)[:4]}; set config.data.image_size"
        )
    out = {}
    for k in keys:
        arr = np.stack([np.asarray(ex[k]) for ex in examples])
        out[k] = arr.astype(np.int32) if k == "label" else arr.astype(np.float32)
    return out
