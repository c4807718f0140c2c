"""Samples of a trained generator run (`medjax sample`): PNG (2D) or NIfTI (3D), a grid, an .npz.

    python scripts/sample.py --workdir runs/dcgan_pneumonia --num 64 --output samples/ [--seed 7]
    python scripts/sample.py --workdir runs/pix2pix_brats --num 16 --output translations/

Latent GANs (dcgan, wgan_gp, conditional_gan) draw `--num` latent vectors from `--seed` (default:
the fixed evaluation noise; the conditional GAN cycles through the classes); translation runs
(pix2pix, cyclegan) translate the first `--num` validation inputs. Writes `<output>/samples.npz`,
`grid.png` and `sample_XXXX.png|.nii.gz`; an existing output folder is kept unless --overwrite.
"""

from __future__ import annotations

import sys

from medjax.train.cli import run_command
from medjax.train.platform import exec_with_host_tunables

if __name__ == "__main__":
    exec_with_host_tunables()  # glibc malloc tunables: restarts this process once
    run_command("sample", sys.argv[1:])
