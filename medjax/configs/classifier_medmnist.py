"""A small CNN classifier on MedMNIST (PneumoniaMNIST by default; `breast` for BreastMNIST).

Scored by accuracy, balanced accuracy and ROC AUC on the validation split. Its penultimate
features are medjax's own feature space for FID / KID of generated images (no download):

    python scripts/train.py --config medjax/configs/classifier_medmnist.py --workdir runs/cls
    python scripts/train.py --config medjax/configs/dcgan_medmnist.py --workdir runs/dcgan \
        --config.eval.classifier_workdir=runs/cls

`64` trains on 64x64 upsampled images (to score 64x64 generators).
"""

import ml_collections

from medjax.configs import common
from medjax.configs.dcgan_medmnist import FOLDERS


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.task = "classification"
    c.seed = 0
    common.scale(c)
    c.batch_size = 64
    c.eval_batch_size = 128
    c.num_steps = 1500
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.best_metric = "auc"
    c.best_mode = "max"
    c.tensorboard = True
    c.data = common.data_block()
    c.data.source = "medmnist"
    c.data.shared_folder = FOLDERS["breast" if "breast" in args else "pneumonia"]
    c.data.directory = ""
    c.data.image_size = (64, 64) if "64" in args else (28, 28)
    c.data.num_classes = 2
    c.data.max_examples = 0
    c.model = ml_collections.ConfigDict()
    c.model.features = (32, 64, 128)
    c.model.norm = "batch"
    c.model.dropout = 0.2
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on GPUs, TPUs and bf16 CPUs
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    # X-rays / ultrasound have a fixed orientation: no flips or quarter turns
    c.augment = common.augment(flip_axes=(), rot90=False, rotate_deg=10.0, gamma_prob=0.0)
    if "smoke" in args:
        c.num_steps = 4
        c.log_every = 2
        c.eval_every = 4
        c.checkpoint_every = 2
        c.batch_size = 2
        c.eval_batch_size = 2
        c.model.features = (8, 16)
        c.optimizer.warmup_steps = 1
        c.tensorboard = False
        c.data.max_examples = 8
    return c
