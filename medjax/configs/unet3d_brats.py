"""3D U-Net on BraTS (FLAIR + T1c) patches, evaluated on whole volumes by sliding window.

Data: the deepmedic copy of BRATS 2015 in the shared folder (train/ 2 cases, validation/ 2 cases;
any folder in the same layout via --config.data.directory / --config.data.val_directory, or
another layout via --config.data.layout=brats|msd|generic). Each case is z-scored inside its brain
mask (0.5-99.5 percentile clipping), cropped to the brain and resampled to 2 mm so that a 2-core
CPU can train it; 48^3 patches (a third centred on tumour) with on-device 3D augmentation; Dice +
cross-entropy, Adam. Validation: Gaussian-blended sliding window (48^3, overlap 0.5) on every
whole validation volume, the prediction resampled back to 1 mm and scored per BraTS region
(WT, TC, ET): Dice, sensitivity, specificity, HD95.

    python scripts/train.py --config medjax/configs/unet3d_brats.py --workdir runs/unet3d_brats
    python scripts/evaluate.py --workdir runs/unet3d_brats
    python scripts/predict.py --workdir runs/unet3d_brats --input CASE_DIR --output OUT_DIR

Add ",t1" / all four modalities with --config.data.modalities for BraTS 2018-21 folders. On a GPU
use --config.data.spacing="()" (native 1 mm), patch_size 128^3 and model.dtype=bfloat16.
"""

from medjax.configs import common


def get_config(arg: str | None = None):
    c = common.volume_segmentation()
    c.data.spacing = (2.0, 2.0, 2.0)
    c.patch_size = (48, 48, 48)
    c.batch_size = 2
    c.num_steps = 600
    c.log_every = 25
    c.eval_every = 200
    c.checkpoint_every = 100
    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 30
    if "smoke" in common.parse_arg(arg):
        common.shrink_for_smoke(c)
        c.patch_size = (16, 16, 16)
        c.data.spacing = (6.0, 6.0, 6.0)
        c.data.max_examples = 1
        c.eval_batch_size = 1
        c.inference.window = (16, 16, 16)
    return c
