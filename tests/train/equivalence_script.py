"""Run by tests/train/test_loop.py in a fresh process with 8 simulated CPU devices.

Trains the same tiny config on a 1-device and an 8-device mesh and prints a JSON report of the
per-step losses, eval metrics and the largest parameter / gradient-free difference.
"""

import json
import sys

import jax
import numpy as np

from medjax.configs import mni152_demo
from medjax.train import loop


def config(num_devices: int):
    c = mni152_demo.get_config("smoke")
    c.num_devices = num_devices
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_steps = 4
    c.log_every = 1
    c.eval_every = 4
    c.checkpoint_every = 4
    c.data.max_examples = 40
    return c


def main(root: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    out = {}
    for n in (1, 8):
        cfg = config(n)
        final = loop.run(cfg, f"{root}/dev{n}")
        rows = [json.loads(x) for x in open(f"{root}/dev{n}/metrics.jsonl")]
        losses = [r["loss"] for r in rows if r["split"] == "train"]
        trainer, state = loop.restore(cfg, f"{root}/dev{n}", best=False)
        leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
        out[n] = {
            "losses": losses,
            "dice_mean": final["dice_mean"],
            "params": leaves,
            "devices": int(trainer.mesh.devices.size),
        }
    pairs = zip(out[1]["params"], out[8]["params"], strict=True)
    diff = max(float(np.max(np.abs(a - b))) for a, b in pairs)
    scale = max(float(np.max(np.abs(a))) for a in out[1]["params"])
    print(
        json.dumps(
            {
                "devices": [out[1]["devices"], out[8]["devices"]],
                "losses_1": out[1]["losses"],
                "losses_8": out[8]["losses"],
                "dice_1": out[1]["dice_mean"],
                "dice_8": out[8]["dice_mean"],
                "max_param_diff": diff,
                "param_scale": scale,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
