"""Pix2Pix on ANY aligned pairs: pytorch-CycleGAN-and-pix2pix's folders `A/<split>/` and
`B/<split>/` with matching file names (`pairs`, the default), or its side-by-side `[A | B]`
images in `<split>/` (`aligned`); 2D PNG / JPEG / TIFF / NIfTI resized to `data.image_size`, or
with `3d` NIfTI volume pairs (Vox2Vox, resized to 32^3). An optional `mask/` folder restricts the
metrics to a region (every pixel without it).

    python scripts/train.py --config pix2pix_folder --workdir runs/p2p_pairs \
        --config.data.directory=/data/t1_t2_pairs
    python scripts/evaluate.py --workdir runs/p2p_pairs --data_dir /data/other_pairs --split test
    python scripts/predict.py --workdir runs/p2p_pairs --input t1_images/ --output t2_pred/

Evaluation: MAE / PSNR / SSIM beside the identity and mean-image baselines (as `pix2pix_brats`).
Arguments: `aligned`, `3d`, `smoke`.
"""

from medjax.configs import common
from medjax.configs.pix2pix_brats import pix2pix


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    three_d = "3d" in args
    c = pix2pix(common.gan("pix2pix"), num_downs=5 if three_d else 7)
    c.data.source = "aligned" if "aligned" in args else "pairs"
    c.data.val_fraction = 0.2
    c.data.spatial_dims = 3 if three_d else 2
    c.data.image_size = (32, 32, 32) if three_d else (128, 128)
    c.data.channels = 1
    c.data.source_channels = 1
    c.data.target_channels = 1
    c.model.spatial_dims = c.data.spatial_dims
    if three_d:
        c.model.generator.features = 16
        c.model.generator.norm = "instance"
        c.model.discriminator.features = 16
        c.model.discriminator.norm = "instance"
    c.batch_size = 2 if three_d else 4
    c.eval_batch_size = 4
    c.num_steps = 1000
    c.best_metric = "mae"
    c.best_mode = "min"
    if "smoke" in args:
        common.shrink_gan_for_smoke(c)
        c.data.image_size = (16, 16, 16) if three_d else (32, 32)
        c.model.generator.num_downs = 3 if three_d else 5
        c.model.generator.features = 8
        c.model.discriminator.features = 8
        c.model.discriminator.num_layers = 2
    return c
