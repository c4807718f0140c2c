"""DCGAN in 3D: 32^3 FLAIR patches of the BraTS training cases at 3 mm (the same N-D models).

Each training case gives 256 patches centred on random brain voxels (scaled to [-1, 1] inside
the brain mask; -1 outside the volume); the validation cases give the reference patches. Samples
are logged as slice montages (one row of axial slices per sample); SWD is computed on every axial
slice of the samples vs the reference patches.

    python scripts/train.py --config medjax/configs/dcgan_brats3d.py --workdir runs/dcgan3d
    python scripts/sample.py --workdir runs/dcgan3d --num 8 --output samples3d/   # NIfTI + .npz
"""

from medjax.configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    c = common.gan("dcgan")
    common.brats_folders(c.data, "brats_patches")
    c.data.modalities = ("flair",)
    c.data.spacing = (3.0, 3.0, 3.0)
    c.data.image_size = (32, 32, 32)
    c.data.patches_per_case = 256
    c.data.channels = 1
    c.model.generator.latent_dim = 100
    c.model.generator.base_features = 128
    c.model.generator.norm = "batch"
    c.model.generator.head = "conv"  # "transpose": the paper's output layer (DCGANGenerator)
    c.model.discriminator.features = (32, 64, 128)
    c.model.discriminator.norm = "batch"
    c.model.discriminator.spectral_norm = False
    c.batch_size = 16
    c.num_steps = 2000
    c.num_pictures = 8
    if "smoke" in args:
        common.shrink_gan_for_smoke(c)
        c.data.image_size = (16, 16, 16)
        c.data.spacing = (6.0, 6.0, 6.0)
        c.data.patches_per_case = 4
        c.model.generator.base_features = 8
        c.model.discriminator.features = (4, 8)
    return c
