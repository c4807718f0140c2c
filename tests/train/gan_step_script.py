"""Run by tests/train/test_gan_tasks.py in a fresh process with 8 simulated CPU devices.

For every GAN task (and the classifier behind FID), on tiny shapes: build the smoke config, make
one synthetic global batch, and take two compiled train steps on a 1-device and on an 8-device
mesh from the same initial state. Prints one JSON line: per task, the step metrics on each mesh
and the largest parameter difference after the first step.
"""

import json
import sys
import time

import jax
import numpy as np

from medjax.configs import (
    classifier_medmnist,
    cyclegan_brats,
    dcgan_brats3d,
    dcgan_medmnist,
    pix2pix_brats,
    vox2vox_brats,
    wgan_gp_medmnist,
)
from medjax.train import loop

B = 8  # global batch: one row per simulated device


def configs():
    def smoke(mod, arg=""):
        c = mod.get_config(",".join(x for x in ("smoke", arg) if x))
        c.batch_size = B
        return c

    out = {
        "dcgan_hinge_sn_ema": smoke(dcgan_medmnist, "hinge,sn,ema"),
        "dcgan_3d": smoke(dcgan_brats3d),
        "wgan_gp": smoke(wgan_gp_medmnist),
        "pix2pix": smoke(pix2pix_brats),
        "vox2vox_synthesis": smoke(vox2vox_brats),
        "vox2vox_segmentation": smoke(vox2vox_brats, "seg"),
        "cyclegan": smoke(cyclegan_brats),
        "classification": smoke(classifier_medmnist),
    }
    out["wgan_gp"].batch_size = B * out["wgan_gp"].n_critic
    return out


def main(names: list[str]) -> None:
    assert jax.device_count() == 8, jax.devices()
    report = {}
    for name, cfg in configs().items():
        if names and name not in names:
            continue
        t0 = time.perf_counter()
        batch = loop.Trainer(cfg).task.synthetic_batch(cfg.batch_size)
        res = {}
        for n in (1, 8):
            cfg.num_devices = n
            trainer = loop.Trainer(cfg)
            spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
            state = trainer.init_state(spec)
            gbatch = {k: jax.device_put(v, trainer.data_sh) for k, v in batch.items()}
            metrics = []
            state, m = trainer.train_step(state, gbatch)
            metrics.append({k: float(v) for k, v in m.items()})
            p1 = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]
            state, m = trainer.train_step(state, gbatch)
            metrics.append({k: float(v) for k, v in m.items()})
            res[n] = {"metrics": metrics, "params": p1, "step": int(state.step)}
        pairs = zip(res[1]["params"], res[8]["params"], strict=True)
        report[name] = {
            "metrics_1": res[1]["metrics"],
            "metrics_8": res[8]["metrics"],
            "steps": [res[1]["step"], res[8]["step"]],
            "max_param_diff": max(float(np.max(np.abs(a - b))) for a, b in pairs),
            "finite": all(np.isfinite(p).all() for p in res[8]["params"]),
        }
        print(name, f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
