"""Shared config blocks. Each experiment file builds on `segmentation()` and documents itself."""

from __future__ import annotations

import ml_collections


def scale(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The keys every config has for how it runs, not what it learns (see README "Scaling"):
    the device mesh, gradient accumulation and replicas trained side by side in one program."""
    c.num_devices = 0  # 0: every visible device (of every process)
    c.fsdp = 1  # devices per parameter-shard group: 1 data parallel, > 1 FSDP
    c.grad_accum_steps = 1  # micro-batches per optimizer step (batch_size is the sum)
    c.replicas = 1  # independent models in one program (vmap), seeds seed, seed + 1, ...
    c.replica_lr_scales = ()  # () all 1; else one learning-rate factor per replica
    c.replica_mode = "auto"  # vmap | unroll | auto: unroll on CPU, vmap on GPU/TPU
    # A step with a NaN/Inf loss term: "stop" the run (naming the step and the term; the last
    # good checkpoint is kept) or "skip" it (the state keeps its previous values).
    c.nonfinite = "stop"
    return c


def data_block() -> ml_collections.ConfigDict:
    """A `data` block with the keys every dataset shares."""
    d = ml_collections.ConfigDict()
    d.shards = 0  # data shards (0: one per process); a process reads only its own
    return d


def segmentation(source: str, num_classes: int) -> ml_collections.ConfigDict:
    """Defaults of a 2D U-Net segmentation run on dataset `source` (see medjax.data.datasets)."""
    c = ml_collections.ConfigDict()
    c.task = "segmentation"
    c.seed = 0
    scale(c)
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

    c.data = data_block()
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
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on GPUs, TPUs and bf16 CPUs

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "dice_ce"
    c.loss.include_background = False

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.optimizer.grad_clip_norm = 1.0

    c.augment = augment()
    return c


def augment(**overrides) -> ml_collections.ConfigDict:
    """On-device augmentation settings (`medjax.data.transforms.AugmentConfig` fields)."""
    c = ml_collections.ConfigDict()
    c.enabled = True
    c.flip_axes = (0, 1)
    c.rot90 = True
    c.affine_prob = 0.5
    c.rotate_deg = 15.0
    c.scale_range = (0.9, 1.1)
    c.translate_frac = 0.05
    c.intensity_scale = 0.1
    c.intensity_shift = 0.1
    c.gamma_range = (0.8, 1.25)
    c.gamma_prob = 0.3
    c.update(overrides)
    return c


def brats_folders(
    data: ml_collections.ConfigDict,
    source: str,
    layout: str = "deepmedic",
    shared_folder: str = "brats2015_deepmedic_3d",
) -> ml_collections.ConfigDict:
    """Points a GAN config's `data` at the BraTS cases: `source` (`brats_flair`, `brats_patches`,
    `brats_slices`, `brats_volumes`) read from the `train` / `validation` sub-folders of
    `shared_folder` (or `data.directory` / `data.val_directory` when set)."""
    data.source = source
    data.layout = layout
    data.shared_folder = shared_folder
    data.train_split = "train"
    data.val_split = "validation"
    data.val_directory = ""
    return data


def volume_segmentation(
    layout: str = "deepmedic",
    shared_folder: str = "brats2015_deepmedic_3d",
    modalities: tuple[str, ...] = ("flair", "t1ce"),
) -> ml_collections.ConfigDict:
    """Defaults of a 3D U-Net trained on patches of multi-modal volumes and evaluated on whole
    volumes by sliding window (task `volume_segmentation`, BraTS classes and regions)."""
    c = segmentation("", num_classes=4)
    c.task = "volume_segmentation"
    del c["crop_size"]
    c.patch_size = (48, 48, 48)
    c.batch_size = 2
    c.eval_batch_size = 1
    c.num_pictures = 2
    c.best_metric = "dice_mean"  # mean Dice over the regions WT, TC, ET

    c.data = data_block()
    c.data.backend = "files"  # or "tfds": a dataset prepared by medjax.data.builders
    c.data.tfds_name = ""  # e.g. "brats/deepmedic" (backend tfds)
    c.data.tfds_data_dir = ""  # where it was prepared ("": ~/tensorflow_datasets)
    c.data.tfds_split = "train"
    c.data.tfds_val_split = "validation"
    c.data.layout = layout  # brats | deepmedic | msd | generic (medjax.data.volumes)
    c.data.shared_folder = shared_folder
    c.data.train_split = "train"  # sub-folders of the shared folder...
    c.data.val_split = "validation"
    c.data.directory = ""  # ...or explicit training / validation folders
    c.data.val_directory = ""
    c.data.modalities = modalities
    c.data.num_classes = 4  # background, NCR/NET, edema, enhancing tumour
    c.data.spacing = ()  # () keeps the native spacing; (2, 2, 2) resamples to 2 mm
    c.data.crop_margin = 4  # voxels kept around the brain mask's bounding box
    c.data.clip_percentiles = (0.5, 99.5)  # inside the brain, before the z-score
    c.data.fg_fraction = 0.33  # patches centred on a tumour voxel
    c.data.max_examples = 0

    c.model.spatial_dims = 3
    c.model.features = (16, 32, 64, 128)
    c.augment.flip_axes = (0, 1, 2)
    c.augment.rotate_deg = 10.0

    c.inference = ml_collections.ConfigDict()
    c.inference.window = ()  # () -> patch_size
    c.inference.overlap = 0.5
    c.inference.window_batch = 2
    c.inference.sigma_scale = 0.125
    c.inference.mode = "gaussian"
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


def _adam(lr: float, b1: float, b2: float = 0.999, schedule: str = "constant"):
    c = ml_collections.ConfigDict()
    c.name = "adam"
    c.learning_rate = lr
    c.b1 = b1
    c.b2 = b2
    c.schedule = schedule
    c.warmup_steps = 0
    return c


def gan(task: str) -> ml_collections.ConfigDict:
    """Defaults shared by the GAN tasks (`dcgan`, `wgan_gp`, `pix2pix`, `cyclegan`): two Adam
    optimizers (the DCGAN/pix2pix/CycleGAN setting 2e-4, b1=0.5), fixed-noise sample grids every
    `sample_every` steps, evaluation every `eval_every`, the last checkpoints kept for resume."""
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 0
    scale(c)
    c.batch_size = 64
    c.eval_batch_size = 64
    c.num_steps = 2000
    c.log_every = 50
    c.eval_every = 500
    c.sample_every = 250
    c.checkpoint_every = 250
    c.keep_checkpoints = 2
    c.best_metric = ""  # GAN metrics are not a training target: keep the latest checkpoints
    c.best_mode = "min"
    c.tensorboard = True
    c.num_pictures = 64
    c.ema_decay = 0.0  # > 0 (e.g. 0.999): samples and evaluation from an EMA of the generator
    c.optimizer_g = _adam(2e-4, 0.5)
    c.optimizer_d = _adam(2e-4, 0.5)
    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "non_saturating"
    c.model = ml_collections.ConfigDict()
    c.model.generator = ml_collections.ConfigDict()
    c.model.generator.dtype = "float32"  # compute dtype; "bfloat16" on GPUs, TPUs and bf16 CPUs
    c.model.discriminator = ml_collections.ConfigDict()
    c.model.discriminator.dtype = "float32"
    c.data = data_block()
    c.data.directory = ""
    c.data.max_examples = 0
    c.eval = ml_collections.ConfigDict()
    c.eval.num_samples = 0  # generated images per evaluation; 0: half the validation images
    c.eval.classifier_workdir = ""  # a medjax `classification` run: adds FID and KID
    return c


def shrink_gan_for_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `smoke` argument of GAN configs: a seconds-long run through every code path."""
    c.num_steps = 4
    c.log_every = 2
    c.eval_every = 4
    c.sample_every = 2
    c.checkpoint_every = 2
    c.batch_size = 2
    c.eval_batch_size = 2
    c.num_pictures = 4
    c.tensorboard = False
    c.data.max_examples = 8
    c.eval.num_samples = 8
    return c
