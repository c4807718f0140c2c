"""Train any medjax experiment (same as `medjax train`, the installed console script).

    python scripts/train.py --config isbi2012[:smoke] --workdir runs/isbi \
        [--config.num_steps=500 --config.data.directory=/data/isbi2012]
    python scripts/train.py --config path/to/my_config.py:arg --workdir runs/mine

`--config` is a shipped config's name (`medjax/configs/<name>.py`) or a path. Re-running with the
same --workdir resumes from its latest checkpoint. Unknown --config.* keys are rejected. On a
multi-host TPU/GPU job run the same command on every host.
"""

from __future__ import annotations

import sys

from medjax.train.cli import run_command
from medjax.train.platform import exec_with_host_tunables

if __name__ == "__main__":
    exec_with_host_tunables()  # glibc malloc tunables: restarts this process once
    run_command("train", sys.argv[1:])
