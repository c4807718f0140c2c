"""2D U-Net on ISBI-2012 EM membranes (the U-Net paper's data): membrane vs. cell interior.

Labelled slices 15-19 of the training stack are held out for validation (the stack is a volume:
neighbouring slices look alike, so a contiguous block is held out rather than random slices).
Random 192 x 192 crops with flips, 90-degree rotations, small affine and intensity augmentation;
evaluation on the whole 512 x 512 slices.

    python scripts/train.py --config medjax/configs/isbi2012.py --workdir runs/isbi2012 \
        [--config.data.directory=/path/to/isbi2012_em_membrane]
"""

from medjax.configs import common


def get_config(arg: str | None = None):
    c = common.segmentation("isbi2012", num_classes=2)
    c.data.val_ids = ("15", "16", "17", "18", "19")
    c.crop_size = (192, 192)
    c.model.features = (16, 32, 64, 128)
    c.batch_size = 4
    c.eval_batch_size = 5
    c.num_steps = 1200
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 200
    c.optimizer.learning_rate = 1e-3
    if "smoke" in common.parse_arg(arg):
        common.shrink_for_smoke(c)
        c.crop_size = (64, 64)
        c.eval_batch_size = 5
    return c
