"""Pictures for notebooks and logs: label overlays, slice montages, sample grids (numpy + Pillow).

Everything returns uint8 RGB arrays `[H, W, 3]`; `save_png` writes one. No TensorFlow or JAX.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Class colours: 0 is transparent in overlays; 1.. are distinct and colour-blind friendly-ish.
PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
    ],
    dtype=np.uint8,
)


def to_uint8(image: np.ndarray, *, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Min-max (or `lo`/`hi`) scales a `[H, W]` or `[H, W, C]` image to uint8 RGB `[H, W, 3]`."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    lo = float(np.nanmin(x)) if lo is None else lo
    hi = float(np.nanmax(x)) if hi is None else hi
    x = np.clip((x - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
    x = np.nan_to_num(x)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    elif x.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got image of shape {image.shape}")
    return (x * 255 + 0.5).astype(np.uint8)


def colorize(label: np.ndarray) -> np.ndarray:
    """Integer class map `[H, W]` -> RGB `[H, W, 3]` (class 0 black)."""
    lab = np.asarray(label).astype(np.int64)
    return PALETTE[lab % len(PALETTE)]


def overlay(image: np.ndarray, label: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """Image with non-zero classes blended in colour; `[H, W(, C)]` + `[H, W]` -> RGB uint8."""
    base = to_uint8(image).astype(np.float32)
    lab = np.asarray(label)
    if lab.shape != base.shape[:2]:
        raise ValueError(f"label shape {lab.shape} does not match image shape {base.shape[:2]}")
    col = colorize(lab).astype(np.float32)
    fg = (lab > 0)[..., None]
    out = np.where(fg, (1 - alpha) * base + alpha * col, base)
    return out.astype(np.uint8)


def hstack(panels: Sequence[np.ndarray], *, pad: int = 2) -> np.ndarray:
    """Panels of equal height side by side with a white gutter."""
    h = max(p.shape[0] for p in panels)
    out = []
    for i, p in enumerate(panels):
        if p.shape[0] != h:
            p = np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)))
        out.append(p)
        if i < len(panels) - 1:
            out.append(np.full((h, pad, 3), 255, np.uint8))
    return np.concatenate(out, axis=1)


def grid(
    images: Sequence[np.ndarray], *, cols: int = 8, pad: int = 2, uneven: bool = False
) -> np.ndarray:
    """Tiles RGB uint8 images `[H, W, 3]` into a grid with white gutters.

    The images must share one shape, unless `uneven=True`: then each is padded with white at
    its bottom and right to the largest height and width (e.g. panels of volumes of different
    sizes)."""
    if not len(images):
        raise ValueError("grid() needs at least one image")
    shapes = sorted({tuple(np.shape(im)) for im in images})
    if len(shapes) != 1 and uneven:
        h = max(s[0] for s in shapes)
        w = max(s[1] for s in shapes)
        images = [
            np.pad(im, ((0, h - im.shape[0]), (0, w - im.shape[1]), (0, 0)), constant_values=255)
            for im in images
        ]
        shapes = [(h, w, 3)]
    if len(shapes) != 1:  # numpy would silently broadcast a smaller image into its tile
        raise ValueError(f"grid() needs images of one shape, got {shapes}")
    h, w = images[0].shape[:2]
    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = im
    return out


def segmentation_panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """image | truth overlay | prediction overlay, one RGB uint8 strip."""
    return hstack([to_uint8(image), overlay(image, truth), overlay(image, pred)])


def montage(
    volume: np.ndarray,
    *,
    num_slices: int = 5,
    axis: int = 2,
    lo: float | None = None,
    hi: float | None = None,
) -> np.ndarray:
    """`num_slices` evenly spaced slices of a volume `[X, Y, Z(, C)]` along `axis`, side by side.

    Slices are taken at the centres of `num_slices` equal blocks of the axis (so the middle slice
    is shown when `num_slices` is odd); all share one intensity scale (`lo`/`hi`, default the
    volume's min/max). Returns RGB uint8.
    """
    vol = np.asarray(volume, np.float32)
    if vol.ndim == 4 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise ValueError(f"montage() needs a [X, Y, Z] or [X, Y, Z, 1] volume, got {volume.shape}")
    n = vol.shape[axis]
    idx = [int((2 * i + 1) * n // (2 * num_slices)) for i in range(min(num_slices, n))]
    lo = float(np.nanmin(vol)) if lo is None else lo
    hi = float(np.nanmax(vol)) if hi is None else hi
    return hstack([to_uint8(np.take(vol, i, axis=axis), lo=lo, hi=hi) for i in idx])


def sample_grid(
    images: np.ndarray, *, cols: int = 8, lo: float = -1.0, hi: float = 1.0, num_slices: int = 5
) -> np.ndarray:
    """A grid of generated samples `[N, H, W, C]` (C = 1 or 3), or one slice montage per row for
    volumes `[N, X, Y, Z, 1]`, on the fixed intensity scale `[lo, hi]` (the tanh range by
    default, so grids of different steps are comparable). Returns RGB uint8."""
    x = np.asarray(images, np.float32)
    if x.ndim == 5:
        return grid([montage(v, num_slices=num_slices, lo=lo, hi=hi) for v in x], cols=1)
    if x.ndim != 4:
        raise ValueError(f"sample_grid() needs [N, H, W, C] or [N, X, Y, Z, C], got {x.shape}")
    if x.shape[-1] not in (1, 3):
        x = x[..., :1]
    return grid([to_uint8(im, lo=lo, hi=hi) for im in x], cols=cols)


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Writes an RGB/greyscale uint8 array as PNG, creating parent folders; atomically (a
    temporary file in the same folder, then a rename), so a kill never leaves half a PNG."""
    from PIL import Image

    from medjax import files  # imported here: the layer library imports nothing else of medjax

    path = Path(path)
    with files.replacing(path, ".png") as tmp:
        Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(tmp, format="PNG")
    return path
