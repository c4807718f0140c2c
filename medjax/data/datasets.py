"""2D segmentation datasets: which reader, which classes, how to preprocess and split.

A *source* (`config.data.source`) names a reader of one folder of examples: `"folder"` is the
general one (any image/mask folder pair, `medjax.data.sources.load_segmentation_folder`), the
named ones are instances of it or of a special layout (`isbi2012`, `kvasir_seg`: folders with
fixed names and label conventions; `hc18`: outlines to fill and a pixel-size CSV; `mni152`: the
template shipped in nilearn; `brats_slices`: tumour slices of BraTS-layout volumes).

`list_examples(cfg, split)` lists the examples of one split (`medjax.data.listing`: files are
read only when the listing is, so a process reads its own data shards alone);
`load_examples(cfg, split)` reads them, at their ORIGINAL resolution
(`medjax.data.sources` convention: image float32 [H, W, C], label int32 [H, W], spacing, id);
`preprocess` resizes and normalises one for the network; `stack_examples` turns same-size
examples into the `{name: [N, ...]}` arrays the pipelines feed. Every reader takes a directory:
`cfg.directory` when set, else the shared data folder; a dataset folder with split sub-folders
(`train/`, `val/`, `test/`, ...) is read split by split, any other folder is one split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medjax.data import sources, transforms
from medjax.data.listing import Listing
from medjax.data.paths import data_dir

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset layout: `lister(folder, cfg) -> Listing` lists ONE split folder (examples read
    on demand); its class names, channels and shared folder(s)."""

    lister: Callable[[Path | None, Mapping[str, Any]], Listing[list[dict[str, Any]]]]
    class_names: tuple[str, ...] | None  # None: from the config (`folder`)
    shared_folder: str | None
    channels: int | None  # None: from the config (`folder`)
    shared_val_folder: str | None = None  # a separate validation folder, when the data has one
    label_values: Mapping[int, int] | None = None  # stored mask value -> class (fixed layouts)


def _mode(cfg: Mapping[str, Any]) -> str | None:
    channels = int(cfg.get("channels") or 0)
    return {0: None, 1: "L", 3: "RGB"}.get(channels, None)


def _folder(directory: Path | None, cfg: Mapping[str, Any]) -> Listing[list[dict[str, Any]]]:
    if directory is None:
        raise ValueError("config.data.source='folder' needs config.data.directory")
    values = cfg.get("label_values") or None
    threshold = cfg.get("mask_threshold")
    return sources.list_segmentation_folder(
        directory,
        images=str(cfg.get("images", "images")),
        masks=str(cfg.get("masks", "masks")),
        num_classes=int(cfg["num_classes"]),
        image_suffix=str(cfg.get("image_suffix", "")),
        mask_suffix=str(cfg.get("mask_suffix", "")),
        label_values={int(k): int(v) for k, v in dict(values).items()} if values else None,
        threshold=None if threshold is None or float(threshold) < 0 else float(threshold),
        mode=_mode(cfg),
    )


def load_brats_region_slices(
    directory: Path | None, cfg: Mapping[str, Any]
) -> list[dict[str, Any]]:
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


SOURCES: dict[str, Source] = {
    "folder": Source(_folder, None, None, None),
    "mni152": Source(
        lambda d, cfg: Listing.of_examples(
            sources.load_mni152_slices(axis=2, directory=d), where="MNI152"
        ),
        sources.MNI152_CLASSES,
        None,
        1,
    ),
    "isbi2012": Source(
        lambda d, cfg: sources.list_segmentation_folder(
            d, images="image", masks="label", label_values=sources.ISBI2012_LABEL_VALUES, mode="L"
        ),
        sources.ISBI2012_CLASSES,
        "isbi2012_em_membrane",
        1,
        label_values=sources.ISBI2012_LABEL_VALUES,
    ),
    "kvasir_seg": Source(
        lambda d, cfg: sources.list_segmentation_folder(d, threshold=127, mode="RGB"),
        sources.KVASIR_CLASSES,
        "kvasir_seg_polyps",
        3,
    ),
    "hc18": Source(
        lambda d, cfg: sources.list_hc18(d), sources.HC18_CLASSES, "hc18_fetal_head_ultrasound", 1
    ),
    "brats_slices": Source(
        lambda d, cfg: Listing.of_examples(load_brats_region_slices(d, cfg), where=str(d)),
        ("background", "tumour"),
        "brats2015_deepmedic_3d/train",
        1,
        "brats2015_deepmedic_3d/validation",
    ),
}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"config.data.source={name!r} is not one of {sorted(SOURCES)}")
    return SOURCES[name]


def class_names(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The source's classes, or for `folder` `cfg.class_names` (default `background`,
    `class1`, ...) of `cfg.num_classes`; ValueError when the count disagrees."""
    src = get_source(cfg["source"])
    n = int(cfg["num_classes"])
    names = (
        src.class_names
        or tuple(cfg.get("class_names") or ())
        or (
            "background",
            *(f"class{c}" for c in range(1, n)),
        )
    )
    if len(names) != n:
        raise ValueError(
            f"config.data.num_classes={n} but dataset {cfg['source']!r} has classes {tuple(names)}"
        )
    return tuple(str(x) for x in names)


def channels(cfg: Mapping[str, Any]) -> int | None:
    """Image channels of the source (`cfg.channels` for `folder`; None when as stored)."""
    src = get_source(cfg["source"])
    return src.channels if src.channels is not None else (int(cfg.get("channels") or 0) or None)


def stored_values(cfg: Mapping[str, Any]) -> dict[int, int]:
    """Class -> the value a mask file of the dataset stores for it (to write predictions in the
    dataset's own convention): the inverse of the source's or `cfg.label_values` map, 0/255
    for two classes, else the class index itself."""
    values = get_source(cfg["source"]).label_values or cfg.get("label_values")
    if values:
        return {int(v): int(k) for k, v in dict(values).items()}
    n = int(cfg["num_classes"])
    return {0: 0, 1: 255} if n == 2 else {c: c for c in range(n)}


def resolve_directory(cfg: Mapping[str, Any]) -> Path | None:
    """`cfg.directory`, else the shared folder of `cfg.source` (None for embedded data)."""
    if cfg.get("directory"):
        return Path(str(cfg["directory"]))
    folder = get_source(cfg["source"]).shared_folder
    return None if folder is None else data_dir(folder)


def resolve_val_directory(cfg: Mapping[str, Any]) -> Path | None:
    """`cfg.val_directory`, else the source's shared validation folder, else None (the
    validation split is then cut from the training folder by `split`)."""
    if cfg.get("val_directory"):
        return Path(str(cfg["val_directory"]))
    folder = get_source(cfg["source"]).shared_val_folder
    return None if folder is None or cfg.get("directory") else data_dir(folder)


def _list(src: Source, folder: Path | None, cfg: Mapping[str, Any], split: str) -> Listing:
    return src.lister(None if folder is None else sources.split_folder(folder, split), cfg)


def load_examples(
    cfg: Mapping[str, Any], split: str, seed: int = 0, *, directory: str | Path | None = None
) -> list[dict[str, Any]]:
    """The examples of `list_examples(cfg, split, seed, directory=directory)`, read."""
    return list_examples(cfg, split, seed, directory=directory).read()


def list_examples(
    cfg: Mapping[str, Any], split: str, seed: int = 0, *, directory: str | Path | None = None
) -> Listing[list[dict[str, Any]]]:
    """The examples of `split` ("train", "val" or "test"), listed (read on demand, at their
    original resolution).

    With `directory`: every example of that folder's `split` folder (or of the folder itself
    when it has no split folders), any folder in the source's layout. Without it: the configured
    data, split as in training (`val_directory`, else the dataset's own `val/` folder, else
    `val_ids` / `val_slices` / `val_fraction` of the training folder; `max_examples` caps each
    split); "test" reads `cfg.test_directory`
    or the `test` folder of the dataset.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    src = get_source(cfg["source"])
    if directory is not None:
        return _list(src, Path(directory), cfg, split)
    root = resolve_directory(cfg)
    cap = int(cfg.get("max_examples") or 0)
    if split == "test":
        test_dir = cfg.get("test_directory") or None
        if test_dir is None and (root is None or sources.split_folder(root, "test") == root):
            raise FileNotFoundError(
                f"dataset {cfg['source']!r} at {root} has no test folder; pass one "
                "(evaluate.py --data_dir DIR) or set config.data.test_directory"
            )
        return _list(src, Path(test_dir) if test_dir else root, cfg, "test")
    val_dir = resolve_val_directory(cfg)
    if val_dir is None and root is not None and sources.split_folder(root, "val") != root:
        val_dir = root  # the dataset's own val/ folder
    if val_dir is not None:  # validation cases live in their own folder
        chosen = _list(src, root if split == "train" else val_dir, cfg, split)
    else:
        every = _list(src, root, cfg, "train")
        train, val = split_positions(every.ids, every.meta.get("slice_index"), cfg, seed)
        chosen = every.take(train if split == "train" else val)
    chosen = chosen.head(cap)  # smoke runs: cap each split after splitting
    if not len(chosen):
        raise ValueError(f"dataset {cfg['source']!r} at {root}: the {split} split is empty")
    return chosen


def preprocess(ex: dict[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Resize (`image_size` (H, W) or `scale`) and normalise one example (host side, numpy)."""
    if cfg.get("image_size"):
        ex = transforms.resize_example(ex, tuple(cfg["image_size"]))
    elif cfg.get("scale") and float(cfg["scale"]) != 1.0:
        ex = transforms.resize_example(ex, scale=float(cfg["scale"]))
    ex = dict(ex)
    ex["image"] = transforms.normalize_image(ex["image"], cfg.get("normalize", "zscore"))
    return ex


def split_examples(
    examples: list[dict[str, Any]], cfg: Mapping[str, Any], seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`split_positions` of example dicts: (train, val)."""
    has_slices = bool(examples) and all("slice_index" in ex for ex in examples)
    train, val = split_positions(
        [ex["id"] for ex in examples],
        [ex["slice_index"] for ex in examples] if has_slices else None,
        cfg,
        seed,
    )
    return [examples[i] for i in train], [examples[i] for i in val]


def split_positions(
    ids: Sequence[str], slice_index: Sequence[int] | None, cfg: Mapping[str, Any], seed: int
) -> tuple[list[int], list[int]]:
    """Train/validation positions (when there is no validation folder), from the ids alone:
    explicit `val_ids`, else a `val_slices=(lo, hi)` block of `slice_index` (with `val_gap`
    slices either side dropped from training), else a seeded `val_fraction`."""
    ids = [str(i) for i in ids]
    if cfg.get("val_ids"):
        want = {str(i) for i in cfg["val_ids"]}
        missing = sorted(want - set(ids))
        if missing:
            raise ValueError(
                f"config.data.val_ids {missing} are not in the dataset (ids: {ids[:8]}...)"
            )
        return (
            [i for i, x in enumerate(ids) if x not in want],
            [i for i, x in enumerate(ids) if x in want],
        )
    if cfg.get("val_slices"):
        lo, hi = (int(v) for v in cfg["val_slices"])
        gap = int(cfg.get("val_gap", 0))
        if slice_index is None:
            raise ValueError(
                f"config.data.val_slices needs examples with a 'slice_index' (volume slices); "
                f"source {cfg['source']!r} has none: use val_ids or val_fraction"
            )
        z = [int(v) for v in slice_index]
        return (
            [i for i, v in enumerate(z) if not lo - gap <= v < hi + gap],
            [i for i, v in enumerate(z) if lo <= v < hi],
        )
    return sources.split_examples(range(len(ids)), float(cfg.get("val_fraction", 0.2)), seed)


def stack_examples(
    examples: Sequence[dict[str, Any]], keys: Sequence[str] = ("image", "label")
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
