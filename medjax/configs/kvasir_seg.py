"""2D U-Net on Kvasir-SEG colonoscopy polyps (RGB), resized to 192 x 192.

20% of the cases are held out for validation (seeded). Images are z-scored per channel.

    python scripts/train.py --config medjax/configs/kvasir_seg.py --workdir runs/kvasir \
        [--config.data.directory=/path/to/kvasir_seg_polyps]
"""

from medjax.configs import common


def get_config(arg: str | None = None):
    c = common.segmentation("kvasir_seg", num_classes=2)
    c.data.image_size = (192, 192)
    c.data.val_fraction = 0.2
    c.crop_size = (160, 160)
    c.model.features = (16, 32, 64, 128)
    c.model.attention_gates = False
    c.batch_size = 6
    c.eval_batch_size = 7
    c.num_steps = 1000
    c.eval_every = 200
    c.checkpoint_every = 200
    c.optimizer.learning_rate = 1e-3
    if "smoke" in common.parse_arg(arg):
        common.shrink_for_smoke(c)
        c.data.image_size = (64, 64)
        c.crop_size = ()
    return c
