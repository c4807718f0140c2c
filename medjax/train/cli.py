"""The `medjax` command line: `medjax train | evaluate | predict | sample`.

Installed as a console script (`pip install medjax[train]`), so no checkout is needed; the
`scripts/*.py` files of a checkout are the same commands. `--config` takes a shipped config by
name (`--config isbi2012:smoke`) or a path (`--config my_config.py:arg`).

    medjax train --config isbi2012 --workdir runs/isbi [--config.num_steps=500]
    medjax evaluate --workdir runs/isbi [--data_dir DIR] [--split val|test|train]
    medjax predict --workdir runs/isbi --input IMAGES_OR_CASES --output OUT
    medjax sample --workdir runs/dcgan --num 64 --output samples/
    medjax check DATA_DIR --layout deepmedic|nnunet|msd|brats|folder|dicom|medmnist|...
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

COMMANDS = ("train", "evaluate", "predict", "sample", "check")


def config_path(spec: str) -> str:
    """`name[:arg]` of a shipped config (`medjax/configs/<name>.py`) -> `path[:arg]`; a spec
    whose path exists is returned unchanged."""
    path, sep, arg = spec.partition(":")
    if Path(path).exists() or not path:
        return spec
    name = Path(path).stem if path.endswith(".py") else path
    from medjax import configs

    shipped = Path(configs.__file__).parent / f"{name}.py"
    if not shipped.is_file() or name in ("__init__", "common"):
        known = sorted(
            p.stem for p in shipped.parent.glob("*.py") if p.stem not in ("__init__", "common")
        )
        raise SystemExit(
            f"--config {spec!r}: no file {path!r} and no shipped config {name!r} {known}"
        )
    return str(shipped) + sep + arg


def _resolve_config_arg(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--config", "-config") and i + 1 < len(argv):
            out += [a, config_path(argv[i + 1])]
            i += 2
            continue
        if a.startswith(("--config=", "-config=")):
            flag, _, value = a.partition("=")
            a = f"{flag}={config_path(value)}"
        out.append(a)
        i += 1
    return out


def _cluster_flags() -> None:
    """Flags of a multi-process launch (every command has them; see README "Scaling")."""
    from absl import flags

    flags.DEFINE_string(
        "coordinator", None, "host:port of process 0 of a multi-process job (else from the env)."
    )
    flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")


def _join_cluster() -> None:
    """Joins the multi-process job (flags, else the environment: TPU pod, Slurm, ...)."""
    from absl import flags

    from medjax import parallel

    f = flags.FLAGS
    parallel.initialize_distributed(f.coordinator, f.num_processes, f.process_id)


def _quiet(level: str) -> None:
    from absl import flags, logging

    if flags.FLAGS.verbosity <= 0:  # keep Orbax/absl INFO chatter out of the progress log
        logging.set_verbosity(getattr(logging, level))


def _train() -> Callable[[list[str]], None]:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config: a name or a path[:arg].")
    _cluster_flags()
    flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and pictures.")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv: list[str]) -> None:
        _no_positional(argv)
        _join_cluster()
        _quiet("WARNING")
        from medjax.train import loop  # after XLA flags are set

        final = loop.run(flags.FLAGS.config, flags.FLAGS.workdir)
        print(json.dumps(final, indent=2, sort_keys=True))

    return main


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _evaluate() -> Callable[[list[str]], None]:
    from absl import flags

    _cluster_flags()

    flags.DEFINE_string("workdir", None, "The run folder (config.json + checkpoints).")
    flags.DEFINE_string(
        "data_dir", None, "A dataset folder in the run's layout (default: its own)."
    )
    flags.DEFINE_enum("split", "val", ["train", "val", "test"], "Which split to score.")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to restore.")
    flags.DEFINE_string("out_dir", None, "Output folder (default: <workdir>/eval/...).")
    flags.DEFINE_integer("pictures", 8, "Number of pictures (overlays, sample grids) to write.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing output folder.")
    flags.DEFINE_multi_string(
        "set", [], "key.sub=value change to the run's config for this evaluation (repeatable)."
    )
    flags.mark_flags_as_required(["workdir"])

    def main(argv: list[str]) -> None:
        _no_positional(argv)
        _join_cluster()
        _quiet("ERROR")
        from medjax.train.evaluate import evaluate_workdir

        f = flags.FLAGS
        rows, summary, out = evaluate_workdir(
            f.workdir,
            data_dir=f.data_dir,
            split=f.split,
            checkpoint=f.checkpoint,
            out_dir=f.out_dir,
            pictures=f.pictures,
            overrides=f.set,
            overwrite=f.overwrite,
        )
        cols = [
            c
            for c in rows[0]
            if c == "id"
            or c.startswith(("dice_", "sensitivity_", "hd95_", "hc_", "accuracy"))
            and "background" not in c
            and "interior" not in c
        ]
        if len(cols) > 1 and len(rows) <= 200:  # a per-case table when there are case metrics
            print("  ".join(f"{c:>14}" for c in cols))
            for r in rows:
                print("  ".join(f"{_fmt(r.get(c, '')):>14}" for c in cols))
        print(f"mean over {int(summary['cases'])} cases (checkpoint step {summary['step']}); {out}")
        for k in sorted(summary):
            if not k.endswith("_n") and k not in ("cases", "step"):
                print(f"  {k:32s} {summary[k]:.4f}")

    return main


def _predict() -> Callable[[list[str]], None]:
    from absl import flags

    _cluster_flags()

    flags.DEFINE_string("workdir", None, "The run folder (config.json + checkpoints).")
    flags.DEFINE_multi_string(
        "input", None, "An image / NIfTI file, DICOM series, image folder, dataset or case folder."
    )
    flags.DEFINE_string("output", None, "Folder for the prediction files.")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to restore.")
    flags.DEFINE_bool("overwrite", False, "Replace existing prediction files.")
    flags.DEFINE_integer("replica", 0, "Which model of a run with config.replicas > 1.")
    flags.mark_flags_as_required(["workdir", "input", "output"])

    def main(argv: list[str]) -> None:
        _no_positional(argv)
        _join_cluster()
        _quiet("ERROR")
        from medjax.train.evaluate import predict_workdir

        f = flags.FLAGS
        for path in predict_workdir(
            f.workdir,
            f.input,
            f.output,
            checkpoint=f.checkpoint,
            overwrite=f.overwrite,
            replica=f.replica,
        ):
            print(path)

    return main


def _sample() -> Callable[[list[str]], None]:
    from absl import flags

    _cluster_flags()

    flags.DEFINE_string("workdir", None, "The run folder (config.json + checkpoints).")
    flags.DEFINE_string("output", None, "Folder for the samples.")
    flags.DEFINE_integer("num", 64, "Number of samples.")
    flags.DEFINE_integer("seed", None, "Latent seed (generators); default: the eval noise.")
    flags.DEFINE_enum("checkpoint", "latest", ["best", "latest"], "Which checkpoint to restore.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing output folder.")
    flags.DEFINE_integer("replica", 0, "Which model of a run with config.replicas > 1.")
    flags.mark_flags_as_required(["workdir", "output"])

    def main(argv: list[str]) -> None:
        _no_positional(argv)
        _join_cluster()
        _quiet("ERROR")
        from medjax.train.evaluate import sample_workdir

        f = flags.FLAGS
        written = sample_workdir(
            f.workdir, f.output, num=f.num, seed=f.seed, checkpoint=f.checkpoint,
            overwrite=f.overwrite, replica=f.replica,
        )  # fmt: skip
        print(f"{written['npz']} ({len(written) - 2} samples), grid {written['grid']}")

    return main


def _check() -> Callable[[list[str]], None]:
    from absl import flags

    from medjax.data.check import LAYOUTS

    flags.DEFINE_enum("layout", None, list(LAYOUTS), "The dataset's layout.")
    flags.DEFINE_list("modalities", None, "Volume layouts: the modalities to read.")
    flags.DEFINE_list("labels", None, "The allowed label values (default: the layout's).")
    flags.DEFINE_string("images", "images", "'folder' layout: the image folder's name.")
    flags.DEFINE_string("masks", "masks", "'folder' layout: the mask folder's name.")
    flags.DEFINE_float("threshold", None, "'folder' layout: mask > threshold is foreground.")
    flags.DEFINE_integer("num_classes", 2, "'folder' layout: classes of the masks.")
    flags.DEFINE_integer("channels", 0, "'folder' layout: 1 (grey) or 3 (RGB) images.")
    flags.DEFINE_string("json", None, "Also write the report (rows, errors, warnings) here.")
    flags.mark_flags_as_required(["layout"])

    def main(argv: list[str]) -> None:
        from absl import app

        from medjax.data.check import check_dataset

        if len(argv) != 2:
            raise app.UsageError("expected one DATA_DIR: medjax check DATA_DIR --layout ...")
        f = flags.FLAGS
        report = check_dataset(
            argv[1],
            f.layout,
            modalities=f.modalities,
            labels=[int(x) for x in f.labels] if f.labels else None,
            images=f.images,
            masks=f.masks,
            threshold=f.threshold,
            num_classes=f.num_classes,
            channels=f.channels,
        )
        print(report.format())
        if f.json:
            Path(f.json).write_text(
                json.dumps(
                    {"rows": report.rows, "errors": report.errors, "warnings": report.warnings},
                    indent=2,
                    default=str,
                )
            )
        if not report.ok:
            raise SystemExit(1)

    return main


def _no_positional(argv: list[str]) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")


_BUILDERS = {
    "train": _train,
    "evaluate": _evaluate,
    "predict": _predict,
    "sample": _sample,
    "check": _check,
}


def _flag_error(argv: Sequence[str], error: BaseException) -> str:
    """One line for a `--config.<key>=value` flag that could not be applied (ml_collections
    raises it as three chained tracebacks)."""
    chain, e = [], error
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = str(chain[0]).strip("'\"").replace("\\n", "\n")
    lookups = [str(c) for c in chain if isinstance(c, (KeyError, AttributeError))]
    for a in argv:
        if a.startswith(("--config.", "-config.")):
            key = a.split(".", 1)[1].split("=", 1)[0]
            if any(f"'{part}'" in c for c in lookups for part in key.split(".")):
                near = re.search(r'Did you mean "([^"]+)"', text)
                hint = f"; did you mean {near.group(1)!r}?" if near else ""
                return f"{a}: the config has no key {key!r}{hint}"
    return text.splitlines()[0] if text else type(error).__name__


def run_command(command: str, argv: Sequence[str]) -> None:
    """Runs one command with its flags `argv` (without the program name).

    A `medjax.errors.MedjaxError` (an invalid config, an unusable work directory, a checkpoint
    that cannot be written or restored) and a flag that cannot be parsed are printed as one
    message without a traceback, with exit status 2."""
    from absl import app

    from medjax.errors import MedjaxError
    from medjax.train.platform import configure_xla

    if command not in _BUILDERS:
        raise SystemExit(f"unknown command {command!r}; expected one of {list(COMMANDS)}")
    configure_xla()
    main = _BUILDERS[command]()
    entered = []

    def guarded(args: list[str]) -> None:
        entered.append(True)
        try:
            main(args)
        except MedjaxError as e:
            print(f"medjax {command}: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    try:
        app.run(guarded, argv=[f"medjax {command}", *_resolve_config_arg(list(argv))])
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        if entered:  # raised by the command, not by flag parsing
            raise
        print(f"medjax {command}: error: {_flag_error(argv, e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    """`medjax <command> [flags]` (the console script: it first restarts itself once with
    glibc's malloc tunables, `medjax.train.platform.exec_with_host_tunables`)."""
    from medjax.train.platform import exec_with_host_tunables

    if argv is None:
        exec_with_host_tunables()
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(__doc__)
        raise SystemExit(0 if args else 2)
    run_command(args[0], args[1:])


if __name__ == "__main__":
    main()
