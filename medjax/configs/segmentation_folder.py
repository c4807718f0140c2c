"""2D U-Net on ANY folder of images and masks (PNG, JPEG, TIFF, 2D NIfTI): `images/` and `masks/`
paired by file name (or a `train/`, `val/`, `test/` folder of each).

Classes come from the mask values (`0..num_classes-1`, or 0/255 for two classes), from
`data.label_values` (stored value -> class pairs) or from `data.mask_threshold` (binary masks
saved as lossy JPEG). A mask value outside these is an error that names the file. Without a
`val/` folder a seeded `data.val_fraction` of the images is held out.

    python scripts/train.py --config segmentation_folder --workdir runs/polyps \
        --config.data.directory=/data/polyps --config.data.mask_threshold=127 \
        --config.data.channels=3
    # the ISBI-2012 stack arranged as an nnU-Net 2D dataset (imagesTr/em_000_0000.png, labelsTr/):
    python scripts/train.py --config segmentation_folder:isbi --workdir runs/isbi_folder \
        --config.data.directory=/data/isbi_nnunet2d
    python scripts/evaluate.py --workdir runs/isbi_folder --data_dir /data/other --split test
    python scripts/predict.py --workdir runs/isbi_folder --input new_images/ --output masks/

Arguments: `isbi` (the settings of `isbi2012.py` for an ISBI stack in nnU-Net 2D names: membrane
0 -> class 1, slices 15-19 validate), `smoke`.
"""

from medjax.configs import common, isbi2012


def get_config(arg: str | None = None):
    args = common.parse_arg(arg)
    if "isbi" in args:
        c = isbi2012.get_config(arg)
        keep = c.data
        c.data = common.segmentation("folder", num_classes=2).data
        c.data.update({k: keep[k] for k in ("val_ids", "max_examples", "normalize")})
        c.data.val_ids = tuple(f"em_{int(i):03d}" for i in keep.val_ids)
        c.data.images = "imagesTr"
        c.data.masks = "labelsTr"
        c.data.image_suffix = "_0000"
        c.data.mask_suffix = ""
        c.data.label_values = ((0, 1), (255, 0))  # the PNGs store 0 = membrane
        c.data.mask_threshold = -1.0
        c.data.channels = 1
        c.data.class_names = ("interior", "membrane")
        return c
    c = common.segmentation("folder", num_classes=2)
    c.data.images = "images"  # sub-folder names (or of <split>/)
    c.data.masks = "masks"
    c.data.image_suffix = ""  # e.g. "_0000" for nnU-Net 2D names (case_0000.png <-> case.png)
    c.data.mask_suffix = ""  # e.g. "_Annotation"
    c.data.label_values = ()  # ((stored, class), ...); () -> the stored values themselves
    c.data.mask_threshold = -1.0  # >= 0: binary masks, value > threshold is class 1
    c.data.channels = 0  # 1 grey, 3 RGB, 0 as stored
    c.data.class_names = ()  # default background, class1, ...
    c.data.image_size = (256, 256)
    c.crop_size = (192, 192)
    c.model.features = (16, 32, 64, 128)
    c.batch_size = 4
    c.eval_batch_size = 4
    c.num_steps = 1000
    c.eval_every = 200
    c.checkpoint_every = 200
    if "smoke" in args:
        common.shrink_for_smoke(c)
        c.data.image_size = (64, 64)
        c.crop_size = ()
    return c
