"""DCGAN on ANY folder of images: `<dir>/train/` and `<dir>/val/` (or one folder, a seeded
`data.val_fraction` held out), PNG / JPEG / TIFF / NIfTI, resized to `data.image_size`; with `3d`
a folder of 3D NIfTI volumes (resized to 32^3, shown as slice montages).

    python -m medjax.data.convert medmnist --input ../shared/data/medmnist_breastmnist \
        --layout folder --output /tmp/breast_png
    python scripts/train.py --config dcgan_folder --workdir runs/dcgan_breast_png \
        --config.data.directory=/tmp/breast_png
    python scripts/evaluate.py --workdir runs/dcgan_breast_png --data_dir /data/more_images
    python scripts/sample.py --workdir runs/dcgan_breast_png --num 64 --output samples/

Evaluation as `dcgan_medmnist`: SWD beside the real-vs-real floor and the trivial generator.
Arguments: `64` (64x64), `rgb` (3 channels), `3d`, `smoke`.
"""

from medjax.configs import common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    c = common.gan("dcgan")
    c.data.source = "folder"
    c.data.val_fraction = 0.2
    c.data.channels = 3 if "rgb" in args else 1
    three_d = "3d" in args
    c.data.spatial_dims = 3 if three_d else 2
    c.data.image_size = (32, 32, 32) if three_d else (64, 64) if "64" in args else (28, 28)
    c.model.generator.latent_dim = 100
    c.model.generator.base_features = 128 if three_d else 256
    c.model.generator.norm = "batch"
    c.model.generator.head = "conv"  # "transpose": the paper's output layer (DCGANGenerator)
    wide = three_d or "64" in args
    c.model.discriminator.features = (64, 128, 256, 512) if wide else (64, 128, 256)
    c.model.discriminator.norm = "batch"
    c.model.discriminator.spectral_norm = False
    c.batch_size = 16 if three_d else 64
    c.num_steps = 2000
    if "smoke" in args:
        common.shrink_gan_for_smoke(c)
        c.model.generator.base_features = 16
        c.model.discriminator.features = (8, 16)
        if three_d:
            c.data.image_size = (16, 16, 16)
    return c
