"""Dataset assembly (medjax.data.datasets): splits, stacking, preprocessing, the real ISBI folder.

Splits are checked on small synthetic example lists by hand; the ISBI images are checked against
PIL + numpy z-scoring written out here.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medjax.data import datasets
from medjax.data.paths import data_dir

ISBI_VAL = ("15", "16", "17", "18", "19")


def _examples(n: int = 10) -> list[dict]:
    return [
        {
            "id": f"case{i}",
            "slice_index": i,
            "image": np.full((2, 3, 1), i, np.float32),
            "label": np.full((2, 3), i % 2, np.int64),
            "spacing": np.array([1.0, 0.5]),
        }
        for i in range(n)
    ]


def _ids(examples) -> list[str]:
    return [ex["id"] for ex in examples]


def _isbi_dir():
    try:
        return data_dir("isbi2012_em_membrane")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


# ---------------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------------


def test_split_by_val_ids_keeps_order():
    train, val = datasets.split_examples(_examples(), {"val_ids": ("case7", "case3")}, seed=0)
    assert _ids(val) == ["case3", "case7"]
    assert _ids(train) == [f"case{i}" for i in (0, 1, 2, 4, 5, 6, 8, 9)]


def test_split_val_ids_are_compared_as_strings():
    exs = [{"id": str(i), "slice_index": i} for i in range(5)]
    train, val = datasets.split_examples(exs, {"val_ids": (1, 4)}, seed=0)
    assert _ids(val) == ["1", "4"] and _ids(train) == ["0", "2", "3"]


def test_split_missing_val_ids_raise_naming_them():
    with pytest.raises(ValueError, match=r"config\.data\.val_ids \['case42', 'x'\]"):
        datasets.split_examples(_examples(), {"val_ids": ("case1", "x", "case42")}, seed=0)


def test_split_val_ids_take_precedence_over_slices_and_fraction():
    cfg = {"val_ids": ("case0",), "val_slices": (4, 7), "val_gap": 1, "val_fraction": 0.5}
    train, val = datasets.split_examples(_examples(), cfg, seed=0)
    assert _ids(val) == ["case0"] and len(train) == 9


def test_split_by_slice_block_with_gap():
    cfg = {"val_slices": (4, 7), "val_gap": 1, "val_fraction": 0.5}
    train, val = datasets.split_examples(_examples(), cfg, seed=0)
    assert [ex["slice_index"] for ex in val] == [4, 5, 6]
    # Slices 3 and 7 touch the block and are dropped from training.
    assert [ex["slice_index"] for ex in train] == [0, 1, 2, 8, 9]


def test_split_by_slice_block_without_gap():
    train, val = datasets.split_examples(_examples(), {"val_slices": [4, 7]}, seed=0)
    assert [ex["slice_index"] for ex in val] == [4, 5, 6]
    assert [ex["slice_index"] for ex in train] == [0, 1, 2, 3, 7, 8, 9]
    # A wide gap can leave a short training set, never an overlap.
    train, val = datasets.split_examples(_examples(), {"val_slices": (0, 2), "val_gap": 5}, seed=0)
    assert [ex["slice_index"] for ex in train] == [7, 8, 9]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_by_fraction(seed):
    exs = _examples(10)
    train, val = datasets.split_examples(exs, {"val_fraction": 0.3}, seed=seed)
    # round(0.3 * 10) = 3 examples chosen by default_rng(seed).permutation(10)[:3], in input order.
    chosen = sorted(np.random.default_rng(seed).permutation(10)[:3].tolist())
    assert _ids(val) == [f"case{i}" for i in chosen]
    assert _ids(train) == [f"case{i}" for i in range(10) if i not in chosen]
    again = datasets.split_examples(exs, {"val_fraction": 0.3}, seed=seed)
    assert _ids(again[1]) == _ids(val)


def test_split_default_fraction_is_a_fifth():
    train, val = datasets.split_examples(_examples(10), {}, seed=0)
    assert len(val) == 2 and len(train) == 8
    assert sorted(_ids(train + val)) == sorted(_ids(_examples(10)))


# ---------------------------------------------------------------------------------------------
# stack_examples / preprocess
# ---------------------------------------------------------------------------------------------


def test_stack_examples():
    exs = _examples(3)
    out = datasets.stack_examples(exs, keys=("image", "label", "spacing"))
    assert set(out) == {"image", "label", "spacing"}
    assert set(datasets.stack_examples(exs)) == {"image", "label"}
    assert out["image"].shape == (3, 2, 3, 1) and out["image"].dtype == np.float32
    assert out["label"].shape == (3, 2, 3) and out["label"].dtype == np.int32
    assert out["spacing"].shape == (3, 2) and out["spacing"].dtype == np.float32
    np.testing.assert_array_equal(out["image"][:, 0, 0, 0], [0, 1, 2])
    np.testing.assert_array_equal(out["label"][:, 1, 2], [0, 1, 0])
    np.testing.assert_array_equal(out["spacing"], [[1.0, 0.5]] * 3)
    only = datasets.stack_examples(exs, keys=("image",))
    assert set(only) == {"image"}


def test_stack_examples_errors():
    exs = _examples(3)
    exs[1] = dict(exs[1], image=np.zeros((4, 3, 1), np.float32))
    with pytest.raises(ValueError, match=r"different image shapes.*image_size"):
        datasets.stack_examples(exs)
    with pytest.raises(ValueError, match="no examples"):
        datasets.stack_examples([])


def test_preprocess_zscore_and_resize():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (8, 12, 1)).astype(np.float32)
    ex = {"image": img, "label": np.zeros((8, 12), np.int32), "spacing": np.ones(2), "id": "a"}
    out = datasets.preprocess(ex, {"normalize": "zscore"})
    want = (img.astype(np.float64) - img.mean()) / img.std()
    np.testing.assert_allclose(out["image"], want, rtol=1e-5, atol=1e-5)
    assert out["image"].dtype == np.float32 and out["id"] == "a"
    assert ex["image"] is img and img.max() > 1  # the input is not modified
    # scale 0.5: half the size, spacing doubled; image_size takes precedence over scale.
    half = datasets.preprocess(ex, {"scale": 0.5, "normalize": "none"})
    assert half["image"].shape == (4, 6, 1) and half["label"].shape == (4, 6)
    np.testing.assert_allclose(half["spacing"], [2.0, 2.0])
    sized = datasets.preprocess(ex, {"image_size": (4, 4), "scale": 0.5, "normalize": "minmax"})
    assert sized["image"].shape == (4, 4, 1)
    np.testing.assert_allclose(sized["spacing"], [2.0, 3.0])
    assert sized["image"].min() == pytest.approx(0.0) and sized["image"].max() == pytest.approx(1.0)


def test_unknown_source_raises():
    with pytest.raises(ValueError, match=r"config\.data\.source='nope'"):
        datasets.load_examples({"source": "nope"}, "train")


# ---------------------------------------------------------------------------------------------
# load_segmentation on the shared ISBI-2012 folder
# ---------------------------------------------------------------------------------------------


def _load(cfg):
    """train / val examples of a config, preprocessed for the network."""
    return {
        split: [datasets.preprocess(ex, cfg) for ex in datasets.load_examples(cfg, split)]
        for split in ("train", "val")
    }


@pytest.fixture(scope="module")
def isbi():
    folder = _isbi_dir()
    cfg = {"source": "isbi2012", "directory": "", "normalize": "zscore", "val_ids": ISBI_VAL}
    return folder, _load(cfg)


def test_load_isbi_split(isbi):
    folder, data = isbi
    assert datasets.resolve_directory({"source": "isbi2012"}) == folder
    assert len(data["train"]) == 15 and len(data["val"]) == 5
    assert _ids(data["val"]) == list(ISBI_VAL)
    assert sorted(_ids(data["train"]), key=int) == [str(i) for i in range(15)]
    assert datasets.class_names({"source": "isbi2012", "num_classes": 2}) == (
        "interior",
        "membrane",
    )


def test_load_isbi_images_are_zscored(isbi):
    folder, data = isbi
    for ex in data["train"] + data["val"]:
        img = ex["image"]
        assert img.shape == (512, 512, 1) and img.dtype == np.float32
        assert abs(float(img.mean())) < 1e-4
        assert float(img.std()) == pytest.approx(1.0, abs=1e-4)
        assert set(np.unique(ex["label"]).tolist()) <= {0, 1}
    # Against an independent read: PIL grey levels, z-scored by numpy (any affine intensity scaling
    # of the reader cancels out); labels are 1 where the PNG is 0 (membrane).
    for ex in (data["val"][0], data["train"][3]):
        with Image.open(folder / "train" / "image" / f"{ex['id']}.png") as im:
            raw = np.asarray(im.convert("L"), np.float64)
        want = (raw - raw.mean()) / raw.std()
        np.testing.assert_allclose(ex["image"][..., 0], want, atol=1e-4)
        with Image.open(folder / "train" / "label" / f"{ex['id']}.png") as im:
            lab = np.asarray(im.convert("L"))
        np.testing.assert_array_equal(ex["label"], (lab == 0).astype(np.int32))
    stacked = datasets.stack_examples(data["train"])
    assert stacked["image"].shape == (15, 512, 512, 1)


def test_load_isbi_max_examples_caps_each_split():
    folder = _isbi_dir()
    cfg = {"source": "isbi2012", "directory": str(folder), "val_ids": ISBI_VAL, "max_examples": 4}
    data = _load(cfg)
    assert _ids(data["train"]) == ["0", "1", "2", "3"]
    assert _ids(data["val"]) == ["15", "16", "17", "18"]


def test_load_isbi_errors():
    folder = _isbi_dir()
    base = {"source": "isbi2012", "directory": str(folder)}
    with pytest.raises(ValueError, match=r"val_ids \['20', 'abc'\]"):
        datasets.load_examples({**base, "val_ids": ("1", "abc", "20")}, "val")
    with pytest.raises(ValueError, match="the val split is empty"):
        datasets.load_examples({**base, "val_fraction": 0.0}, "val")
    # the test split of the shared folder has no masks (they are withheld)
    with pytest.raises(FileNotFoundError, match="mask"):
        datasets.load_examples(base, "test")


def test_stored_values_invert_the_datasets_mask_convention():
    # ISBI stores 0 = membrane (class 1), 255 = interior (class 0)
    assert datasets.stored_values({"source": "isbi2012", "num_classes": 2}) == {1: 0, 0: 255}
    cfg = {"source": "folder", "num_classes": 3, "label_values": ((10, 0), (20, 1), (30, 2))}
    assert datasets.stored_values(cfg) == {0: 10, 1: 20, 2: 30}
    assert datasets.stored_values({"source": "kvasir_seg", "num_classes": 2}) == {0: 0, 1: 255}
    assert datasets.stored_values({"source": "folder", "num_classes": 3}) == {0: 0, 1: 1, 2: 2}
