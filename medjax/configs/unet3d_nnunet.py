"""3D U-Net on ANY nnU-Net v2 raw dataset (`imagesTr/<case>_<XXXX>.nii.gz`, `labelsTr/`,
`dataset.json`) or, with `msd`, any Medical Segmentation Decathlon task folder.

Channels (`channel_names`), classes and evaluation regions (`labels`, nnU-Net's region-based
declarations with `regions_class_order` included) come from `dataset.json`; any number of each.
A seeded `data.val_fraction` of `imagesTr` is held out for validation (or `data.val_ids`, or a
separate `data.val_directory`); `imagesTs/` (with `labelsTs/`) is the test split. Same recipe as
`unet3d_brats`: z-score inside the non-zero voxels, crop to them, resample to `data.spacing`,
patches with on-device augmentation, whole-volume sliding-window evaluation per region.

    python -m medjax.data.convert nnunet --layout deepmedic \
        --input ../shared/data/brats2015_deepmedic_3d/train \
        --input ../shared/data/brats2015_deepmedic_3d/validation --output /tmp/Dataset001_BraTS
    python scripts/train.py --config unet3d_nnunet --workdir runs/nnunet \
        --config.data.directory=/tmp/Dataset001_BraTS
    python scripts/evaluate.py --workdir runs/nnunet --data_dir /data/Dataset002 --split test
    python scripts/predict.py --workdir runs/nnunet --input /data/Dataset002 --output preds/

Arguments: `msd` (an MSD task folder: 4D `imagesTr`, `dataset.json` with `modality`), `smoke`.
"""

from medjax.configs import common, unet3d_brats


def get_config(arg: str | None = None):
    """`unet3d_brats`'s recipe and sizes with the data block of an nnU-Net / MSD folder."""
    args = common.parse_arg(arg)
    c = unet3d_brats.get_config(arg)
    data = common.volume_segmentation(
        layout="msd" if "msd" in args else "nnunet", shared_folder=""
    ).data
    data.spacing = c.data.spacing
    data.max_examples = 0
    c.data = data
    c.data.modalities = ()  # every channel of dataset.json
    c.data.num_classes = 0  # from dataset.json
    c.data.class_names = ()
    c.data.val_fraction = 0.5
    c.data.val_ids = ()
    return c
