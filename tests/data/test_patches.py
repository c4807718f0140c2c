"""Patch sampling (medjax.data.patches), checked against np.pad + slicing, exact probabilities,
brute-force window searches and a real BraTS label volume read with nibabel directly."""

from __future__ import annotations

import itertools
from fractions import Fraction

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from medjax import parallel
from medjax.data import patches as PT
from medjax.data import pipeline
from medjax.data.paths import data_dir

# ---------------------------------------------------------------------------------------------
# helpers: independent references
# ---------------------------------------------------------------------------------------------


def _ref_patch(a: np.ndarray, start, size, value) -> np.ndarray:
    """np.pad wide enough for any window at `start`, then plain slicing."""
    nd = len(size)
    width = [abs(int(s)) + p for s, p in zip(start, size, strict=True)]
    pad = [(g, g) for g in width] + [(0, 0)] * (a.ndim - nd)
    big = np.pad(a, pad, mode="constant", constant_values=value)
    return big[tuple(slice(s + g, s + g + p) for s, g, p in zip(start, width, size, strict=True))]


def _contains(starts: np.ndarray, size, voxel) -> np.ndarray:
    """[n] bool: does the window at each start cover `voxel`?"""
    s, p, c = starts, np.asarray(size), np.asarray(voxel)
    return np.all((s <= c) & (c < s + p), axis=1)


def _uniform_hit_probability(shape, size, voxel) -> float:
    """Exact chance that a uniform valid start covers `voxel` (valid: 0..n-p when n >= p)."""
    prob = 1.0
    for n, p, c in zip(shape, size, voxel, strict=True):
        starts = range(0, n - p + 1)
        prob *= sum(s <= c < s + p for s in starts) / len(starts)
    return prob


# ---------------------------------------------------------------------------------------------
# foreground_index / extract_patch
# ---------------------------------------------------------------------------------------------


def test_foreground_index_flat_and_empty():
    lab = np.zeros((4, 5, 6), np.int32)
    lab[1, 2, 3], lab[3, 4, 0], lab[0, 0, 1] = 2, 1, 4
    lab[2, 2, 2] = -1  # not foreground: only label > 0 counts
    idx = PT.foreground_index(lab)
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(
        idx, sorted(np.ravel_multi_index(([1, 3, 0], [2, 4, 0], [3, 0, 1]), lab.shape))
    )
    assert PT.foreground_index(np.zeros((3, 3))).size == 0


def test_extract_patch_matches_pad_and_slice():
    rng = np.random.default_rng(0)
    vol = rng.random((7, 5, 6, 2)).astype(np.float32)
    lab = rng.integers(0, 3, (7, 5, 6)).astype(np.int32)
    size = (4, 8, 3)
    for _ in range(60):
        start = rng.integers(-9, 9, size=3)
        np.testing.assert_array_equal(
            PT.extract_patch(vol, start, size, -2.5), _ref_patch(vol, start, size, -2.5)
        )
        got = PT.extract_patch(lab, start, size, 7)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, _ref_patch(lab, start, size, 7))
    # Fully outside: all padding; 2D with channels.
    assert np.all(PT.extract_patch(vol, (20, 0, 0), size, 1.0) == 1.0)
    img2 = rng.random((6, 9, 3))
    np.testing.assert_array_equal(
        PT.extract_patch(img2, (-2, 5), (5, 5)), _ref_patch(img2, (-2, 5), (5, 5), 0)
    )
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        PT.extract_patch(vol, (0, 0), size)


# ---------------------------------------------------------------------------------------------
# sample_patch_starts
# ---------------------------------------------------------------------------------------------


def test_fg_fraction_one_always_contains_the_foreground_voxel():
    shape, size = (20, 16, 12), (8, 6, 10)
    rng = np.random.default_rng(1)
    # A single voxel: interior (start = c - p // 2 exactly) and at the corners (clipped).
    for voxel in [(10, 8, 6), (0, 0, 0), (19, 15, 11), (1, 14, 3)]:
        idx = np.array([np.ravel_multi_index(voxel, shape)])
        st = PT.sample_patch_starts(rng, shape, size, fg_index=idx, fg_fraction=1.0, n=50)
        assert st.shape == (50, 3) and st.dtype == np.int64
        assert _contains(st, size, voxel).all()
        assert np.all(st >= 0) and np.all(st <= np.subtract(shape, size))
        if voxel == (10, 8, 6):
            assert np.all(st == np.subtract(voxel, np.array(size) // 2))
    # Scattered foreground: every patch covers at least one foreground voxel.
    lab = np.zeros(shape, np.int32)
    pts = rng.integers(0, shape, size=(6, 3))
    lab[tuple(pts.T)] = 1
    st = PT.sample_patch_starts(
        rng, shape, size, fg_index=PT.foreground_index(lab), fg_fraction=1.0, n=300
    )
    for s in st:
        assert PT.extract_patch(lab, s, size).any()
    # ...and all foreground voxels get used as centres (uniform over them).
    hit = np.array([_contains(st, size, p) for p in pts])
    assert hit.any(axis=1).all()


def test_fg_fraction_half_matches_exact_probability():
    shape, size, voxel = (20, 20, 20), (8, 8, 8), (10, 3, 15)
    idx = np.array([np.ravel_multi_index(voxel, shape)])
    n = 4000
    st = PT.sample_patch_starts(
        np.random.default_rng(2), shape, size, fg_index=idx, fg_fraction=0.5, n=n
    )
    q = _uniform_hit_probability(shape, size, voxel)  # 8/13 * 4/13 * 5/13 ~ 0.073
    want = 0.5 + 0.5 * q
    got = _contains(st, size, voxel).mean()
    assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / n)


def test_fg_fraction_zero_is_uniform_over_valid_starts():
    shape, size = (10, 7, 5), (4, 3, 5)
    lab = np.zeros(shape, np.int32)
    lab[0, 0, 0] = 1  # present but must not bias anything at fg_fraction=0
    n = 7000
    st = PT.sample_patch_starts(
        np.random.default_rng(3), shape, size, fg_index=PT.foreground_index(lab),
        fg_fraction=0.0, n=n,
    )  # fmt: skip
    for axis, (sz, p) in enumerate(zip(shape, size, strict=True)):
        counts = np.bincount(st[:, axis], minlength=sz - p + 1)
        assert counts.size == sz - p + 1  # nothing outside 0..n-p
        if counts.size > 1:
            assert stats.chisquare(counts).pvalue > 1e-3
    # Joint uniformity over the 7 x 5 start grid as well.
    joint = np.bincount(st[:, 0] * 5 + st[:, 1], minlength=35)
    assert stats.chisquare(joint).pvalue > 1e-3


def test_empty_foreground_falls_back_to_uniform():
    shape, size = (9, 9), (3, 3)
    for fg in (None, np.zeros(0, np.int64)):
        st = PT.sample_patch_starts(
            np.random.default_rng(4), shape, size, fg_index=fg, fg_fraction=1.0, n=2000
        )
        assert st.min() == 0 and st.max() == 6
        assert abs(st.mean() - 3.0) < 0.15


def test_volume_smaller_than_patch_gives_nonpositive_starts_covering_the_axis():
    shape, size = (3, 10), (6, 4)
    lo, hi = PT.start_range(shape, size)
    np.testing.assert_array_equal(lo, [-3, 0])
    np.testing.assert_array_equal(hi, [0, 6])
    rng = np.random.default_rng(5)
    vol = rng.random((*shape, 1))
    st = PT.sample_patch_starts(rng, shape, size, fg_fraction=0.0, n=500)
    assert set(np.unique(st[:, 0])) == {-3, -2, -1, 0}
    for s in st[:20]:
        patch = PT.extract_patch(vol, s, size)
        # The whole first axis is inside the window: its rows appear intact, in order.
        np.testing.assert_array_equal(patch[-s[0] : -s[0] + 3], vol[:, s[1] : s[1] + 4])
    # Centred on a foreground voxel of a too-small axis: clipped into [-3, 0], still covering it.
    idx = np.array([np.ravel_multi_index((2, 5), shape)])
    st = PT.sample_patch_starts(rng, shape, size, fg_index=idx, fg_fraction=1.0, n=20)
    assert np.all(st[:, 0] == -1) and np.all(st[:, 1] == 5 - 2)


def test_sample_patch_starts_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="fg_fraction"):
        PT.sample_patch_starts(rng, (5, 5), (2, 2), fg_fraction=1.5)
    with pytest.raises(ValueError, match="patch_size"):
        PT.sample_patch_starts(rng, (5, 5), (2, 2, 2))


# ---------------------------------------------------------------------------------------------
# patch_batch / patch_plan / make_patch_train_iter
# ---------------------------------------------------------------------------------------------

SIZE = (6, 6, 6)
CODE = 10_000  # image channel 0 = case * CODE + flat voxel index: every voxel is recognisable


def _volumes() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(6)
    out = []
    for case, shape in enumerate([(12, 10, 9), (7, 14, 8), (5, 5, 5)]):
        code = case * CODE + np.arange(np.prod(shape)).reshape(shape)
        image = np.stack([code, rng.random(shape)], -1).astype(np.float32)
        label = np.zeros(shape, np.int32)
        c = np.array(shape) // 3
        label[c[0] : c[0] + 2, c[1] : c[1] + 2, c[2]] = case + 1  # a tiny blob per case
        out.append({"image": image, "label": label})
    return out


def _decode(row: np.ndarray, shapes) -> tuple[int, np.ndarray]:
    """(case, start) of an image patch from its codes (padding is -1)."""
    first = np.argwhere(row[..., 0] >= 0)[0]
    case, flat = divmod(int(row[tuple(first) + (0,)]), CODE)
    coord = np.array(np.unravel_index(flat, shapes[case]))
    return case, coord - first


def test_patch_batch_rows_are_true_windows_of_the_volumes():
    vols = _volumes()
    shapes = [v["label"].shape for v in vols]
    b = PT.patch_batch(
        vols, 3, seed=11, global_batch_size=16, patch_size=SIZE, fg_fraction=0.5, image_pad=-1.0
    )
    assert b["image"].shape == (16, *SIZE, 2) and b["image"].dtype == np.float32
    assert b["label"].shape == (16, *SIZE) and b["label"].dtype == np.int32
    cases, starts = PT.patch_plan(
        3, seed=11, spatial_shapes=shapes, global_batch_size=16, patch_size=SIZE,
        fg_fraction=0.5, fg_indices=[PT.foreground_index(v["label"]) for v in vols],
    )  # fmt: skip
    for r in range(16):
        case, start = _decode(b["image"][r], shapes)
        assert case == cases[r] and np.array_equal(start, starts[r])
        np.testing.assert_array_equal(
            b["image"][r], _ref_patch(vols[case]["image"], start, SIZE, -1)
        )
        np.testing.assert_array_equal(
            b["label"][r], _ref_patch(vols[case]["label"], start, SIZE, 0)
        )


def test_patch_batch_is_a_pure_function_of_seed_and_step():
    vols = _volumes()
    fg = [PT.foreground_index(v["label"]) for v in vols]
    kw = dict(global_batch_size=8, patch_size=SIZE, fg_fraction=0.33, fg_indices=fg)
    a = PT.patch_batch(vols, 5, seed=1, **kw)
    again = PT.patch_batch(vols, 5, seed=1, **kw)
    for k in ("image", "label"):
        np.testing.assert_array_equal(a[k], again[k])
    assert not np.array_equal(a["image"], PT.patch_batch(vols, 6, seed=1, **kw)["image"])
    assert not np.array_equal(a["image"], PT.patch_batch(vols, 5, seed=2, **kw)["image"])
    # rows= is exactly a slice of the global batch.
    part = PT.patch_batch(vols, 5, seed=1, rows=slice(2, 6), **kw)
    np.testing.assert_array_equal(part["image"], a["image"][2:6])


def test_patch_batch_foreground_and_case_weights():
    vols = _volumes()
    b = PT.patch_batch(
        vols, 0, seed=3, global_batch_size=24, patch_size=SIZE, fg_fraction=1.0,
        case_weights=[0.0, 1.0, 0.0],
    )  # fmt: skip
    assert np.all(b["label"].reshape(24, -1).max(1) == 2)  # case 1 only, always on its blob
    cases, _ = PT.patch_plan(
        0, seed=3, spatial_shapes=[v["label"].shape for v in vols], global_batch_size=3000,
        patch_size=SIZE,
    )  # fmt: skip
    assert stats.chisquare(np.bincount(cases, minlength=3)).pvalue > 1e-3  # uniform cases


def test_patch_batch_errors_name_the_volume():
    vols = _volumes()
    vols[1] = {"image": vols[1]["image"], "label": vols[1]["label"][:-1]}
    with pytest.raises(ValueError, match="volume 1"):
        PT.patch_batch(vols, 0, seed=0, global_batch_size=2, patch_size=SIZE, fg_fraction=0.5)
    with pytest.raises(ValueError, match="case_weights"):
        PT.patch_batch(
            _volumes(), 0, seed=0, global_batch_size=2, patch_size=SIZE, case_weights=[1, 2]
        )


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(1)


def test_make_patch_train_iter_matches_patch_batch_and_resumes(mesh):
    vols = _volumes()
    kw = dict(patch_size=SIZE, fg_fraction=0.5, global_batch_size=4)
    for start in (0, 7):
        got = list(
            PT.make_patch_train_iter(
                vols, mesh=mesh, seed=21, start_step=start, num_steps=3, num_workers=2, **kw
            )
        )
        assert len(got) == 3
        for i, batch in enumerate(got):
            want = PT.patch_batch(vols, start + i, seed=21, **kw)
            assert set(batch) == {"image", "label"}
            for k in ("image", "label"):
                v = batch[k]
                assert isinstance(v, jax.Array) and isinstance(v.sharding, NamedSharding)
                assert v.sharding.spec == P(parallel.BATCH_AXES)
                assert v.dtype == want[k].dtype
                np.testing.assert_array_equal(np.asarray(v), want[k])
    endless = PT.make_patch_train_iter(vols, mesh=mesh, seed=21, **kw)
    assert len(list(itertools.islice(endless, 5))) == 5


# ---------------------------------------------------------------------------------------------
# densest_window / tumour_dense_crops
# ---------------------------------------------------------------------------------------------


def _brute_densest(m: np.ndarray, size) -> tuple[int, int]:
    """Every window by a double loop; ties: exact (Fraction) distance to the centroid, then
    smallest (y0, x0)."""
    h, w = m.shape
    sh, sw = size
    if m.any():
        py, px = np.nonzero(m)
        ry, rx = Fraction(int(py.sum()), len(py)), Fraction(int(px.sum()), len(px))
    else:
        ry, rx = Fraction(h - 1, 2), Fraction(w - 1, 2)
    best = None
    for y0 in range(min(0, h - sh), max(0, h - sh) + 1):
        for x0 in range(min(0, w - sw), max(0, w - sw) + 1):
            count = int(m[max(y0, 0) : y0 + sh, max(x0, 0) : x0 + sw].sum())
            d2 = (y0 + Fraction(sh - 1, 2) - ry) ** 2 + (x0 + Fraction(sw - 1, 2) - rx) ** 2
            key = (-count, d2, y0, x0)
            best = key if best is None or key < best else best
    return best[2], best[3]


def test_densest_window_matches_brute_force():
    rng = np.random.default_rng(7)
    for trial in range(60):
        h, w = rng.integers(4, 14, size=2)
        size = tuple(rng.integers(2, 16, size=2))
        density = [0.0, 0.03, 0.1, 0.4][trial % 4]
        m = rng.random((h, w)) < density
        assert PT.densest_window(m, size) == _brute_densest(m, size), (m.astype(int), size)
    # Symmetric ties: two equal blobs -> windows equidistant from the centroid -> smallest index.
    m = np.zeros((9, 20), bool)
    m[4, 2] = m[4, 17] = True
    assert PT.densest_window(m, (3, 3)) == _brute_densest(m, (3, 3))
    assert PT.densest_window(m.astype(np.int32) * 4, (3, 3)) == _brute_densest(m, (3, 3))


def test_densest_window_hand_case():
    m = np.zeros((10, 10), bool)
    m[6:9, 1:4] = True  # a 3 x 3 blob
    m[0, 9] = True  # a lone pixel elsewhere
    assert PT.densest_window(m, (3, 3)) == (6, 1)
    # Taller than the slice: y0 in -2..0 all hold the 9 blob pixels (x0 = 0 or 1); the centroid
    # is (63 / 10, 27 / 10) = (6.3, 2.7), nearest window centre (0 + 5.5, 1 + 1.5).
    assert PT.densest_window(m, (12, 4)) == (0, 1)


def test_densest_window_large_slice_and_python_int_fallback(monkeypatch):
    m = np.ones((1100, 1100), bool)
    assert PT.densest_window(m, (1000, 1000)) == (50, 50)  # every window ties; centred one wins
    # Column 0 empty: x0 = 1..100 tie on count; centroid x = 550 is equidistant from the centres
    # of x0 = 50 (549.5) and x0 = 51 (550.5) -> the smaller index.
    m[:, 0] = False
    assert PT.densest_window(m, (1000, 1000)) == (50, 50)
    # Force the python-int path (taken when scaled distances could overflow int64).
    monkeypatch.setattr(PT, "_INT64_SAFE", 0)
    rng = np.random.default_rng(10)
    for _ in range(10):
        m = rng.random((9, 11)) < 0.1
        assert PT.densest_window(m, (4, 5)) == _brute_densest(m, (4, 5))


def test_tumour_dense_crops():
    rng = np.random.default_rng(8)
    image = rng.random((20, 24, 2)).astype(np.float32)
    label = np.zeros((20, 24), np.int32)
    label[12:18, 3:9] = 2
    img, lab, (y0, x0) = PT.tumour_dense_crops(image, label, (8, 8))
    assert (y0, x0) == _brute_densest(label > 0, (8, 8))
    np.testing.assert_array_equal(img, image[y0 : y0 + 8, x0 : x0 + 8])
    np.testing.assert_array_equal(lab, label[y0 : y0 + 8, x0 : x0 + 8])
    assert lab.sum() == 2 * 36
    # Slice smaller than the window: padded.
    img, lab, (y0, x0) = PT.tumour_dense_crops(image[:5], label[:5], (8, 8))
    assert img.shape == (8, 8, 2) and y0 <= 0
    np.testing.assert_array_equal(img, _ref_patch(image[:5], (y0, x0), (8, 8), 0))
    with pytest.raises(ValueError, match="label"):
        PT.tumour_dense_crops(image, label[:, :5], (8, 8))


# ---------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------


def test_fg_centred_patches_contain_tumour_on_brats_label():
    nib = pytest.importorskip("nibabel")
    try:
        root = data_dir("brats2015_deepmedic_3d")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    path = root / "train" / "brats_2013_pat0005_1" / "OTMultiClass.nii.gz"
    label = np.asarray(nib.load(path).dataobj).astype(np.int32)
    assert label.shape == (240, 240, 155)
    fg = PT.foreground_index(label)
    assert fg.size == int((label > 0).sum()) == 23030 + 35416 + 3882 + 18354  # README counts
    rng = np.random.default_rng(9)
    size = (64, 64, 64)
    st = PT.sample_patch_starts(rng, label.shape, size, fg_index=fg, fg_fraction=1.0, n=24)
    for s in st:
        patch = PT.extract_patch(label, s, size)
        assert np.all(s >= 0) and np.all(s + 64 <= label.shape)  # no padding needed here
        assert (patch > 0).any()
    # Uniform patches mostly miss the small tumour: oversampling is what makes them useful.
    uni = PT.sample_patch_starts(rng, label.shape, size, fg_index=fg, fg_fraction=0.0, n=24)
    hits = np.mean([(PT.extract_patch(label, s, size) > 0).any() for s in uni])
    assert hits < 1.0


def test_patch_shards_compose_the_global_batch_from_each_shard():
    """With 2 data shards, rows [0, B/2) are `patch_batch` of the even cases with shard 0's
    seed and [B/2, B) of the odd ones; passing only a shard's cases with their ids is the same."""
    rng = np.random.default_rng(0)
    vols = [
        {"image": rng.standard_normal((12, 10, 1)).astype(np.float32),
         "label": (rng.random((12, 10)) > 0.7).astype(np.int32)}
        for _ in range(4)
    ]  # fmt: skip
    mesh = parallel.make_mesh(1)
    kw = dict(patch_size=(6, 6), fg_fraction=0.5, global_batch_size=4)
    it = PT.make_patch_train_iter(vols, mesh=mesh, seed=3, num_shards=2, num_steps=2, **kw)
    for step, batch in enumerate(it):
        for k in (0, 1):
            want = PT.patch_batch(
                vols[k::2],
                step,
                seed=pipeline.shard_seed(3, k, 2),
                **{**kw, "global_batch_size": 2},
            )
            np.testing.assert_array_equal(
                np.asarray(batch["image"])[2 * k : 2 * k + 2], want["image"]
            )
            np.testing.assert_array_equal(
                np.asarray(batch["label"])[2 * k : 2 * k + 2], want["label"]
            )
