"""2D U-Net on HC18 fetal-head ultrasound: head segmentation and head circumference (mm).

Images (540 x 800) are downsampled x4 to 135 x 200 keeping the aspect ratio (the pixel size from
the CSV x4); 20% of the cases are held out for validation (seeded). `scripts/evaluate.py`
fits an ellipse to each predicted head and reports the circumference error in mm.

    python scripts/train.py --config medjax/configs/hc18.py --workdir runs/hc18 \
        [--config.data.directory=/path/to/hc18_fetal_head_ultrasound]
"""

from medjax.configs import common


def get_config(arg: str | None = None):
    c = common.segmentation("hc18", num_classes=2)
    c.data.scale = 0.25
    c.data.val_fraction = 0.2
    c.crop_size = ()
    c.model.features = (16, 32, 64, 128)
    c.batch_size = 8
    c.eval_batch_size = 7
    c.num_steps = 1000
    c.eval_every = 200
    c.checkpoint_every = 200
    c.augment.rot90 = False
    if "smoke" in common.parse_arg(arg):
        common.shrink_for_smoke(c)
        c.data.scale = 0.0625
    return c
