"""Medical-volume I/O: NIfTI (nibabel) and DICOM series (pydicom) to numpy, and back to NIfTI.

Readers return ``(array, Geometry)``. The array is, by default, reoriented to the closest
canonical **RAS+** orientation (like ``nibabel.as_closest_canonical`` or MONAI's
``Orientation("RAS")``) by permuting and flipping axes only - voxel values are never resampled.
Increasing index along axis 0/1/2 then moves (roughly, for oblique scans) towards the patient's
Right/Anterior/Superior (``orientation_codes(geometry.affine) == "RAS"``).

:class:`Geometry` records where the returned array sits in world space (``affine``: voxel index
-> RAS+ millimetres) and how the original file was laid out (``original_affine``,
``original_shape``, ``ornt``), so :func:`write_nifti` can put a prediction made on the returned
grid back into the original layout: it overlays the input exactly in any viewer.

Layouts:

- 3D files give ``[X, Y, Z]`` arrays; 4D files (e.g. Medical Segmentation Decathlon images
  ``[X, Y, Z, modality]``) keep the 4th axis last and are reoriented spatially only.
- DICOM series give ``[X, Y, Z]`` with the voxel order, before canonicalisation, of
  nibabel/dcm2niix: (column i, row j, slice k), slices sorted along the slice normal.

Bad input raises ``FileNotFoundError`` (missing file/folder), ``FileExistsError`` (refusing to
overwrite) or ``ValueError`` (corrupt/truncated file, inconsistent series, shape mismatch),
always naming the file. nibabel is imported here; pydicom only when a DICOM series is read.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations
from numpy.typing import DTypeLike

from medjax import files

__all__ = [
    "Geometry",
    "check_finite",
    "refuse_existing",
    "tanh_to_uint8",
    "write_png",
    "orientation_codes",
    "read_dicom_series",
    "read_nifti",
    "voxel_spacing",
    "write_nifti",
]

PathLike = str | os.PathLike[str]

_IDENTITY_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
# NIfTI xform codes: 1 = scanner anatomical, 2 = aligned to another volume.
_SCANNER, _ALIGNED = 1, 2


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def voxel_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size (mm) along each array axis: the column norms of the affine's linear part.

    ``affine`` is ``(N+1, N+1)`` (usually 4x4, voxel -> world); returns ``N`` floats.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise ValueError(f"affine must be a square (N+1)x(N+1) matrix, got shape {a.shape}")
    return tuple(float(x) for x in np.linalg.norm(a[:-1, :-1], axis=0))


def orientation_codes(affine: np.ndarray) -> str:
    """Closest anatomical direction each voxel axis increases towards, e.g. ``"RAS"``, ``"LPS"``.

    Letters: R/L (right/left), A/P (anterior/posterior), S/I (superior/inferior) of the world
    (RAS+) axis closest to each array axis of a 4x4 voxel -> RAS+ affine.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {a.shape}")
    codes = nib.aff2axcodes(a)
    if any(c is None for c in codes):
        raise ValueError(f"affine has a degenerate (zero or collinear) axis:\n{a}")
    return "".join(codes)


def check_finite(array: np.ndarray, path: PathLike) -> None:
    """Raise ``ValueError`` naming ``path`` and the count if ``array`` has NaN/inf voxels."""
    arr = np.asarray(array)
    if arr.dtype.kind not in "fc":
        return  # integer and bool arrays cannot hold NaN/inf
    n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if n_bad:
        raise ValueError(
            f"{path}: {n_bad} of {arr.size} voxels are not finite (NaN or inf); expected finite "
            "image values"
        )


def _cast(data: np.ndarray, dtype: DTypeLike, path: PathLike) -> np.ndarray:
    """Cast to ``dtype``; integer targets are rounded to nearest (never truncated) and checked."""
    if dtype is None:
        return data
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return data.astype(dt, copy=False)
    if dt.kind not in "iu":
        raise ValueError(f"{path}: unsupported dtype {dt}; expected a float or integer dtype")
    info = np.iinfo(dt)
    if data.dtype.kind in "iub":
        vals = data
    else:
        # Label maps stored as scaled ints or floats (e.g. 0.99999997) must round, not truncate.
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if n_bad:
            raise ValueError(
                f"{path}: cannot convert to {dt}: {n_bad} voxels are NaN or inf (expected finite "
                "values for an integer volume)"
            )
        vals = np.rint(data)
    if vals.size:
        lo, hi = vals.min(), vals.max()
        if lo < info.min or hi > info.max:
            raise ValueError(
                f"{path}: values range {lo}..{hi} does not fit dtype {dt} ({info.min}..{info.max})"
            )
    return vals.astype(dt, copy=False)


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
    """Orientation taking the reoriented axes back: new axis a_i -> original axis i, same flip."""
    inv = np.empty_like(ornt)
    for i, (axis, flip) in enumerate(ornt):
        inv[int(axis)] = (i, flip)
    return inv


def _as_shape(shape: Sequence[int], name: str) -> tuple[int, int, int]:
    out = tuple(int(s) for s in shape)
    if len(out) != 3 or any(s < 1 for s in out):
        raise ValueError(f"{name} must be 3 positive ints (spatial shape), got {tuple(shape)}")
    return out  # type: ignore[return-value]


def _as_affine(affine: np.ndarray, name: str) -> np.ndarray:
    a = np.array(affine, dtype=np.float64)  # a private copy, made read-only below
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be a finite 4x4 matrix, got shape {a.shape}:\n{a}")
    if not np.allclose(a[3], (0.0, 0.0, 0.0, 1.0)):
        raise ValueError(f"{name} must have last row (0, 0, 0, 1), got {a[3]}")
    a.setflags(write=False)
    return a


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Geometry:
    """Where a returned array sits in world space, and how to put it back into its file's layout.

    Fields (spatial axes only; a trailing channel axis of the data is not described here):

    - ``affine``: 4x4 float64, voxel index of the *returned* array -> RAS+ world position (mm).
    - ``shape``: spatial shape of the returned array.
    - ``spacing``: voxel size (mm) per returned axis (== ``voxel_spacing(affine)``).
    - ``original_affine`` / ``original_shape``: the same for the array as stored in the file
      (for DICOM: the (column, row, slice) volume in RAS+).
    - ``ornt``: nibabel orientation array ``[3, 2]`` taking original axes to returned axes
      (row i = (returned axis, flip) of original axis i); identity when not reoriented.
    - ``header``: copy of the original NIfTI header (xform codes, units, ...) used when writing
      back, or ``None`` (defaults are then used).

    Instances are immutable (arrays read-only) and picklable; ``==`` compares the grids (all
    fields but ``header``) exactly.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    ornt: np.ndarray
    header: nib.Nifti1Header | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        set_(self, "affine", _as_affine(self.affine, "Geometry.affine"))
        set_(self, "original_affine", _as_affine(self.original_affine, "Geometry.original_affine"))
        set_(self, "shape", _as_shape(self.shape, "Geometry.shape"))
        set_(self, "original_shape", _as_shape(self.original_shape, "Geometry.original_shape"))
        ornt = np.array(self.ornt, dtype=np.float64)
        if (
            ornt.shape != (3, 2)
            or sorted(ornt[:, 0].tolist()) != [0.0, 1.0, 2.0]
            or not np.all(np.isin(ornt[:, 1], (-1.0, 1.0)))
        ):
            raise ValueError(
                "Geometry.ornt must be a nibabel orientation [3, 2] (a permutation of axes 0..2 "
                f"with flips +-1), got {self.ornt!r}"
            )
        ornt.setflags(write=False)
        set_(self, "ornt", ornt)
        spacing = tuple(float(s) for s in self.spacing)
        set_(self, "spacing", spacing)
        if self.header is not None and not isinstance(self.header, nib.Nifti1Header):
            raise ValueError(
                f"Geometry.header must be a nibabel Nifti1Header or None, got {type(self.header)}"
            )
        # The fields are redundant on purpose (cheap to read); make sure they agree.
        expected_shape = [0, 0, 0]
        for i, (axis, _) in enumerate(ornt):
            expected_shape[int(axis)] = self.original_shape[i]
        if tuple(expected_shape) != self.shape:
            raise ValueError(
                f"Geometry.shape {self.shape} is not original_shape {self.original_shape} "
                f"reoriented by ornt {ornt.tolist()} (expected {tuple(expected_shape)})"
            )
        expected_affine = self.original_affine @ orientations.inv_ornt_aff(
            ornt, self.original_shape
        )
        if not np.allclose(self.affine, expected_affine, rtol=1e-6, atol=1e-5):
            raise ValueError(
                "Geometry.affine is not original_affine reoriented by ornt:\n"
                f"{self.affine}\nexpected\n{expected_affine}"
            )
        if len(spacing) != 3 or not np.allclose(spacing, voxel_spacing(self.affine), rtol=1e-5):
            raise ValueError(
                f"Geometry.spacing {spacing} does not match the affine's column norms "
                f"{voxel_spacing(self.affine)}"
            )

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_affine(
        cls,
        original_affine: np.ndarray,
        original_shape: Sequence[int],
        *,
        canonical: bool = True,
        header: nib.Nifti1Header | None = None,
    ) -> Geometry:
        """Geometry of an array stored with ``original_affine`` (voxel -> RAS+ mm).

        With ``canonical=True`` the returned grid is the closest canonical RAS+ reorientation
        (axis permutation/flips only, as ``nibabel.as_closest_canonical``); otherwise the
        stored layout is kept (``ornt`` = identity).
        """
        original_affine = _as_affine(original_affine, "original_affine")
        original_shape = _as_shape(tuple(original_shape)[:3], "original_shape")
        if canonical:
            ornt = orientations.io_orientation(original_affine)
            if np.isnan(ornt).any():
                raise ValueError(
                    f"cannot reorient: the affine has a degenerate (zero) axis:\n{original_affine}"
                )
        else:
            ornt = _IDENTITY_ORNT.copy()
        affine = original_affine @ orientations.inv_ornt_aff(ornt, original_shape)
        shape = [0, 0, 0]
        for i, (axis, _) in enumerate(ornt):
            shape[int(axis)] = original_shape[i]
        return cls(
            affine=affine,
            shape=tuple(shape),  # type: ignore[arg-type]
            spacing=voxel_spacing(affine),  # type: ignore[arg-type]
            original_affine=original_affine,
            original_shape=original_shape,
            ornt=ornt,
            header=header,
        )

    @classmethod
    def identity(cls, shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Geometry:
        """Geometry for an array that came from nowhere: axis-aligned RAS+ grid, origin at 0.

        ``affine = diag(spacing..., 1)``; writing it produces a NIfTI with sform/qform 'aligned'.
        """
        sp = tuple(float(s) for s in spacing)
        if len(sp) != 3 or any(not np.isfinite(s) or s <= 0 for s in sp):
            raise ValueError(f"spacing must be 3 positive finite floats (mm), got {tuple(spacing)}")
        affine = np.diag((*sp, 1.0))
        return cls.from_affine(affine, shape, canonical=False)

    # -- array layout ---------------------------------------------------------------------------

    def from_original(self, array: np.ndarray) -> np.ndarray:
        """Stored-layout array ``[*original_shape, (C)]`` -> returned layout ``[*shape, (C)]``."""
        arr = np.asarray(array)
        if arr.ndim < 3 or arr.shape[:3] != self.original_shape:
            raise ValueError(
                f"array shape {arr.shape} does not start with original_shape {self.original_shape}"
            )
        return np.ascontiguousarray(orientations.apply_orientation(arr, self.ornt))

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """Returned-layout array ``[*shape, (C)]`` -> stored layout ``[*original_shape, (C)]``."""
        arr = np.asarray(array)
        if arr.ndim < 3 or arr.shape[:3] != self.shape:
            raise ValueError(f"array shape {arr.shape} does not start with shape {self.shape}")
        return np.ascontiguousarray(orientations.apply_orientation(arr, _inverse_ornt(self.ornt)))

    # -- misc -----------------------------------------------------------------------------------

    @property
    def codes(self) -> str:
        """Orientation codes of the returned array, e.g. ``"RAS"``."""
        return orientation_codes(self.affine)

    @property
    def original_codes(self) -> str:
        """Orientation codes of the stored array, e.g. ``"LPS"``."""
        return orientation_codes(self.original_affine)

    def __eq__(self, other: object) -> bool:
        # Same grids <=> equal; the header (xform codes, description) is metadata and ignored,
        # so e.g. the image and label map of one case compare equal.
        if not isinstance(other, Geometry):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.original_shape == other.original_shape
            and self.spacing == other.spacing
            and np.array_equal(self.affine, other.affine)
            and np.array_equal(self.original_affine, other.original_affine)
            and np.array_equal(self.ornt, other.ornt)
        )


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------


def _bad_nifti(path: Path, exc: BaseException) -> ValueError:
    return ValueError(
        f"cannot read NIfTI file {path}: it is truncated, corrupt or not a NIfTI file "
        f"({type(exc).__name__}: {exc})"
    )


def read_nifti(
    path: PathLike, *, canonical: bool = True, dtype: DTypeLike = np.float32
) -> tuple[np.ndarray, Geometry]:
    """Read a 3D ``[X, Y, Z]`` or 4D ``[X, Y, Z, C]`` NIfTI file (.nii / .nii.gz).

    - ``canonical=True`` reorients the spatial axes to the closest RAS+ orientation by axis
      permutation/flips (no resampling); the 4th axis stays last.
    - scl_slope/scl_inter are applied. ``dtype`` (default float32) is the returned dtype;
      integer dtypes round to nearest (a mask stored as 0.99999997 reads as 1) and reject
      NaN/inf or out-of-range values; ``dtype=None`` keeps nibabel's dtype (the stored dtype,
      or float64 when the file is scaled).
    - NaN/inf voxels in float output are returned as is; see :func:`check_finite`.

    Returns ``(array, geometry)``; the array is C-contiguous and owns its memory.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"NIfTI file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"NIfTI path {path} is not a regular file")
    try:
        img = nib.load(str(path), mmap=False)
    except MemoryError:
        raise
    except Exception as exc:  # gzip, EOF, OS and nibabel header errors all mean "unreadable"
        raise _bad_nifti(path, exc) from exc
    if not isinstance(img, nib.Nifti1Pair):  # Nifti1Image, Nifti2Image and .hdr/.img pairs
        raise ValueError(
            f"cannot read {path}: nibabel opened it as {type(img).__name__}; expected a NIfTI file"
        )
    if len(img.shape) not in (3, 4):
        raise ValueError(
            f"NIfTI file {path} has shape {img.shape}; expected 3D [X, Y, Z] or 4D [X, Y, Z, C]"
        )
    try:
        data = np.asanyarray(img.dataobj)  # applies scl_slope/inter like get_fdata
    except MemoryError:
        raise
    except Exception as exc:
        raise _bad_nifti(path, exc) from exc
    geometry = Geometry.from_affine(
        img.affine, img.shape[:3], canonical=canonical, header=img.header.copy()
    )
    data = _cast(np.asarray(data), dtype, path)
    return geometry.from_original(data), geometry


def _output_dtype(arr: np.ndarray, dtype: DTypeLike, path: Path) -> np.dtype:
    """On-disk dtype: the requested one, else the smallest integer type holding the labels."""
    if dtype is not None:
        dt = np.dtype(dtype)
        if dt == np.bool_:
            return np.dtype(np.uint8)
        try:
            nib.Nifti1Header().set_data_dtype(dt)
        except Exception as exc:
            raise ValueError(f"cannot write {path}: NIfTI does not support dtype {dt}") from exc
        return dt
    kind = arr.dtype.kind
    if kind == "b":
        return np.dtype(np.uint8)
    if kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        for cand in (np.uint8, np.int16, np.int32):
            info = np.iinfo(cand)
            if info.min <= lo and hi <= info.max:
                return np.dtype(cand)
        raise ValueError(
            f"cannot write {path}: integer values {lo}..{hi} do not fit int32; pass dtype="
        )
    if kind == "f":
        return np.dtype(np.float64 if arr.dtype == np.float64 else np.float32)
    raise ValueError(f"cannot write {path}: unsupported array dtype {arr.dtype}")


def _to_output(arr: np.ndarray, out: np.dtype, path: Path) -> np.ndarray:
    if out.kind == "f":
        return arr.astype(out, copy=False)
    if arr.dtype.kind == "f":
        # Writing probabilities into an integer file would silently quantise them: refuse.
        finite = np.isfinite(arr)
        if not finite.all():
            raise ValueError(
                f"cannot write {path} as {out}: {int(arr.size - finite.sum())} voxels are NaN/inf"
            )
        if not np.array_equal(np.rint(arr), arr):
            raise ValueError(
                f"cannot write {path} as {out}: the array has non-integer values; round it first "
                "or pass a float dtype"
            )
    info = np.iinfo(out)
    lo, hi = arr.min(), arr.max()
    if lo < info.min or hi > info.max:
        raise ValueError(
            f"cannot write {path} as {out}: values {lo}..{hi} do not fit {info.min}..{info.max}"
        )
    return arr.astype(out, copy=False)


def _atomic_save(img: nib.Nifti1Image, path: Path, suffix: str, overwrite: bool) -> None:
    """Write to a temp file next to ``path``, fsync, then rename into place in one step."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        # Create it ourselves (O_EXCL, mode 0666 & ~umask) so the final file gets normal
        # permissions, unlike tempfile's 0600; nibabel picks gzip from the suffix.
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        img.to_filename(str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # atomic "create only if absent": never clobbers a racing writer
        except FileExistsError:
            raise FileExistsError(
                f"{path} already exists; pass overwrite=True to replace it"
            ) from None
        except OSError:  # the filesystem has no hard links
            if path.exists():
                raise FileExistsError(
                    f"{path} already exists; pass overwrite=True to replace it"
                ) from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def tanh_to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (the GAN range) -> 8-bit pixels ``round((x + 1) * 127.5)``, channels
    kept; uint8 input is returned unchanged."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    return np.clip(np.rint((x.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def refuse_existing(paths: Sequence[PathLike], overwrite: bool, what: str = "output") -> None:
    """Raises FileExistsError (before anything is computed) when any of ``paths`` exists and
    ``overwrite`` is False; the message names one and the count."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{len(existing)} {what} file(s) already exist, e.g. {existing[0]}; pass --overwrite "
            "to replace them or choose another output folder"
        )


def write_png(path: PathLike, array: np.ndarray, *, overwrite: bool = False) -> Path:
    """A 2D image ``[H, W]`` (label values: uint8, or uint16 past 255) or ``[H, W, 3]`` uint8
    as PNG, written atomically (a temp file in the same folder, then a rename)."""
    from PIL import Image

    path = Path(path)
    refuse_existing([path], overwrite)
    arr = np.asarray(array)
    if arr.ndim == 2 and arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"{path}: values outside 0..65535 cannot be stored in a PNG")
        arr = arr.astype(np.uint8 if arr.max(initial=0) <= 255 else np.uint16)
    with files.replacing(path, ".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


def write_nifti_like(
    path: PathLike, array: np.ndarray, reference: PathLike, *, overwrite: bool = False
) -> Path:
    """``array`` in the stored voxel order of the NIfTI ``reference`` (any dimensionality,
    e.g. a 2D image), saved with the reference's affine; atomic like :func:`write_nifti`."""
    path = Path(path)
    ref = nib.load(str(reference))
    data = np.asarray(array).reshape(
        tuple(ref.shape[: np.ndim(array)]) + (1,) * max(0, min(len(ref.shape), 3) - np.ndim(array))
    )
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    img = nib.Nifti1Image(data, ref.affine)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(img, path, suffix, overwrite)
    return path


def write_nifti(
    path: PathLike,
    array: np.ndarray,
    geometry: Geometry,
    *,
    dtype: DTypeLike = None,
    overwrite: bool = False,
) -> Path:
    """Write ``array`` (on ``geometry``'s returned grid) as a NIfTI in the ORIGINAL file layout.

    - ``array``: ``[*geometry.shape]`` or ``[*geometry.shape, C]`` (any numpy/JAX array).
    - The inverse reorientation is applied, the affine is ``geometry.original_affine`` (sform and
      qform set with the original header's codes; 'aligned' without a header) and the original
      header's other fields (pixdim, units, ...) are kept; scl_slope 1, scl_inter 0.
    - ``dtype=None``: bool/int arrays are stored as the smallest of uint8/int16/int32 holding the
      values, float64 as float64, other floats as float32. An integer ``dtype`` requires
      integral values in range (``ValueError`` otherwise: no silent quantisation).
    - ``.nii`` or ``.nii.gz`` (gzip) from the file name. Written atomically (temp file in the
      same folder, then ``os.replace``); the parent folder is created if needed; an existing
      file is only replaced with ``overwrite=True`` (``FileExistsError`` otherwise).

    Returns the path written.
    """
    path = Path(path)
    lname = path.name.lower()
    if lname.endswith(".nii.gz"):
        suffix = ".nii.gz"
    elif lname.endswith(".nii"):
        suffix = ".nii"
    else:
        raise ValueError(f"cannot write {path}: the file name must end in .nii or .nii.gz")
    if not isinstance(geometry, Geometry):
        raise ValueError(f"cannot write {path}: geometry must be a Geometry, got {type(geometry)}")
    arr = np.asarray(array)
    if arr.ndim not in (3, 4) or arr.shape[:3] != geometry.shape:
        raise ValueError(
            f"cannot write {path}: array shape {arr.shape} does not match the geometry shape "
            f"{geometry.shape} (expected {geometry.shape} or {geometry.shape} + (channels,))"
        )
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")

    out_dtype = _output_dtype(arr, dtype, path)
    data = geometry.to_original(_to_output(arr, out_dtype, path))

    header = geometry.header
    if header is None:
        qcode = scode = _ALIGNED
        header = nib.Nifti1Header()
        header.set_xyzt_units("mm", "sec")
    else:
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = klass(data, geometry.original_affine, header=header)  # copies the header
    hdr = img.header
    hdr.set_data_dtype(out_dtype)
    hdr.set_slope_inter(1.0, 0.0)  # explicit scaling: nibabel writes the values unchanged
    hdr["cal_min"], hdr["cal_max"] = 0.0, 0.0  # the old display range is meaningless now
    hdr.set_qform(geometry.original_affine, code=qcode)
    hdr.set_sform(geometry.original_affine, code=scode)

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(img, path, suffix, overwrite)
    return path


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------


def _dicom_float(ds: Any, keyword: str, default: float) -> float:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    return float(value)


def _require(ds: Any, keyword: str, path: Path) -> Any:
    value = ds.get(keyword, None)
    if value is None or value == "":
        raise ValueError(f"DICOM file {path} has no {keyword}; cannot place it in a 3D volume")
    return value


def read_dicom_series(
    folder: PathLike, *, canonical: bool = True, dtype: DTypeLike = np.float32
) -> tuple[np.ndarray, Geometry]:
    """Read one single-frame DICOM series from ``folder`` into a 3D ``[X, Y, Z]`` volume.

    - Every regular file is tried with pydicom (non-DICOM files such as README are skipped, as
      are DICOM files without pixel data); the folder must hold exactly one SeriesInstanceUID.
    - Slices are sorted by ImagePositionPatient projected on the slice normal (row x column
      cosines), not by file name; Rows/Columns/ImageOrientationPatient/PixelSpacing must agree.
    - Values = stored pixel * RescaleSlope + RescaleIntercept (per slice), cast to ``dtype``
      (integer dtypes round to nearest; ``None`` keeps the pixel dtype when no slice is
      rescaled, float64 otherwise).
    - Voxel order before canonicalisation is (column i, row j, slice k); the affine (DICOM LPS
      converted to RAS+) has columns (row cosine * column spacing, column cosine * row spacing,
      normal * slice spacing) and origin at the first slice's ImagePositionPatient. The slice
      spacing comes from the sorted positions (gaps must agree within 1%), not SliceThickness.

    Returns ``(array, geometry)`` like :func:`read_nifti`; ``write_nifti(..., geometry)`` writes
    a NIfTI (sform/qform code 'scanner') whose voxels sit at the DICOM patient positions.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"DICOM folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"DICOM path {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    slices: list[tuple[Path, Any]] = []
    for p in files:
        try:
            ds = pydicom.dcmread(p)
        except InvalidDicomError:
            continue  # README, thumbnails, ...: not DICOM
        except MemoryError:
            raise
        except Exception as exc:
            raise ValueError(f"cannot read DICOM file {p}: truncated or corrupt ({exc})") from exc
        if "PixelData" in ds:  # skip DICOMDIR, structured reports, presentation states
            slices.append((p, ds))
    if not slices:
        raise ValueError(
            f"no DICOM image files in {folder} ({len(files)} files checked); expected the slices "
            "of one DICOM series"
        )

    series: dict[str, list[tuple[Path, Any]]] = {}
    for p, ds in slices:
        series.setdefault(str(_require(ds, "SeriesInstanceUID", p)), []).append((p, ds))
    if len(series) > 1:
        desc = "; ".join(
            f"{uid} ({len(items)} files, {items[0][1].get('SeriesDescription', '')!r}, "
            f"e.g. {items[0][0].name})"
            for uid, items in series.items()
        )
        raise ValueError(
            f"{folder} holds {len(series)} DICOM series: {desc}; expected one series per folder"
        )

    ref_path, ref = slices[0]
    rows, cols = int(_require(ref, "Rows", ref_path)), int(_require(ref, "Columns", ref_path))
    iop = np.array(_require(ref, "ImageOrientationPatient", ref_path), dtype=np.float64)
    spacing_rc = np.array(_require(ref, "PixelSpacing", ref_path), dtype=np.float64)
    if iop.shape != (6,) or spacing_rc.shape != (2,) or np.any(spacing_rc <= 0):
        raise ValueError(
            f"DICOM file {ref_path}: ImageOrientationPatient {iop.tolist()} / PixelSpacing "
            f"{spacing_rc.tolist()} are malformed (expected 6 cosines and 2 positive spacings)"
        )
    row_cos, col_cos = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > 1e-3
        or abs(np.linalg.norm(col_cos) - 1) > 1e-3
        or abs(row_cos @ col_cos) > 1e-3
    ):
        raise ValueError(
            f"DICOM file {ref_path}: ImageOrientationPatient {iop.tolist()} is not two "
            "orthonormal direction cosines"
        )
    row_cos, col_cos = row_cos / np.linalg.norm(row_cos), col_cos / np.linalg.norm(col_cos)
    normal = np.cross(row_cos, col_cos)

    positions = np.empty((len(slices), 3))
    for n, (p, ds) in enumerate(slices):
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise ValueError(
                f"DICOM file {p} is multi-frame ({ds.NumberOfFrames} frames); only single-frame "
                "series (one slice per file) are supported"
            )
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise ValueError(f"DICOM file {p} is not greyscale (SamplesPerPixel != 1)")
        r, c = int(_require(ds, "Rows", p)), int(_require(ds, "Columns", p))
        o = np.array(_require(ds, "ImageOrientationPatient", p), dtype=np.float64)
        s = np.array(_require(ds, "PixelSpacing", p), dtype=np.float64)
        if (r, c) != (rows, cols):
            raise ValueError(
                f"DICOM file {p} has {r} rows x {c} columns but {ref_path.name} has {rows} x {cols}"
            )
        if o.shape != iop.shape or not np.allclose(o, iop, atol=1e-4):
            raise ValueError(
                f"DICOM file {p} has ImageOrientationPatient {o.tolist()} but {ref_path.name} has "
                f"{iop.tolist()}; expected one orientation per series"
            )
        if s.shape != spacing_rc.shape or not np.allclose(s, spacing_rc, rtol=1e-4):
            raise ValueError(
                f"DICOM file {p} has PixelSpacing {s.tolist()} but {ref_path.name} has "
                f"{spacing_rc.tolist()}"
            )
        ipp = np.array(_require(ds, "ImagePositionPatient", p), dtype=np.float64)
        if ipp.shape != (3,):
            raise ValueError(f"DICOM file {p}: ImagePositionPatient {ipp.tolist()} is malformed")
        positions[n] = ipp

    proj = positions @ normal
    order = np.argsort(proj, kind="stable")
    proj, positions = proj[order], positions[order]
    slices = [slices[i] for i in order]
    n_slices = len(slices)
    if n_slices > 1:
        gaps = np.diff(proj)
        k = int(np.argmin(gaps))
        if gaps[k] < 1e-3:
            raise ValueError(
                f"DICOM files {slices[k][0]} and {slices[k + 1][0]} are at the same slice "
                "position; several volumes (echoes, time points) in one series are not supported"
            )
        median = float(np.median(gaps))
        k = int(np.argmax(np.abs(gaps - median)))
        if abs(gaps[k] - median) > 0.01 * median:
            raise ValueError(
                f"non-uniform slice spacing in {folder}: {gaps[k]:.4f} mm between "
                f"{slices[k][0].name} and {slices[k + 1][0].name} but the median gap is "
                f"{median:.4f} mm (a missing slice?); expected gaps equal within 1%"
            )
        slice_spacing = float((proj[-1] - proj[0]) / (n_slices - 1))
        # A tilted-gantry stack shifts in-plane from slice to slice; the affine cannot say so.
        offsets = positions - positions[0]
        in_plane = offsets - np.outer(offsets @ normal, normal)
        worst = int(np.argmax(np.linalg.norm(in_plane, axis=1)))
        if np.linalg.norm(in_plane[worst]) > 0.1 * spacing_rc.min():
            raise ValueError(
                f"DICOM file {slices[worst][0]} is shifted in-plane by "
                f"{np.linalg.norm(in_plane[worst]):.3f} mm from {slices[0][0].name} (gantry tilt "
                "or sheared stack); expected slices stacked along the slice normal"
            )
    else:
        ds0 = slices[0][1]
        slice_spacing = _dicom_float(ds0, "SpacingBetweenSlices", 0.0) or _dicom_float(
            ds0, "SliceThickness", 1.0
        )

    scaling = [
        (_dicom_float(ds, "RescaleSlope", 1.0), _dicom_float(ds, "RescaleIntercept", 0.0))
        for _, ds in slices
    ]
    rescaled = any(sc != (1.0, 0.0) for sc in scaling)
    volume: np.ndarray | None = None
    for k, ((p, ds), (slope, inter)) in enumerate(zip(slices, scaling, strict=True)):
        try:
            pixels = ds.pixel_array
        except MemoryError:
            raise
        except Exception as exc:  # compressed without a decoder, truncated pixel data, ...
            raise ValueError(f"cannot decode the pixel data of DICOM file {p}: {exc}") from exc
        if pixels.shape != (rows, cols):
            raise ValueError(
                f"DICOM file {p} decoded to shape {pixels.shape}; expected ({rows}, {cols})"
            )
        if rescaled:
            values = pixels.astype(np.float64) * slope + inter
        else:
            values = pixels
        values = _cast(values, dtype, p)
        if volume is None:
            volume = np.empty((cols, rows, n_slices), dtype=values.dtype)
        elif values.dtype != volume.dtype:  # dtype=None with mixed pixel types
            volume = volume.astype(np.result_type(volume.dtype, values.dtype))
        volume[:, :, k] = values.T  # pixel_array is (row j, column i)
    assert volume is not None

    lps = np.eye(4)
    lps[:3, 0] = row_cos * spacing_rc[1]  # column index i moves along the row, by column spacing
    lps[:3, 1] = col_cos * spacing_rc[0]  # row index j moves down the column, by row spacing
    lps[:3, 2] = normal * slice_spacing
    lps[:3, 3] = positions[0]
    affine = np.diag((-1.0, -1.0, 1.0, 1.0)) @ lps  # DICOM patient LPS -> RAS+

    header = nib.Nifti1Header()
    header.set_data_shape(volume.shape)
    header.set_qform(affine, code=_SCANNER)
    header.set_sform(affine, code=_SCANNER)
    header.set_xyzt_units("mm", "sec")
    geometry = Geometry.from_affine(affine, volume.shape, canonical=canonical, header=header)
    return geometry.from_original(volume), geometry
