"""Train any medjax experiment from a config file.

    python scripts/train.py --config medjax/configs/isbi2012.py[:smoke] --workdir runs/isbi \
        [--config.num_steps=500 --config.data.directory=/data/isbi2012]

Re-running with the same --workdir resumes from its latest checkpoint. Unknown --config.* keys are
rejected. On a multi-host TPU/GPU job run the same command on every host.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from medjax.train.platform import configure_xla

config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).")
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and pictures.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_xla()
    if FLAGS.verbosity <= 0:  # keep Orbax/absl INFO chatter out of the progress log
        logging.set_verbosity(logging.WARNING)
    from medjax.train import loop  # after XLA flags are set

    final = loop.run(FLAGS.config, FLAGS.workdir)
    print(json.dumps(final, indent=2, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
