"""TFDS builder for BraTS-like brain-tumour MRI volumes, built from a manual folder (no download).

Build once (on one host), then every host reads its own shard with
:func:`medjax.data.builders.read_split`::

    from medjax.data.builders import Brats, read_split
    builder = Brats(config="deepmedic", data_dir="/data/tfds")  # file_format="array_record" too
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/data/brats2015_deepmedic_3d"))
    ds = read_split("brats/deepmedic", "train", data_dir="/data/tfds")  # this process's shard

Configs (features in :mod:`medjax.data.builders.common`; labels in the internal classes of
:data:`medjax.data.volumes.BRATS_CLASSES`: 0 bg, 1 NCR/NET, 2 edema, 3 enhancing):

- ``"brats"``: BraTS 2018-2021 naming ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``;
  ``image`` channels (flair, t1, t1ce, t2); labels 0/1/2/4 -> 0/1/2/3. Cases without
  ``_seg`` (validation/test releases) are stored with ``has_label=False``.
- ``"deepmedic"``: the DeepMedic copy of BRATS 2015 (``Flair_subtrMeanDivStd``,
  ``T1c_subtrMeanDivStd``, ``OTMultiClass``, ``brainmask``); channels (flair, t1ce); labels
  0-4 -> necrosis and non-enhancing both NCR/NET; ``mask`` = brainmask > 0.5.

Splits: the ``train/``, ``validation/`` and ``test/`` sub-folders of the manual folder that
exist (e.g. the deepmedic copy's train/ and validation/), else every case in ``"train"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from medjax.data import volumes
from medjax.data.builders import common

__all__ = ["Brats", "BratsConfig"]

_CITATION = """\
@article{menze2015brats,
  title   = {The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)},
  author  = {Menze, Bjoern H. and Jakab, Andras and Bauer, Stefan and others},
  journal = {IEEE Transactions on Medical Imaging},
  volume  = {34}, number = {10}, pages = {1993--2024}, year = {2015}
}
@article{baid2021brats,
  title   = {The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on Brain Tumor Segmentation and
             Radiogenomic Classification},
  author  = {Baid, Ujjwal and others},
  journal = {arXiv:2107.02314}, year = {2021}
}
"""


@dataclasses.dataclass(eq=False)
class BratsConfig(tfds.core.BuilderConfig):
    """A BraTS dataset layout: ``layout`` of :func:`medjax.data.volumes.find_cases` and the
    modalities stacked into ``image`` (channel order)."""

    layout: str = "brats"
    modalities: tuple[str, ...] = ()


class Brats(tfds.core.GeneratorBasedBuilder):
    """BraTS brain-tumour MRI (multi-modal 3D volumes + tumour labels) from a manual folder."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        BratsConfig(
            name="brats",
            description="BraTS 2018-2021 naming <case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz; "
            "channels (flair, t1, t1ce, t2).",
            layout="brats",
            modalities=volumes.DEFAULT_MODALITIES["brats"],  # type: ignore[arg-type]
        ),
        BratsConfig(
            name="deepmedic",
            description="DeepMedic copy of BRATS 2015 (Flair/T1c z-scored in brain, "
            "OTMultiClass, brainmask); channels (flair, t1ce).",
            layout="deepmedic",
            modalities=volumes.DEFAULT_MODALITIES["deepmedic"],  # type: ignore[arg-type]
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "brats"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Nothing is downloaded: pass the folder holding the cases as
`download_config=tfds.download.DownloadConfig(manual_dir=...)`.
config "brats": <manual_dir>/<case>/<case>_{flair,t1,t1ce,t2}.nii.gz (+ <case>_seg.nii.gz),
  e.g. the unpacked MICCAI_BraTS2020_TrainingData or BraTS2021_Training_Data folder.
config "deepmedic": <manual_dir>/<case>/{Flair,T1c}_subtrMeanDivStd.nii.gz, OTMultiClass.nii.gz,
  brainmask.nii.gz (deepmedic/examples/dataForExamples/brats2015TrainingData).
Optional split sub-folders <manual_dir>/{train,validation,test}/<case>/... become the TFDS
splits of the same names; without them every case goes into "train".
"""

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Multi-modal brain MRI with tumour labels in internal classes "
                f"{volumes.BRATS_CLASSES}; image channels {tuple(config.modalities)}."
            ),
            features=common.volume_features(len(config.modalities)),
            homepage="https://www.synapse.org/brats",
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = common.manual_dir(dl_manager)
        return {
            name: self._generate_examples(folder)
            for name, folder in common.split_dirs(root).items()
        }

    def _generate_examples(self, folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        config = self.builder_config
        return common.generate_examples(folder, config.layout, config.modalities)
