"""Translated files: what `predict.py` writes for the image-to-image tasks (pix2pix, CycleGAN).

`translate_files` takes image files, folders of them, NIfTI files or DICOM series folders, runs
a translation callback on them and writes one output per input on the input's own grid:

* a 2D image file (PNG / JPEG / TIFF / BMP / 2D NIfTI): scaled to [-1, 1] like the training
  images, resized to the model's `image_size`, translated, resized back; written as an 8-bit
  PNG (`[-1, 1]` -> 0..255) or, for a NIfTI input, a float32 NIfTI in [-1, 1];
* a 3D NIfTI volume or a DICOM series folder: scaled to [-1, 1] inside its non-zero voxels;
  a 3D model translates it whole (`translate_volume`, a sliding window), a 2D model slice by
  slice along the third axis, in the orientation the 2D loaders train on (NIfTI: radiological
  axial slices of the RAS+ volume, as `image_sets.load_brats_slices`; DICOM: the stored pixel
  arrays, as `image_sets.load_tcia_series`); written as a NIfTI with the input's affine.

The callbacks map images in [-1, 1] to outputs in [-1, 1] (or to class maps: `label_output`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medjax.data import image_sets, io, sources, transforms

Translate2D = Callable[[np.ndarray], np.ndarray]  # [N, H, W, C] -> [N, H, W, C']
TranslateVolume = Callable[[np.ndarray], np.ndarray]  # [X, Y, Z, C] -> [X, Y, Z, C']


def _is_dicom_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    for f in sorted(path.iterdir())[:8]:
        if f.is_file():
            with open(f, "rb") as fh:
                head = fh.read(132)
            if head[128:132] == b"DICM":
                return True
    return False


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files and DICOM series folders to translate: a folder of images is its image files."""
    out: list[Path] = []
    for p in (Path(x) for x in inputs):
        if not p.exists():
            raise FileNotFoundError(f"input {p} does not exist")
        if p.is_dir() and not _is_dicom_folder(p):
            out.extend(sources.list_image_files(p))
        else:
            out.append(p)
    return out


def _target(out_dir: Path, path: Path) -> Path:
    if path.is_dir():  # DICOM series
        return out_dir / f"{path.name}.nii.gz"
    nifti = path.name.lower().endswith(sources.NIFTI_SUFFIXES)
    return out_dir / (sources.image_stem(path) + (".nii.gz" if nifti else ".png"))


def _resize_batch(x: np.ndarray, size: Sequence[int], order: int) -> np.ndarray:
    return np.stack([transforms.resize_2d(im, size, order=order) for im in x])


def _slices_2d(
    translate: Translate2D, slices: np.ndarray, size: Sequence[int], label_output: bool
) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> outputs at [N, H, W, C'] (resized in and back out)."""
    h, w = slices.shape[1:3]
    net = _resize_batch(slices, size, 1) if tuple(size) != (h, w) else slices
    out = translate(np.clip(net, -1.0, 1.0).astype(np.float32))
    if tuple(size) != (h, w):
        if label_output:  # probabilities resampled linearly, then the class
            out = _resize_batch(out, (h, w), 1)
        else:
            out = np.clip(_resize_batch(out, (h, w), 1), -1.0, 1.0)
    return out


def translate_files(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    translate_2d: Translate2D | None,
    translate_volume: TranslateVolume | None = None,
    image_size: Sequence[int] = (),
    channels: int | None = None,
    label_output: bool = False,
    to_native: Callable[[np.ndarray], np.ndarray] | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Translates every input (see the module docstring); returns the paths written.

    `label_output`: the callbacks return class probabilities; the argmax (through
    `to_native` when given) is written as a label map. Existing outputs are refused before
    anything is computed unless `overwrite`.
    """
    files = expand_inputs(inputs)
    out_dir = Path(out_dir)
    targets = [_target(out_dir, f) for f in files]
    io.refuse_existing(targets, overwrite, "translation")
    written = []
    for f, target in zip(files, targets, strict=True):
        nifti = f.name.lower().endswith(sources.NIFTI_SUFFIXES)
        volume_input = f.is_dir() or (nifti and _nifti_ndim(f) >= 3)
        if not volume_input:
            if translate_2d is None:
                raise ValueError(f"{f} is a 2D image; this run translates 3D volumes")
            image = image_sets.read_scaled(f, spatial_dims=2, channels=channels)
            size = tuple(image_size) or image.shape[:2]
            out = _slices_2d(translate_2d, image[None], size, label_output)[0]
            if label_output:
                values = np.argmax(out, -1)
                values = to_native(values) if to_native else values
                if nifti:
                    written.append(
                        io.write_nifti_like(target, values.astype(np.int16), f, overwrite=overwrite)
                    )
                else:
                    written.append(io.write_png(target, values, overwrite=overwrite))
            elif nifti:
                written.append(
                    io.write_nifti_like(
                        target, out[..., 0] if out.shape[-1] == 1 else out, f, overwrite=overwrite
                    )
                )
            else:
                pixels = io.tanh_to_uint8(out if out.shape[-1] == 3 else out[..., 0])
                written.append(io.write_png(target, pixels, overwrite=overwrite))
            continue
        written.append(
            _translate_volume(
                f,
                target,
                translate_2d,
                translate_volume,
                image_size,
                label_output,
                to_native,
                overwrite,
            )  # fmt: skip
        )
    return written


def _nifti_ndim(path: Path) -> int:
    import nibabel as nib

    shape = nib.load(str(path)).shape
    return 3 if len(shape) >= 3 and shape[2] > 1 else 2


def _translate_volume(
    path: Path,
    target: Path,
    translate_2d: Translate2D | None,
    translate_volume: TranslateVolume | None,
    image_size: Sequence[int],
    label_output: bool,
    to_native: Callable[[np.ndarray], np.ndarray] | None,
    overwrite: bool,
) -> Path:
    dicom = path.is_dir()
    if dicom:
        vol, geom = io.read_dicom_series(path, canonical=False)
    else:
        vol, geom = io.read_nifti(path)
    io.check_finite(vol, path)
    vol = vol if vol.ndim == 4 else vol[..., None]
    mask = np.any(vol != 0, axis=-1)
    scaled = image_sets.scale_to_unit_range(vol, mask if mask.any() else None)
    if translate_volume is not None and len(image_size) == 3:
        # a model of whole volumes resized to `image_size`: resize in, translate, resize back
        net, _ = transforms.resample_to_spacing(scaled, (1.0,) * 3, None, order=1, shape=image_size)
        out = translate_volume(np.clip(net, -1.0, 1.0))
        out, _ = transforms.resample_to_spacing(out, (1.0,) * 3, None, order=1, shape=vol.shape[:3])
    elif translate_volume is not None:
        out = translate_volume(scaled)
    elif translate_2d is not None:
        # training orientation of the 2D loaders: DICOM pixel arrays / radiological NIfTI slices
        slices = (
            scaled.transpose(2, 1, 0, 3) if dicom else np.flip(scaled, (0, 1)).transpose(2, 1, 0, 3)
        )
        size = tuple(image_size) or slices.shape[1:3]
        pred = _slices_2d(translate_2d, slices, size, label_output)
        out = pred.transpose(2, 1, 0, 3) if dicom else np.flip(pred.transpose(2, 1, 0, 3), (0, 1))
    else:
        raise ValueError(f"{path} is a volume; this run translates 2D images only")
    if label_output:
        values = np.argmax(out, -1)
        values = to_native(values) if to_native else values
        return io.write_nifti(target, values, geom, dtype=np.uint8, overwrite=overwrite)
    out = np.where(mask[..., None], out, -1.0).astype(np.float32)
    return io.write_nifti(
        target, out[..., 0] if out.shape[-1] == 1 else out, geom, overwrite=overwrite
    )
