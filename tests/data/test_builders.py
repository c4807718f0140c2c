"""TFDS builders (medjax.data.builders), built offline from small manual folders made here.

The manual folders hold 40x40x24 crops of a real DeepMedic BRATS case written with nibabel in
each layout (tests/data/test_volumes.py: write_layout). What the builders stored is compared
with nibabel reads of those files (closest-canonical RAS+) and with hand-written label tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from medjax.data.builders import Brats, Msd, read_split, read_split_source  # noqa: E402
from tests.data.test_volumes import (  # noqa: E402
    DM_TO_INTERNAL,
    _relabel,
    canonical,
    deepmedic_dir,
    write_layout,
)


def _prepare(builder: tfds.core.DatasetBuilder, manual: Path) -> tfds.core.DatasetBuilder:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual))
    )
    return builder


def _read_all(ds) -> dict[str, dict]:
    out = {}
    for ex in ds.as_numpy_iterator():
        out[ex["id"].decode()] = ex
    return out


def _check_example(ex: dict, image_files: list[Path], label_ref: np.ndarray | None) -> None:
    refs = [canonical(p) for p in image_files]
    if len(refs) == 1 and refs[0][0].ndim == 4:  # MSD: one 4D file
        ref_img = refs[0][0]
    else:
        ref_img = np.stack([r[0] for r in refs], axis=-1)
    assert ex["image"].dtype == np.float32
    np.testing.assert_array_equal(ex["image"], ref_img.astype(np.float32))
    assert ex["affine"].dtype == np.float64
    np.testing.assert_allclose(ex["affine"], refs[0][1])
    assert ex["spacing"].dtype == np.float32
    np.testing.assert_allclose(ex["spacing"], np.linalg.norm(refs[0][1][:3, :3], axis=0))
    assert ex["label"].dtype == np.uint8
    if label_ref is None:
        assert not ex["has_label"] and ex["label"].shape == (0, 0, 0)
    else:
        assert ex["has_label"]
        np.testing.assert_array_equal(ex["label"], label_ref)


@pytest.fixture(scope="module")
def deepmedic_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    deepmedic_dir()  # skip when the shared data is missing
    manual = tmp_path_factory.mktemp("manual_dm")
    write_layout(manual / "train", "deepmedic", {"case1": "A", "case2": "B", "case3": "C"})
    write_layout(manual / "validation", "deepmedic", {"case4": "B"})
    data = tmp_path_factory.mktemp("tfds_dm")
    _prepare(Brats(config="deepmedic", data_dir=str(data)), manual)
    return manual, data


def test_brats_deepmedic_config(deepmedic_build: tuple[Path, Path]) -> None:
    manual, data = deepmedic_build
    builder = Brats(config="deepmedic", data_dir=str(data))
    assert builder.info.splits["train"].num_examples == 3
    assert builder.info.splits["validation"].num_examples == 1
    assert builder.info.features["image"].shape == (None, None, None, 2)
    for split, ids in (("train", ["case1", "case2", "case3"]), ("validation", ["case4"])):
        got = _read_all(builder.as_dataset(split=split))
        assert sorted(got) == ids
        for cid, ex in got.items():
            d = manual / split / cid
            lab = canonical(d / "OTMultiClass.nii.gz")[0]
            _check_example(
                ex,
                [d / "Flair_subtrMeanDivStd.nii.gz", d / "T1c_subtrMeanDivStd.nii.gz"],
                _relabel(np.rint(lab).astype(int), DM_TO_INTERNAL),
            )
            mask = canonical(d / "brainmask.nii.gz")[0] > 0.5
            assert ex["mask"].dtype == np.bool_
            np.testing.assert_array_equal(ex["mask"], mask)


def test_read_split_two_processes_cover_each_example_once(
    deepmedic_build: tuple[Path, Path],
) -> None:
    _, data = deepmedic_build
    shards = [
        [
            ex["id"].decode()
            for ex in read_split(
                "brats/deepmedic",
                "train+validation",
                data_dir=data,
                process_index=i,
                process_count=2,
            ).as_numpy_iterator()
        ]
        for i in range(2)
    ]
    # every example exactly once (TFDS cuts each split of a union separately: 2+1 and 1+0)
    assert sorted(shards[0] + shards[1]) == ["case1", "case2", "case3", "case4"]
    assert [len(s) for s in shards] == [3, 1]
    # 3 examples over 2 processes: 2 + 1, or 1 + 1 with drop_remainder
    builder = Brats(config="deepmedic", data_dir=str(data))
    sizes = [
        len(list(read_split(builder, "train", process_index=i, process_count=2))) for i in range(2)
    ]
    assert sizes == [2, 1]
    dropped = [
        len(
            list(
                read_split(builder, "train", process_index=i, process_count=2, drop_remainder=True)
            )
        )
        for i in range(2)
    ]
    assert dropped == [1, 1]
    # the default reads jax.process_index() / jax.process_count() (one process here)
    assert len(list(read_split(builder, "train"))) == 3
    with pytest.raises(ValueError, match="both process_index and process_count"):
        read_split(builder, "train", process_index=0)
    with pytest.raises(ValueError, match=r"process_index 2 is not in \[0, 2\)"):
        read_split(builder, "train", process_index=2, process_count=2)
    with pytest.raises(ValueError, match="no random access"):
        read_split_source(builder, "train", process_index=0, process_count=2)


def test_brats_2021_naming_config(tmp_path: Path) -> None:
    deepmedic_dir()
    manual = tmp_path / "manual"
    write_layout(manual, "brats", {"BraTS2021_00001": "A", "BraTS2021_00002": "C"})
    write_layout(manual, "brats", {"BraTS2021_00003": "B"}, labels=False)
    builder = _prepare(Brats(config="brats", data_dir=str(tmp_path / "tfds")), manual)
    assert list(builder.info.splits) == ["train"]  # no split sub-folders: all in train
    got = _read_all(builder.as_dataset(split="train"))
    assert sorted(got) == ["BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003"]
    for cid, ex in got.items():
        d = manual / cid
        files = [d / f"{cid}_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2")]
        if cid == "BraTS2021_00003":
            label_ref = None
        else:
            seg = canonical(d / f"{cid}_seg.nii.gz")[0].astype(int)
            label_ref = np.select([seg == 1, seg == 2, seg == 4], [1, 2, 3], 0)
        _check_example(ex, files, label_ref)
        ref = np.stack([canonical(p)[0] for p in files], axis=-1)
        np.testing.assert_array_equal(ex["mask"], (ref != 0).any(axis=-1))


def test_msd_task01_config_array_record(tmp_path: Path) -> None:
    deepmedic_dir()
    manual = tmp_path / "manual"  # the parent of Task01_BrainTumour/
    task = write_layout(manual, "msd", {"BRATS_001": "A", "BRATS_002": "B", "BRATS_003": "C"})
    builder = _prepare(
        Msd(
            config="Task01_BrainTumour", data_dir=str(tmp_path / "tfds"), file_format="array_record"
        ),
        manual,
    )
    assert builder.info.features["image"].shape == (None, None, None, 4)
    parts = [
        read_split_source(builder, "train", process_index=i, process_count=2) for i in range(2)
    ]
    assert [len(p) for p in parts] == [2, 1]
    got = {ex["id"].decode(): ex for p in parts for ex in (p[i] for i in range(len(p)))}
    assert sorted(got) == ["BRATS_001", "BRATS_002", "BRATS_003"]
    for cid, ex in got.items():
        lab = canonical(task / "labelsTr" / f"{cid}.nii.gz")[0].astype(int)
        # MSD 1 edema, 2 non-enhancing, 3 enhancing -> internal 2, 1, 3
        _check_example(
            ex,
            [task / "imagesTr" / f"{cid}.nii.gz"],
            np.select([lab == 1, lab == 2, lab == 3], [2, 1, 3]),
        )
    with pytest.raises(ValueError, match="array_record.*read_split_source"):
        read_split(builder, "train", process_index=0, process_count=1)


def test_msd_generic_config_single_modality(tmp_path: Path) -> None:
    deepmedic_dir()
    manual = tmp_path / "Task04_Hippocampus"  # the task folder itself as the manual dir
    write_layout(tmp_path / "src", "generic", {"hippocampus_001": "A", "hippocampus_003": "B"})
    for cid in ("hippocampus_001", "hippocampus_003"):
        src = tmp_path / "src" / cid
        img = nib.load(str(src / "flair.nii"))
        seg = nib.load(str(src / "seg.nii.gz"))
        (manual / "imagesTr").mkdir(parents=True, exist_ok=True)
        (manual / "labelsTr").mkdir(exist_ok=True)
        nib.save(img, str(manual / "imagesTr" / f"{cid}.nii.gz"))  # 3D, one modality
        nib.save(seg, str(manual / "labelsTr" / f"{cid}.nii.gz"))
    meta = {"modality": {"0": "MRI"}, "labels": {"0": "bg", "1": "a", "2": "b", "3": "c", "4": "d"}}
    (manual / "dataset.json").write_text(json.dumps(meta))
    builder = _prepare(Msd(config="generic", data_dir=str(tmp_path / "tfds")), manual)
    got = _read_all(builder.as_dataset(split="train"))
    assert sorted(got) == ["hippocampus_001", "hippocampus_003"]
    for cid, ex in got.items():
        assert ex["image"].shape == (40, 40, 24, 1)
        lab = canonical(manual / "labelsTr" / f"{cid}.nii.gz")[0]
        _check_example(ex, [manual / "imagesTr" / f"{cid}.nii.gz"], lab)  # labels unchanged


def test_missing_manual_dir_says_where_to_put_the_data(tmp_path: Path) -> None:
    builder = Brats(config="deepmedic", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match="OTMultiClass"):
        _prepare(builder, tmp_path / "nothing_here")
    empty = tmp_path / "msd_manual"
    empty.mkdir()
    (empty / "README").write_text("not a task")
    with pytest.raises(FileNotFoundError, match="Task01_BrainTumour/dataset.json"):
        _prepare(Msd(config="Task01_BrainTumour", data_dir=str(tmp_path / "tfds2")), empty)


def _volume_config(backend: str, manual: Path, data: Path):
    from medjax.configs import unet3d_brats

    c = unet3d_brats.get_config("smoke")
    c.data.max_examples = 0
    c.data.spacing = (4.0, 4.0, 4.0)
    c.data.directory = str(manual / "train")
    c.data.val_directory = str(manual / "validation")
    c.data.backend = backend
    c.data.tfds_name = "brats/deepmedic"
    c.data.tfds_data_dir = str(data)
    return c


def test_volume_task_reads_tfds_like_files_and_each_process_its_part(
    deepmedic_build: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TFDS backend of the 3D task: the same training volumes and batches as the files
    they were prepared from; on two (faked) processes each reads a disjoint part."""
    import jax

    from medjax import parallel
    from medjax.train import loop

    manual, data = deepmedic_build
    got = {}
    for backend in ("files", "tfds"):
        d = loop.get_task(_volume_config(backend, manual, data)).load_data()
        it = d.make_train_iter(global_batch_size=2, mesh=parallel.make_mesh(1), seed=1, num_steps=2)
        got[backend] = (d.num_train, d.num_eval, [jax.tree.map(np.asarray, b) for b in it])
    assert got["files"][:2] == got["tfds"][:2] == (3, 1)
    for a, b in zip(got["files"][2], got["tfds"][2], strict=True):
        for k in ("image", "label"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6, err_msg=k)

    parts = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for p in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        task = loop.get_task(_volume_config("tfds", manual, data))
        vols, shard_ids, total = task._train_volumes()
        assert total == 3 and set(shard_ids) == {p}
        parts.append({v["id"] for v in vols})
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == {"case1", "case2", "case3"}
