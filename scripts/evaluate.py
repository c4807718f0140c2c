"""Score a run on a split of its data or of any folder in the same layout (`medjax evaluate`).

    python scripts/evaluate.py --workdir runs/isbi2012 [--data_dir /path/isbi2012_em_membrane]
        [--split val|test|train] [--checkpoint best|latest] [--out_dir DIR] [--overwrite]
        [--set data.slice_crop= --set data.region=TC]

Works for every task (segmentation, volumes, classification, GANs) through the task contract.
Prints a per-case table and the means, and writes metrics.csv, summary.json and pictures into a
new folder (an existing one is kept unless --overwrite).
"""

from __future__ import annotations

import sys

from medjax.train.cli import run_command
from medjax.train.platform import exec_with_host_tunables

if __name__ == "__main__":
    exec_with_host_tunables()  # glibc malloc tunables: restarts this process once
    run_command("evaluate", sys.argv[1:])
