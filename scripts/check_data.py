"""Check a whole dataset before a long run (`medjax check`): every file read, every problem listed.

    python scripts/check_data.py DATA_DIR --layout deepmedic|brats|brats2023|msd|nnunet|generic|
        dicom|folder|hc18|class_folders|medmnist|pairs|aligned|unpaired|images
        [--modalities flair,t1ce] [--labels 0,1,2,4] [--images images --masks masks
        --threshold 127 --channels 3] [--json report.json]

Prints a row per case (shape, spacing, voxels per class) and one line per problem; exits 1 when
anything is wrong (see medjax/data/check.py for what is checked).
"""

from __future__ import annotations

import sys

from medjax.train.cli import run_command

if __name__ == "__main__":
    run_command("check", sys.argv[1:])
