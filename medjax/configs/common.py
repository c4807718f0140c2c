"""Shared config blocks. Each experiment file builds on `segmentation()` and documents itself."""

from __future__ import annotations

import ml_collections


def segmentation(source: str, num_classes: int) -> ml_collections.ConfigDict:
    """Defaults of a 2D U-Net segmentation run on dataset `source` (see medjax.data.datasets)."""
    c = ml_collections.ConfigDict()
    c.task = "segmentation"
    c.seed = 0
    c.num_devices = 0  # 0: every visible device
    c.batch_size = 8  # global: summed over devices and hosts
    c.eval_batch_size = 8
    c.num_steps = 1000
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 250
    c.keep_checkpoints = 2
    c.best_metric = "dice_mean"  # mean foreground Dice on the validation split
    c.best_mode = "max"
    c.tensorboard = True
    c.crop_size = ()  # () trains on whole images; (H, W) trains on random crops
    c.num_pictures = 4  # validation examples drawn in the PNG overlays

    c.data = ml_collections.ConfigDict()
    c.data.source = source
    c.data.directory = ""  # "" -> the shared data folder of `source`
    c.data.num_classes = num_classes
    c.data.image_size = ()  # (H, W) resize, or () to keep the size (then `scale`)
    c.data.scale = 1.0
    c.data.normalize = "zscore"
    c.data.val_ids = ()  # explicit validation example ids, else...
    c.data.val_slices = ()  # ...a (lo, hi) slice block (volumes), else...
    c.data.val_gap = 0
    c.data.val_fraction = 0.2  # ...a seeded random fraction
    c.data.max_examples = 0  # cap on each split (smoke runs); 0: all

    c.model = ml_collections.ConfigDict()
    c.model.spatial_dims = 2
    c.model.features = (32, 64, 128, 256)
    c.model.norm = "instance"
    c.model.activation = "leaky_relu"
    c.model.residual = False
    c.model.attention_gates = False
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on GPU/TPU

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "dice_ce"
    c.loss.include_background = False

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.optimizer.grad_clip_norm = 1.0

    c.augment = ml_collections.ConfigDict()
    c.augment.enabled = True
    c.augment.flip_axes = (0, 1)
    c.augment.rot90 = True
    c.augment.affine_prob = 0.5
    c.augment.rotate_deg = 15.0
    c.augment.scale_range = (0.9, 1.1)
    c.augment.translate_frac = 0.05
    c.augment.intensity_scale = 0.1
    c.augment.intensity_shift = 0.1
    c.augment.gamma_range = (0.8, 1.25)
    c.augment.gamma_prob = 0.3
    return c


def shrink_for_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `smoke` argument: a seconds-long run that exercises every code path."""
    c.num_steps = 6
    c.log_every = 2
    c.eval_every = 3
    c.checkpoint_every = 3
    c.batch_size = 2
    c.eval_batch_size = 2
    c.model.features = (8, 16)
    c.optimizer.warmup_steps = 2
    c.data.max_examples = 12
    c.tensorboard = False
    return c


def parse_arg(arg: str | None) -> set[str]:
    """`get_config("smoke,foo")` -> {"smoke", "foo"}."""
    return {a.strip() for a in (arg or "").split(",") if a.strip()}
