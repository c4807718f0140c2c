"""Prediction files for inputs a run never saw (`medjax predict`).

    python scripts/predict.py --workdir runs/unet3d_brats --input /data/BraTS2021/BraTS2021_00001 \
        --output predictions/ [--checkpoint best|latest] [--overwrite]
    python scripts/predict.py --workdir runs/isbi2012 --input test_images/ --output masks/
    python scripts/predict.py --workdir runs/pix2pix_tcia --input T1_DICOM_SERIES/ --output t2/

Segmentation runs write label maps: 2D masks as PNG (the dataset's own mask values), volumes as
NIfTI on the input's grid with its affine (the dataset's own label values, e.g. BraTS 0/1/2/4).
Translation runs (pix2pix, Vox2Vox, CycleGAN) write translated images (PNG) or volumes (NIfTI)
from image files or folders, NIfTI volumes or DICOM series. Existing files are kept unless
--overwrite.
"""

from __future__ import annotations

import sys

from medjax.train.cli import run_command
from medjax.train.platform import exec_with_host_tunables

if __name__ == "__main__":
    exec_with_host_tunables()  # glibc malloc tunables: restarts this process once
    run_command("predict", sys.argv[1:])
