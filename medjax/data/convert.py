"""Dataset conversion: bring data into the layouts other tools (and medjax) read.

As nnU-Net's `dataset_conversion` scripts, these write a new folder and never touch the input:

* `to_nnunet`: any case layout medjax reads (BraTS, deepmedic, MSD, generic, nnU-Net) -> an
  nnU-Net v2 raw dataset (`imagesTr/<case>_<XXXX>.nii.gz`, `labelsTr/`, `dataset.json` with
  `channel_names`, `labels` declared as nnU-Net declares them, regions included). Voxels outside
  the case's brain / foreground mask are set to 0, as in skull-stripped BraTS data, so the mask
  survives the conversion (nnU-Net layouts have no mask file).
* `to_image_folders`: a MedMNIST `.npz` (or any labelled image set) -> PNG folders: one folder of
  images per split (`folder` layout, for GANs), or a folder per class per split
  (`class_folders`, torchvision's ImageFolder).
* `to_pair_folders`: paired images (`image_sets.load_paired_images`) -> pix2pix's `A/<split>/`
  and `B/<split>/` folders with matching names (`pairs`), its side-by-side `[A | B]` images
  (`aligned`), or CycleGAN's `trainA/ trainB/ testA/ testB/` (`unpaired`).

    python -m medjax.data.convert nnunet --layout deepmedic --input DIR [--input DIR2] --output OUT
    python -m medjax.data.convert medmnist --input pneumoniamnist.npz --layout class_folders \
        --output OUT
    python -m medjax.data.convert pairs --source tcia --input EXAM --modalities t1pre,t2 \
        --layout pairs --output OUT
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medjax.data import io, volumes

PathLike = str | os.PathLike[str]


def _refuse_nonempty(dst: Path) -> None:
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new output folder")


def nnunet_labels(spec: volumes.LabelSpec) -> tuple[dict[str, Any], list[int] | None]:
    """`labels` (and `regions_class_order`) of a dataset.json declaring `spec` the nnU-Net way."""
    if spec.region_order is not None:
        labels: dict[str, Any] = {"background": 0}
        labels.update({n: list(c) for n, c in spec.regions.items()})
        return labels, list(spec.region_order)
    return {n: c for c, n in enumerate(spec.class_names)}, None


def to_nnunet(
    cases: Sequence[volumes.Case],
    dst: PathLike,
    spec: volumes.LabelSpec,
    *,
    modalities: Sequence[str] | None = None,
    test_cases: Sequence[volumes.Case] = (),
    name: str = "medjax",
) -> Path:
    """Writes `cases` (and `test_cases` into `imagesTs/`, `labelsTs/`) as an nnU-Net v2 raw
    dataset in `dst` (a new or empty folder); labels are written as internal classes
    ``0..K-1`` (consecutive, as nnU-Net needs) and declared from `spec`. Returns `dst`."""
    dst = Path(dst)
    _refuse_nonempty(dst)
    channels: list[str] | None = None
    for subset, group in (("Tr", cases), ("Ts", test_cases)):
        for case in group:
            ex = volumes.load_case(case, modalities=modalities)
            channels = channels or list(ex["modalities"])
            masked = np.where(ex["mask"][..., None], ex["image"], 0.0).astype(np.float32)
            for i in range(masked.shape[-1]):
                io.write_nifti(
                    dst / f"images{subset}" / f"{case.id}_{i:04d}.nii.gz",
                    masked[..., i],
                    ex["geometry"],
                )
            if "label" in ex:
                io.write_nifti(
                    dst / f"labels{subset}" / f"{case.id}.nii.gz",
                    ex["label"],
                    ex["geometry"],
                    dtype=np.uint8,
                )
    labels, order = nnunet_labels(spec)
    meta: dict[str, Any] = {
        "name": name,
        "channel_names": {str(i): n for i, n in enumerate(channels or [])},
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    if order is not None:
        meta["regions_class_order"] = order
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))
    return dst


def _write_image(path: Path, image: np.ndarray) -> None:
    """A 2D `[H, W, C]` image as PNG, a 3D `[X, Y, Z, C]` volume as NIfTI (1 mm, identity)."""
    if image.ndim == 4:
        io.write_nifti(
            path.with_suffix(".nii.gz"), image[..., 0] if image.shape[-1] == 1 else image,
            io.Geometry.identity(image.shape[:3]),
        )  # fmt: skip
        return
    img = io.tanh_to_uint8(image)
    io.write_png(path.with_suffix(".png"), img[..., 0] if img.shape[-1] == 1 else img)


def to_image_folders(
    splits: Mapping[str, Mapping[str, np.ndarray]],
    dst: PathLike,
    *,
    by_class: bool = False,
    class_names: Sequence[str] = (),
) -> Path:
    """`splits` (`{"train": {"image": [N, ...], "label": [N]}, "val": ...}`, images in [-1, 1]
    or uint8) -> `dst/<split>/<i>.png` (or `dst/<split>/<class name>/<i>.png` with `by_class`).
    Volumes are written as NIfTI. Returns `dst`."""
    dst = Path(dst)
    _refuse_nonempty(dst)
    for split, d in splits.items():
        images = np.asarray(d["image"])
        labels = np.asarray(d.get("label", np.zeros(len(images), int)))
        names = list(class_names) or [f"class{c}" for c in range(int(labels.max(initial=0)) + 1)]
        for i, (img, y) in enumerate(zip(images, labels, strict=True)):
            folder = dst / split / names[int(y)] if by_class else dst / split
            _write_image(folder / f"{i:05d}", img)
    return dst


def to_pair_folders(
    splits: Mapping[str, Mapping[str, np.ndarray]], dst: PathLike, layout: str = "pairs"
) -> Path:
    """Paired sets (`{"train": {"source": [N, ...], "target": [N, ...]}, ...}`, in [-1, 1]) ->
    `layout` "pairs" (`A/<split>/<i>`, `B/<split>/<i>`, and `mask/<split>/<i>` when the sets
    have a `"mask"`), "aligned" (`<split>/<i>.png` holding
    `[A | B]`) or "unpaired" (`<split>A/`, `<split>B/`; training images of A and B come from
    disjoint halves, `image_sets.split_unpaired`, the test pairs keep their names)."""
    from medjax.data.image_sets import split_unpaired

    dst = Path(dst)
    _refuse_nonempty(dst)
    for split, d in splits.items():
        src, tgt = np.asarray(d["source"]), np.asarray(d["target"])
        if layout == "pairs":
            for i, (a, b) in enumerate(zip(src, tgt, strict=True)):
                _write_image(dst / "A" / split / f"{i:05d}", a)
                _write_image(dst / "B" / split / f"{i:05d}", b)
                if "mask" in d:  # 255 inside, 0 outside
                    _write_image(
                        dst / "mask" / split / f"{i:05d}",
                        np.where(d["mask"][i], 1.0, -1.0)[..., None],
                    )
        elif layout == "aligned":
            for i, (a, b) in enumerate(zip(src, tgt, strict=True)):
                _write_image(dst / split / f"{i:05d}", np.concatenate([a, b], axis=1))
        elif layout == "unpaired":
            tag = "train" if split == "train" else "test" if split == "test" else "val"
            idx_a, idx_b = (
                split_unpaired(len(src)) if split == "train" else (np.arange(len(src)),) * 2
            )
            for i in idx_a:
                _write_image(dst / f"{tag}A" / f"{i:05d}", src[i])
            for i in idx_b:
                _write_image(dst / f"{tag}B" / f"{i:05d}", tgt[i])
        else:
            raise ValueError(f"layout must be 'pairs', 'aligned' or 'unpaired', got {layout!r}")
    return dst


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    n = sub.add_parser("nnunet", help="case folders -> an nnU-Net v2 raw dataset")
    n.add_argument("--layout", required=True, choices=volumes.LAYOUTS)
    n.add_argument("--input", action="append", required=True, help="dataset folder (repeatable)")
    n.add_argument("--test_input", action="append", default=[], help="cases for imagesTs/")
    n.add_argument("--modalities", default="", help="comma-separated (default: the layout's)")
    n.add_argument("--output", required=True)
    m = sub.add_parser("medmnist", help="a MedMNIST .npz -> image folders")
    m.add_argument("--input", required=True)
    m.add_argument("--layout", choices=("folder", "class_folders"), default="class_folders")
    m.add_argument("--class_names", default="", help="comma-separated")
    m.add_argument("--output", required=True)
    q = sub.add_parser("pairs", help="co-registered MRI -> pix2pix / CycleGAN image folders")
    q.add_argument("--source", choices=("tcia", "brats_slices"), required=True)
    q.add_argument("--input", required=True, help="the TCIA exam, or BraTS training cases")
    q.add_argument("--val_input", default="", help="BraTS validation cases")
    q.add_argument("--layout", choices=("pairs", "aligned", "unpaired"), default="pairs")
    q.add_argument("--modalities", required=True, help="source,target (e.g. t1pre,t2)")
    q.add_argument("--val_slices", default="14,18", help="TCIA: the validation slice block")
    q.add_argument("--size", type=int, default=128)
    q.add_argument("--output", required=True)
    args = p.parse_args(argv)
    if args.what == "pairs":
        from medjax.data import image_sets

        mods = tuple(args.modalities.split(","))
        size = (args.size, args.size)
        if args.source == "tcia":
            d = image_sets.load_tcia_series(args.input, mods, size=size)
            block = tuple(int(v) for v in args.val_slices.split(","))
            parts = dict(zip(("train", "val"), image_sets.split_slice_block(d, block), strict=True))
        else:
            parts = {"train": image_sets.load_brats_slices(args.input, modalities=mods, size=size)}
            if args.val_input:
                parts["val"] = image_sets.load_brats_slices(
                    args.val_input, modalities=mods, size=size
                )
        if args.layout == "unpaired" and "val" in parts:
            parts["test"] = parts.pop("val")
        splits = {
            k: {"source": v["image"][..., :1], "target": v["image"][..., 1:2], "mask": v["mask"]}
            for k, v in parts.items()
        }
        print(to_pair_folders(splits, args.output, args.layout))
        return
    if args.what == "nnunet":
        mods = [s for s in args.modalities.split(",") if s] or None
        find = lambda dirs: [  # noqa: E731
            c for d in dirs for c in volumes.find_cases(d, args.layout, modalities=mods)
        ]
        spec = volumes.label_spec(args.input[0], args.layout)
        out = to_nnunet(
            find(args.input), args.output, spec, modalities=mods, test_cases=find(args.test_input)
        )
    else:
        from medjax.data.image_sets import load_medmnist

        splits = {}
        for split in ("train", "val", "test"):
            try:
                splits[split] = load_medmnist(args.input, split)
            except ValueError as exc:  # a split the file does not hold (withheld test sets)
                if "has no" not in str(exc):
                    raise
        names = [s for s in args.class_names.split(",") if s]
        out = to_image_folders(
            splits, args.output, by_class=args.layout == "class_folders", class_names=names
        )
    print(out)


if __name__ == "__main__":
    main()
