"""The review paper's BraTS recipe: a 2D U-Net on 64 x 64 T1c crops at the most tumour-dense spots.

Axial T1c slices of the BRATS cases (deepmedic copy: train/ for training, validation/ for
validation), z-scored inside the brain mask; every slice containing tumour (whole tumour, WT =
necrosis + edema + non-enhancing + enhancing) is cropped to the 64 x 64 window holding the most
tumour pixels; binary U-Net (tumour vs rest), Adam, Dice + cross-entropy loss, scored with Dice and
sensitivity. The review reports Dice 0.86 for its U-Net under this protocol.

The crop position comes from the ground truth, so crop-level Dice is NOT a segmentation of the
whole image. Score the same model on whole 240 x 240 slices as well:

    python scripts/train.py --config medjax/configs/unet2d_brats_crops.py --workdir runs/brats_crops
    python scripts/evaluate.py --workdir runs/brats_crops                       # crops (the paper)
    python scripts/evaluate.py --workdir runs/brats_crops --set data.slice_crop=  # whole slices

(--set data.region=TC|ET, --config.data.modalities='("flair","t1ce")' for other variants.)
"""

from medjax.configs import common


def get_config(arg: str | None = None):
    c = common.segmentation("brats_slices", num_classes=2)
    c.data.layout = "deepmedic"
    c.data.val_directory = ""  # "" -> the shared validation folder
    c.data.modalities = ("t1ce",)
    c.data.region = "WT"
    c.data.slice_crop = (64, 64)
    c.data.clip_percentiles = (0.5, 99.5)
    c.data.normalize = "none"  # already z-scored per volume inside the brain mask
    c.model.features = (32, 64, 128, 256)
    c.batch_size = 16
    c.eval_batch_size = 32
    c.num_steps = 1500
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 250
    c.best_metric = "dice_mean"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 50
    c.augment.rotate_deg = 10.0
    if "smoke" in common.parse_arg(arg):
        common.shrink_for_smoke(c)
        c.data.slice_crop = (32, 32)
        c.data.max_examples = 8
    return c
