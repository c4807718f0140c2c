"""Code shared by the TFDS volume builders (:mod:`.brats`, :mod:`.msd`) and the per-process reader.

Every builder here stores one example per case with the features of :func:`volume_features`::

    "id":        Text, the case id
    "image":     float32 [X, Y, Z, C], canonical RAS+ (as medjax.data.volumes.load_case returns)
    "label":     uint8 [X, Y, Z] internal classes (BraTS-like sources: 0 bg, 1 NCR/NET,
                 2 edema, 3 enhancing); shape (0, 0, 0) when the case has no label
    "has_label": bool, False for unlabelled cases
    "mask":      bool [X, Y, Z] brain mask
    "affine":    float64 [4, 4], voxel index of "image" -> RAS+ world mm
    "spacing":   float32 [3], voxel size in mm along (X, Y, Z)

Volumes are stored zlib-compressed (skull-stripped MRI is mostly zeros: several times smaller
than raw bytes, and far smaller and faster than TFDS's default per-value protobuf lists).

File format (``file_format=`` of the builder constructor; fixed when the data is prepared):

- ``"tfrecord"`` (default): read with ``builder.as_dataset`` / :func:`read_split` as a
  ``tf.data.Dataset`` (streaming, sequential; no random access).
- ``"array_record"``: random access with ``builder.as_data_source`` / :func:`read_split_source`
  (e.g. for grain or index-based sampling), but ``as_dataset`` is not available.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from medjax.data import io, volumes

__all__ = [
    "SPLIT_NAMES",
    "from_tfds_example",
    "generate_examples",
    "manual_dir",
    "read_split",
    "read_split_source",
    "split_dirs",
    "split_size",
    "to_tfds_example",
    "volume_features",
]

SPLIT_NAMES = ("train", "validation", "test")

_EMPTY_LABEL = np.zeros((0, 0, 0), np.uint8)


def volume_features(channels: int | None) -> tfds.features.FeaturesDict:
    """The features of one case; ``channels=None`` leaves the channel count dynamic."""
    zlib = tfds.features.Encoding.ZLIB
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "image": tfds.features.Tensor(
                shape=(None, None, None, channels), dtype=np.float32, encoding=zlib
            ),
            "label": tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8, encoding=zlib),
            "has_label": tfds.features.Scalar(dtype=np.bool_),
            "mask": tfds.features.Tensor(shape=(None, None, None), dtype=np.bool_, encoding=zlib),
            "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
            "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
        }
    )


def manual_dir(dl_manager: tfds.download.DownloadManager) -> Path:
    """The manual folder as a Path; FileNotFoundError when it is missing or empty (TFDS's
    message, which quotes the builder's MANUAL_DOWNLOAD_INSTRUCTIONS)."""
    try:
        return Path(os.fspath(dl_manager.manual_dir))
    except AssertionError as exc:  # TFDS asserts the folder exists and is not empty
        raise FileNotFoundError(str(exc)) from None


def split_dirs(root: Path) -> dict[str, Path]:
    """``{split: folder}``: the ``train``/``validation``/``test`` sub-folders of ``root`` that
    exist, else ``{"train": root}`` (every case in one training split)."""
    found = {name: root / name for name in SPLIT_NAMES if (root / name).is_dir()}
    return found or {"train": root}


def to_tfds_example(ex: Mapping[str, Any]) -> dict[str, Any]:
    """A :func:`~medjax.data.volumes.load_case` dict -> the features of :func:`volume_features`."""
    label = ex.get("label")
    if label is None:
        label_u8 = _EMPTY_LABEL
    else:
        if label.size and (int(label.min()) < 0 or int(label.max()) > 255):
            raise ValueError(
                f"case {ex['id']!r}: label values {int(label.min())}..{int(label.max())} do not "
                f"fit the uint8 label feature (0..255)"
            )
        label_u8 = label.astype(np.uint8)
    return {
        "id": ex["id"],
        "image": ex["image"],
        "label": label_u8,
        "has_label": label is not None,
        "mask": np.asarray(ex["mask"], np.bool_),
        "affine": np.asarray(ex["geometry"].affine, np.float64),
        "spacing": np.asarray(ex["spacing"], np.float32),
    }


def from_tfds_example(ex: Mapping[str, Any]) -> dict[str, Any]:
    """The features of one stored case (numpy, as `as_numpy_iterator` yields them) -> a
    :func:`~medjax.data.volumes.load_case` dict (labels already internal classes: scheme
    ``"identity"``; the grid is the stored canonical one)."""
    image = np.asarray(ex["image"], np.float32)
    case_id = ex["id"].decode() if isinstance(ex["id"], bytes) else str(ex["id"])
    return {
        "id": case_id,
        "image": image,
        "label": np.asarray(ex["label"], np.int32) if bool(ex["has_label"]) else None,
        "mask": np.asarray(ex["mask"], bool),
        "spacing": tuple(float(s) for s in ex["spacing"]),
        "geometry": io.Geometry.from_affine(ex["affine"], image.shape[:3], canonical=False),
        "label_scheme": "identity",
    }


def generate_examples(
    directory: Path,
    layout: str,
    modalities: Sequence[str] | None,
    **find_kwargs: Any,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(case id, features)`` for every case of ``directory`` (keys are the case ids)."""
    for case in volumes.find_cases(directory, layout, modalities=modalities, **find_kwargs):
        yield case.id, to_tfds_example(volumes.load_case(case))


def _builder(
    builder_or_name: tfds.core.DatasetBuilder | str, data_dir: str | os.PathLike[str] | None
) -> tfds.core.DatasetBuilder:
    if isinstance(builder_or_name, tfds.core.DatasetBuilder):
        return builder_or_name
    import medjax.data.builders  # noqa: F401  (registers "brats" and "msd" with TFDS)

    return tfds.builder(builder_or_name, data_dir=None if data_dir is None else os.fspath(data_dir))


def _format_name(builder: tfds.core.DatasetBuilder) -> str:
    fmt = builder.info.file_format
    return "tfrecord" if fmt is None else tfds.core.FileFormat(fmt).value


def _process_split(
    split: str, process_index: int | None, process_count: int | None, drop_remainder: bool
) -> Any:
    if (process_index is None) != (process_count is None):
        raise ValueError(
            f"pass both process_index and process_count or neither (got {process_index=}, "
            f"{process_count=}); neither means jax.process_index() / jax.process_count()"
        )
    if process_count is not None and not 0 <= process_index < process_count:  # type: ignore[operator]
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return tfds.split_for_jax_process(
        split,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=drop_remainder,
    )


def read_split(
    builder_or_name: tfds.core.DatasetBuilder | str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = False,
    shuffle_files: bool = False,
    read_config: tfds.ReadConfig | None = None,
) -> Any:
    """This process's shard of ``split`` of a prepared dataset, as a ``tf.data.Dataset``.

    Args:
      builder_or_name: a builder instance, or a registered name such as ``"brats/deepmedic"``
        or ``"msd/Task01_BrainTumour"``, loaded from ``data_dir`` (where it was prepared;
        None: the TFDS default ``~/tensorflow_datasets``). ``data_dir`` is only used with a
        name; a builder instance reads from its own ``data_dir``.
      split: a TFDS split expression (``"train"``, ``"train[:80%]"``, ``"train+validation"``).
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
        The split is cut into ``process_count`` non-overlapping parts
        (``tfds.split_for_jax_process``): with ``drop_remainder=False`` the first
        ``N % process_count`` processes get one example more; with True every process gets
        ``N // process_count`` and the rest are dropped. Each split of a union
        (``"train+validation"``) is cut separately, so shard sizes may differ by more than one.

    The dataset must have been prepared with ``file_format="tfrecord"`` (the default);
    for ``"array_record"`` use :func:`read_split_source`.
    """
    builder = _builder(builder_or_name, data_dir)
    fmt = builder.info.file_format
    if fmt is not None and tfds.core.FileFormat(fmt) != tfds.core.FileFormat.TFRECORD:
        raise ValueError(
            f"{builder.name} in {builder.data_dir} is stored as {_format_name(builder)}, which "
            f"has no tf.data reader; use read_split_source (random access) or prepare with "
            f"file_format='tfrecord'"
        )
    sub = _process_split(split, process_index, process_count, drop_remainder)
    return builder.as_dataset(split=sub, shuffle_files=shuffle_files, read_config=read_config)


def split_size(
    builder_or_name: tfds.core.DatasetBuilder | str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
) -> int:
    """The number of examples of ``split`` (any split expression) of a prepared dataset."""
    builder = _builder(builder_or_name, data_dir)
    return int(builder.info.splits[split].num_examples)


def read_split_source(
    builder_or_name: tfds.core.DatasetBuilder | str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = False,
) -> Any:
    """Like :func:`read_split`, but a random-access data source (``len()``, ``source[i]`` ->
    dict of numpy arrays) for a dataset prepared with ``file_format="array_record"``."""
    builder = _builder(builder_or_name, data_dir)
    sub = _process_split(split, process_index, process_count, drop_remainder)
    try:
        return builder.as_data_source(split=sub)
    except NotImplementedError as exc:
        raise ValueError(
            f"{builder.name} in {builder.data_dir} is stored as {_format_name(builder)}, "
            f"which has no random access; use read_split (tf.data) or prepare with "
            f"file_format='array_record'"
        ) from exc
