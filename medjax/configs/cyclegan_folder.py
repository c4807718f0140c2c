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
from medjax.configs.cyclegan_brats import cyclegan


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    dims = 3 if "3d" in args else 2
    c = common.gan("cyclegan")
    c.data.source = "unpaired"
    c.data.channels = 1
    c.data.spatial_dims = dims
    c.data.image_size = (32, 32, 32) if dims == 3 else (128, 128)
    c.predict_direction = "ab"
    c.batch_size = 2 if dims == 3 else 4
    c.eval_batch_size = 8
    return cyclegan(
        c, args, features=16 if dims == 3 else 64, num_blocks=3 if dims == 3 else 6, dims=dims
    )
