"""Per-process data on many hosts, for the 2D and GAN tasks: a process reads the training files of
its own data shards only (listed first, read after the validation split and the shards are cut),
and the rows it feeds compose the very batches of a one-process run with the same shards.

Two processes are faked here (`jax.process_count` / `process_index`; `global_batch` then returns
the host rows); `tests/train/test_multihost.py` runs two real ones."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from medjax import parallel
from medjax.configs import (
    classifier_folder,
    cyclegan_folder,
    dcgan_folder,
    pix2pix_folder,
    segmentation_folder,
)
from medjax.data import convert, image_sets, sources
from medjax.data.listing import Listing
from medjax.data.paths import data_dir
from medjax.train import loop, task
from tests.helpers import tcia_pair_splits


def _dir(name: str) -> Path:
    try:
        return data_dir(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """Every 2D image file read (the one reader behind the folder layouts)."""
    seen: list[Path] = []
    real = sources.read_image_2d

    def spy(path, *a, **kw):
        seen.append(Path(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(sources, "read_image_2d", spy)
    return seen


def _as_process(monkeypatch, processes: int, index: int) -> None:
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(parallel, "global_batch", lambda local, mesh: local)
    monkeypatch.setattr(parallel, "process_sum", lambda x: np.asarray(x))


def _load(cfg, monkeypatch, reads, processes: int, index: int):
    """(host rows of the first 3 batches, the training files read) as process `index`."""
    _as_process(monkeypatch, processes, index)
    reads.clear()
    data = loop.get_task(cfg).load_data()
    read = {p for p in reads if _is_train(p)}
    it = data.make_train_iter(
        global_batch_size=int(cfg.batch_size),
        mesh=parallel.make_mesh(1),
        seed=7,
        start_step=0,
        num_steps=3,
        num_shards=int(cfg.data.shards),
    )
    return [{k: np.asarray(v) for k, v in b.items()} for b in it], read, data.num_train


def _is_train(path: Path) -> bool:
    return any(part in ("train", "trainA", "trainB") for part in path.parts)


def _isbi_folder(dst: Path) -> Path:
    isbi = _dir("isbi2012_em_membrane")
    for split, ids in (("train", range(12)), ("val", range(12, 16))):
        for sub in ("imagesTr", "labelsTr"):
            (dst / split / sub).mkdir(parents=True)
        for i in ids:
            (dst / split / "imagesTr" / f"em_{i:03d}_0000.png").symlink_to(
                isbi / f"train/image/{i}.png"
            )
            (dst / split / "labelsTr" / f"em_{i:03d}.png").symlink_to(isbi / f"train/label/{i}.png")
    return dst


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    breast = _dir("medmnist_breastmnist")
    splits = {s: image_sets.load_medmnist(breast, s) for s in ("train", "val")}
    splits = {s: {k: v[:40] for k, v in d.items()} for s, d in splits.items()}
    convert.to_image_folders(splits, root / "plain")
    convert.to_image_folders(splits, root / "classes", by_class=True, class_names=("m", "b"))
    tcia = tcia_pair_splits()
    convert.to_pair_folders(tcia, root / "pairs", "pairs")
    convert.to_pair_folders(
        {"train": tcia["train"], "test": tcia["val"]}, root / "unpaired", "unpaired"
    )
    _isbi_folder(root / "isbi")
    return root


def _config(name: str, root: Path):
    if name == "segmentation":
        cfg = segmentation_folder.get_config("isbi,smoke")
        cfg.data.directory = str(root / "isbi")
        cfg.data.val_ids = ()
    elif name == "classifier":
        cfg = classifier_folder.get_config("smoke")
        cfg.data.directory, cfg.data.class_names = str(root / "classes"), ("m", "b")
    elif name == "dcgan":
        cfg = dcgan_folder.get_config("smoke")
        cfg.data.directory = str(root / "plain")
    elif name == "pix2pix":
        cfg = pix2pix_folder.get_config("pairs,smoke")
        cfg.data.directory = str(root / "pairs")
    else:
        cfg = cyclegan_folder.get_config("smoke")
        cfg.data.directory = str(root / "unpaired")
    cfg.data.max_examples = 0
    cfg.batch_size = 4
    cfg.data.shards = 2
    return cfg


@pytest.mark.parametrize("name", ["segmentation", "classifier", "dcgan", "pix2pix", "cyclegan"])
def test_each_process_reads_only_its_shards_and_feeds_the_one_process_rows(
    name, layouts, monkeypatch, reads
):
    cfg = _config(name, layouts)
    one, every, n = _load(cfg, monkeypatch, reads, processes=1, index=0)
    hosts = [_load(cfg, monkeypatch, reads, processes=2, index=p) for p in (0, 1)]
    listed = {p for p in Path(cfg.data.directory).rglob("*") if p.is_file()}
    assert every == {p for p in listed if _is_train(p) and "labelsTr" not in p.parts}
    # the training files split between the two processes: none read twice, none left out
    assert hosts[0][1].isdisjoint(hosts[1][1]) and hosts[0][1] | hosts[1][1] == every
    assert all(abs(len(h[1]) - len(every) / 2) <= 1 + (name == "cyclegan") for h in hosts)
    assert hosts[0][2] == hosts[1][2] == n  # the number of training examples, not the shard's
    # rows [0, B/2) of every global batch come from process 0, [B/2, B) from process 1
    for step, batch in enumerate(one):
        for k, v in batch.items():
            half = len(v) // 2
            np.testing.assert_array_equal(hosts[0][0][step][k], v[:half], err_msg=k)
            np.testing.assert_array_equal(hosts[1][0][step][k], v[half:], err_msg=k)


def test_listing_reads_only_what_is_taken():
    read: list[int] = []

    def read_one(i: int) -> int:
        read.append(i)
        return 10 * i

    listing = Listing.of_files(
        [f"c{i}" for i in range(6)], range(6), read_one, meta={"y": range(6)}
    )
    part = listing.take([4, 1, 5]).head(2)
    assert part.ids == ("c4", "c1") and part.meta["y"].tolist() == [4, 1] and read == []
    assert part.read() == [40, 10] and read == [4, 1]
    assert part.map(sum).read() == 50 and part.map(sum).ids == ("c4", "c1")
    with pytest.raises(IndexError, match="positions outside 0..5"):
        listing.take([6])
    with pytest.raises(ValueError, match="no examples to read"):
        listing.take([]).read()


def test_too_few_examples_for_the_shards_is_an_error(monkeypatch):
    cfg = _config("classifier", Path("."))
    cfg.data.shards = 4
    listing = Listing.of_arrays({"x": np.arange(3)})
    with pytest.raises(ValueError, match="3 training examples cannot fill 4 data shards"):
        task.owned_examples(listing, cfg)
