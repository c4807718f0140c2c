"""A small CNN classifier on ANY folder per class: `<dir>/train/<class>/<image>` and
`<dir>/val/<class>/` (or `<dir>/<class>/` with a seeded `data.val_fraction` held out), PNG / JPEG /
TIFF / NIfTI; `3d`: 3D NIfTI volumes (resized to 28^3). Class order: `data.class_names`, else
the folder names in natural order.

    python -m medjax.data.convert medmnist --input ../shared/data/medmnist_pneumoniamnist \
        --layout class_folders --class_names normal,pneumonia --output /tmp/pneumonia_png
    python scripts/train.py --config classifier_folder --workdir runs/cls_png \
        --config.data.directory=/tmp/pneumonia_png \
        --config.data.class_names="('normal','pneumonia')"
    python scripts/evaluate.py --workdir runs/cls_png --data_dir /data/more_xrays --split test

Arguments: `3d`, `smoke`.
"""

from medjax.configs import classifier_medmnist, common


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    c = classifier_medmnist.get_config(arg)
    c.data.source = "class_folders"
    c.data.shared_folder = ""
    c.data.class_names = ()
    c.data.channels = 1
    c.data.val_fraction = 0.2
    if "3d" in args:
        c.data.image_size = (28, 28, 28)
        c.data.spatial_dims = 3
        c.model.spatial_dims = 3
        c.augment.flip_axes = ()
    return c
