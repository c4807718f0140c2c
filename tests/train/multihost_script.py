"""One process of a real multi-process medjax job on this machine (tests/train/test_multihost.py).

    python tests/train/multihost_script.py MODE WORKDIR PORT PROCESSES PROCESS_ID [key=value ...]

MODE is `train` (`loop.run` of the ISBI-2012 smoke config, with the `key=value` config changes)
or `evaluate` (`evaluate_workdir` of that run's latest checkpoint). After `train`, every process
writes its final parameters to `WORKDIR/params_<process>.npz`; after `evaluate`, process 0 prints
the number of rows and the summary. Each process has the simulated CPU devices its XLA_FLAGS
give it; with NUM_PROCESSES=1 it is an ordinary single-process run.

Once its work is done a process prints `DONE` and exits as usual (JAX's shutdown barrier);
one that has not exited 120 s later prints every thread's stack and exits with status 1, so a
process that hangs at exit says where (tests/train/test_multihost.py reports it).
"""

import faulthandler
import json
import sys
from pathlib import Path

import jax
import numpy as np

from medjax import parallel


def config(changes):
    from medjax.configs import isbi2012
    from medjax.train.evaluate import apply_overrides

    c = isbi2012.get_config("smoke")
    c.data.max_examples = 16
    apply_overrides(c, changes)
    return c


def main(mode, workdir, port, num_processes, process_id, *changes):
    if int(num_processes) > 1:
        parallel.initialize_distributed(f"127.0.0.1:{port}", int(num_processes), int(process_id))
    from medjax.train import loop
    from medjax.train.evaluate import evaluate_workdir

    if mode == "train":
        loop.run(config(changes), workdir)
        trainer, state = loop.restore(loop.load_run_config(workdir), workdir, best=False)
        leaves = jax.tree.leaves(state.params)
        flat = {f"p{i}": loop.to_host(x) for i, x in enumerate(leaves)}
        np.savez(Path(workdir) / f"params_{jax.process_index()}.npz", **flat)
    else:
        rows, summary, out = evaluate_workdir(
            workdir, checkpoint="latest", out_dir=Path(workdir) / f"eval_{num_processes}"
        )
        if jax.process_index() == 0:
            ids = [r["id"] for r in rows]
            print(json.dumps({"ids": ids, "summary": summary}))


DONE = "DONE"  # printed once a process's work is done, before it exits

if __name__ == "__main__":
    main(*sys.argv[1:])
    print(DONE, flush=True)
    sys.stderr.flush()
    faulthandler.dump_traceback_later(120, exit=True)
