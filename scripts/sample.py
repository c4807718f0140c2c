"""Samples from a trained GAN run: N images as PNG (2D) or NIfTI (3D), a grid and an .npz.

    python scripts/sample.py --workdir runs/dcgan_pneumonia --num 64 --output samples/ [--seed 7]
    python scripts/sample.py --workdir runs/pix2pix_brats --num 16 --output translations/

Unconditional runs (dcgan, wgan_gp) draw `--num` latent vectors from `--seed` (default: the fixed
evaluation noise); conditional runs (pix2pix, cyclegan) translate the first `--num` validation
inputs. Writes `<output>/samples.npz` (key `samples`, plus `source` for conditional runs),
`grid.png` and `sample_XXXX.png|.nii.gz`; existing outputs are kept unless --overwrite.
"""

from __future__ import annotations

from absl import app, flags, logging

from medjax.train.platform import configure_xla

flags.DEFINE_string("workdir", None, "The run folder (config.json + checkpoints).")
flags.DEFINE_string("output", None, "Folder for the samples.")
flags.DEFINE_integer("num", 64, "Number of samples.")
flags.DEFINE_integer("seed", None, "Latent seed (unconditional runs); default: the eval noise.")
flags.DEFINE_enum("checkpoint", "latest", ["best", "latest"], "Which checkpoint to restore.")
flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
flags.mark_flags_as_required(["workdir", "output"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_xla()
    if FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.ERROR)
    from medjax.train.evaluate import sample_workdir

    written = sample_workdir(
        FLAGS.workdir,
        FLAGS.output,
        num=FLAGS.num,
        seed=FLAGS.seed,
        checkpoint=FLAGS.checkpoint,
        overwrite=FLAGS.overwrite,
    )
    print(f"{written['npz']} ({len(written) - 2} samples), grid {written['grid']}")


if __name__ == "__main__":
    app.run(main)
