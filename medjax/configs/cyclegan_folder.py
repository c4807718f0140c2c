"""CycleGAN on ANY two unpaired image domains in pytorch-CycleGAN-and-pix2pix's layout:
`trainA/ trainB/ testA/ testB/` (and `valA/ valB/` when present, else the test folders
validate); 2D PNG / JPEG / TIFF / NIfTI resized to `data.image_size` with `data.channels`
channels, or with `3d` 3D NIfTI volumes (resized to 32^3). When `testA` and `testB` hold files of
the same names they are scored as aligned pairs (MAE / PSNR / SSIM); SWD per direction always.

    python scripts/train.py --config cyclegan_folder --workdir runs/cyc \
        --config.data.directory=/data/horse2zebra --config.data.channels=3
    python scripts/predict.py --workdir runs/cyc --input new_A_images/ --output B_like/

Arguments: `3d`, `smoke` (`predict_direction="ba"` translates B -> A).
"""

from medjax.configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    three_d = "3d" in args
    c = common.gan("cyclegan")
    c.data.source = "unpaired"
    c.data.channels = 1
    c.data.spatial_dims = 3 if three_d else 2
    c.data.image_size = (32, 32, 32) if three_d else (128, 128)
    c.predict_direction = "ab"
    c.model.spatial_dims = c.data.spatial_dims
    c.model.generator.features = 16 if three_d else 64
    c.model.generator.num_blocks = 3 if three_d else 6
    c.model.generator.norm = "instance"
    c.model.discriminator.features = 16 if three_d else 64
    c.model.discriminator.num_layers = 2 if three_d else 3
    c.model.discriminator.norm = "instance"
    c.model.discriminator.spectral_norm = False
    c.loss.kind = "lsgan"
    c.loss.cycle_weight = 10.0
    c.loss.identity_weight = 0.5
    c.pool_size = 50
    c.batch_size = 2 if three_d else 4
    c.eval_batch_size = 8
    c.num_steps = 2000
    c.num_pictures = 4
    for opt in (c.optimizer_g, c.optimizer_d):
        opt.schedule = "linear_decay"
        opt.decay_start = c.num_steps // 2
    if "smoke" in args:
        common.shrink_gan_for_smoke(c)
        c.data.image_size = (16, 16, 16) if three_d else (32, 32)
        c.model.generator.features = 8
        c.model.generator.num_blocks = 2
        c.model.discriminator.features = 8
        c.model.discriminator.num_layers = 2
        c.pool_size = 3
        for opt in (c.optimizer_g, c.optimizer_d):
            opt.decay_start = 2
    return c
