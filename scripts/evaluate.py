"""Evaluate a trained run on its validation cases or on any folder of the same layout.

    python scripts/evaluate.py --workdir runs/isbi2012 [--data_dir /path/isbi2012_em_membrane]
        [--checkpoint best|latest] [--out_dir DIR] [--set data.slice_crop= --set data.region=TC]

Prints a per-case table and the means, and writes metrics.csv, summary.json and overlay PNGs.
Volume runs (task volume_segmentation) are scored on whole volumes by sliding window, per BraTS
region (WT, TC, ET): Dice, sensitivity, specificity, HD95 in mm.
"""

from __future__ import annotations

from absl import app, flags, logging

from medjax.train.platform import configure_xla

flags.DEFINE_string("workdir", None, "The run folder (config.json + checkpoints).")
flags.DEFINE_string("data_dir", None, "Evaluate every case of this folder (default: val split).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to restore.")
flags.DEFINE_string("out_dir", None, "Output folder (default: <workdir>/eval/...).")
flags.DEFINE_integer("pictures", 8, "Number of overlay PNGs to write.")
flags.DEFINE_multi_string(
    "set", [], "key.sub=value change to the run's config for this evaluation (repeatable)."
)
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_xla()
    if FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.ERROR)
    from medjax.train.evaluate import evaluate_workdir

    rows, summary = evaluate_workdir(
        FLAGS.workdir,
        data_dir=FLAGS.data_dir,
        checkpoint=FLAGS.checkpoint,
        out_dir=FLAGS.out_dir,
        pictures=FLAGS.pictures,
        overrides=FLAGS.set,
    )
    cols = [
        c
        for c in rows[0]
        if c == "id"
        or c.startswith(("dice_", "sensitivity_", "hd95_", "hc_", "accuracy"))
        and "background" not in c
        and "interior" not in c
    ]
    print("  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print("  ".join(f"{_fmt(r[c]):>14}" for c in cols))
    print("mean over", int(summary["cases"]), "cases (checkpoint step", summary["step"], ")")
    for k in sorted(summary):
        if not k.endswith("_n") and k not in ("cases", "step"):
            print(f"  {k:32s} {summary[k]:.4f}")


if __name__ == "__main__":
    app.run(main)
