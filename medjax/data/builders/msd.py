"""TFDS builder for Medical Segmentation Decathlon (MSD) tasks, built from a manual folder.

The task folder (as unpacked from the MSD tar, e.g. ``Task01_BrainTumour/``) holds
``dataset.json``, ``imagesTr/<case>.nii.gz`` (4D, modality on the last axis, or 3D for
single-modality tasks) and ``labelsTr/<case>.nii.gz``. Only the labelled ``imagesTr`` cases are
stored, all in the ``"train"`` split (MSD ships no validation split and no test labels): cut
it with TFDS slicing, e.g. ``"train[:80%]"`` / ``"train[80%:]"``.

Configs (features in :mod:`medjax.data.builders.common`):

- ``"Task01_BrainTumour"``: 4 channels (FLAIR, T1w, t1gd, T2w); labels 1 edema, 2
  non-enhancing tumour, 3 enhancing are mapped to the internal BraTS classes of
  :data:`medjax.data.volumes.BRATS_CLASSES` (0 bg, 1 NCR/NET, 2 edema, 3 enhancing), so the
  task trains and evaluates like the BraTS builders. ``mask`` = any channel non-zero.
- ``"generic"``: any other task; the channels are dataset.json's ``"modality"`` entries in
  index order (the channel count is dynamic in the feature spec) and labels are stored
  unchanged (uint8), unless dataset.json's labels are Task01's, which are mapped as above.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from medjax.data.builders import common

__all__ = ["Msd", "MsdConfig", "find_task_dir"]

_CITATION = """\
@article{antonelli2022msd,
  title   = {The Medical Segmentation Decathlon},
  author  = {Antonelli, Michela and Reinke, Annika and Bakas, Spyridon and others},
  journal = {Nature Communications}, volume = {13}, pages = {4128}, year = {2022}
}
"""


@dataclasses.dataclass(eq=False)
class MsdConfig(tfds.core.BuilderConfig):
    """An MSD task: its folder name, channel names (empty: all of dataset.json's, dynamic
    count) and label scheme (None: detected from dataset.json's labels)."""

    task: str | None = None
    modalities: tuple[str, ...] = ()
    label_scheme: str | None = None


def find_task_dir(root: Path, task: str | None) -> Path:
    """The MSD task folder under the manual folder ``root``: ``root`` itself when it holds
    dataset.json, else ``root/<task>``, else (``task`` None) its only sub-folder with one."""
    if (root / "dataset.json").is_file():
        return root
    if task is not None and (root / task / "dataset.json").is_file():
        return root / task
    found = sorted(p for p in root.iterdir() if p.is_dir() and (p / "dataset.json").is_file())
    if task is None and len(found) == 1:
        return found[0]
    want = f"{root}/dataset.json or {root}/{task}/dataset.json" if task else f"{root}/dataset.json"
    raise FileNotFoundError(
        f"no MSD task folder found: expected {want}; task folders with a dataset.json under "
        f"{root}: {[p.name for p in found]}"
    )


class Msd(tfds.core.GeneratorBasedBuilder):
    """Medical Segmentation Decathlon task (3D/4D NIfTI volumes + labels) from a manual folder."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        MsdConfig(
            name="Task01_BrainTumour",
            description="MSD Task01 (BraTS 2016/2017 cases): FLAIR, T1w, t1gd, T2w; labels "
            "mapped to internal BraTS classes.",
            task="Task01_BrainTumour",
            modalities=("FLAIR", "T1w", "t1gd", "T2w"),
            label_scheme="msd_brain",
        ),
        MsdConfig(
            name="generic",
            description="Any MSD task folder: channels from dataset.json, labels unchanged.",
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "Task01_BrainTumour"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Nothing is downloaded: unpack the MSD task tar (http://medicaldecathlon.com) and pass either the
task folder itself (holding dataset.json, imagesTr/, labelsTr/) or its parent folder as
`download_config=tfds.download.DownloadConfig(manual_dir=...)`. Config "Task01_BrainTumour"
looks for <manual_dir>/Task01_BrainTumour/ in the parent; config "generic" takes the only task
folder found there.
"""

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        channels = len(config.modalities) if config.modalities else None
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"MSD task {config.task or '(from dataset.json)'}; image channels "
                f"{tuple(config.modalities) or 'from dataset.json'}."
            ),
            features=common.volume_features(channels),
            homepage="http://medicaldecathlon.com",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = common.manual_dir(dl_manager)
        return {"train": self._generate_examples(find_task_dir(root, self.builder_config.task))}

    def _generate_examples(self, folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        config = self.builder_config
        return common.generate_examples(
            folder,
            "msd",
            config.modalities or None,
            label_scheme=config.label_scheme,
            require_labels=True,
        )
