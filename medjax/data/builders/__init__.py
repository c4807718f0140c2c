"""TFDS builders for 3D medical volumes, prepared from a manual folder (nothing is downloaded).

Importing this package registers the builders with TFDS (``tfds.builder("brats/deepmedic")``):

- :class:`Brats` (configs ``"brats"``, ``"deepmedic"``) in :mod:`.brats`,
- :class:`Msd` (configs ``"Task01_BrainTumour"``, ``"generic"``) in :mod:`.msd`,

and provides :func:`read_split` / :func:`read_split_source`, which give each JAX process its own
non-overlapping shard of a prepared split. Features and the tfrecord / array_record trade-off
are described in :mod:`.common`.
"""

from medjax.data.builders.brats import Brats, BratsConfig
from medjax.data.builders.common import (
    from_tfds_example,
    read_split,
    read_split_source,
    split_size,
    volume_features,
)
from medjax.data.builders.msd import Msd, MsdConfig

__all__ = [
    "Brats",
    "BratsConfig",
    "Msd",
    "MsdConfig",
    "from_tfds_example",
    "read_split",
    "read_split_source",
    "split_size",
    "volume_features",
]
