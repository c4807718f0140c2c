"""Readers, layouts, preprocessing and input pipelines; never the trainer.

One convention for everything a reader returns, an **example**: a dict with

* ``"image"``: float32, channels last, ``[H, W, C]`` (2D) or ``[X, Y, Z, C]`` (3D);
* ``"label"``: int32 classes ``[*spatial]`` (absent or None when unlabelled);
* ``"mask"``: bool ``[*spatial]``, the region that counts (brain, head; every pixel without one);
* ``"spacing"``: float32 ``[nd]``, the pixel / voxel size (mm when the format gives it);
* ``"id"``: str; volumes also carry ``"geometry"`` (:class:`medjax.data.io.Geometry`: affine and
  orientation, to write predictions back on the input's grid).

Intensities as stored: 8/16-bit pixel formats divided by their maximum (so in [0, 1]),
NIfTI / DICOM values as read. A **set** is examples of one shape stacked along a leading axis,
the same keys with ``[N, ...]`` (``datasets.stack_examples``, ``image_sets``). The one place an
experiment rescales is its own preprocessing: z-scores for segmentation
(``transforms.normalize_image``, ``transforms.zscore_in_mask``), [-1, 1] for GANs and
classifiers (``image_sets.scale_to_unit_range``, ``image_sets.read_scaled``).

Modules: ``sources`` (2D files and folders; ISBI-2012, Kvasir-SEG, HC18, MNI152), ``volumes``
(case layouts: nnU-Net, MSD, BraTS, deepmedic, generic; classes and regions), ``image_sets``
(sets for GANs and classifiers: MedMNIST, image / class / pair folders, BraTS slices, TCIA),
``datasets`` (2D segmentation sources and splits), ``io`` (NIfTI, DICOM, PNG),
``transforms``, ``patches``, ``pipeline`` (tf.data -> sharded batches), ``convert`` (layout
conversion), ``builders`` (TFDS), ``paths`` (where the shared data lives).
"""
