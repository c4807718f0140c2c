"""Predict label maps for whole volumes with a trained volume run; one NIfTI per case.

    python scripts/predict.py --workdir runs/unet3d_brats \\
        --input /data/BraTS2021/BraTS2021_00001 [--input /data/other_dataset_folder ...] \\
        --output predictions/ [--checkpoint best|latest] [--overwrite]

Each --input is a dataset folder in the run's layout (config.data.layout) or one case folder of
one. Outputs `<output>/<case id>.nii.gz`: uint8 labels in the case's own convention (BraTS
0/1/2/4, deepmedic 0/1/2/4, MSD 0-3), on the input's voxel grid with its affine and orientation,
so it overlays the input in any viewer. Existing files are kept unless --overwrite.
"""

from __future__ import annotations

from absl import app, flags, logging

from medjax.train.platform import configure_xla

flags.DEFINE_string("workdir", None, "The run folder (config.json + checkpoints).")
flags.DEFINE_multi_string("input", None, "A dataset folder or a case folder (repeatable).")
flags.DEFINE_string("output", None, "Folder for the predicted NIfTI files.")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to restore.")
flags.DEFINE_bool("overwrite", False, "Replace existing prediction files.")
flags.mark_flags_as_required(["workdir", "input", "output"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_xla()
    if FLAGS.verbosity <= 0:
        logging.set_verbosity(logging.ERROR)
    from medjax.train.evaluate import predict_volumes

    written = predict_volumes(
        FLAGS.workdir,
        FLAGS.input,
        FLAGS.output,
        checkpoint=FLAGS.checkpoint,
        overwrite=FLAGS.overwrite,
    )
    for path in written:
        print(path)


if __name__ == "__main__":
    app.run(main)
