"""Long Range Arena data: generators against the specification, loaders on tiny files in the official formats."""

from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polyattn.data import DatasetFormatError, DatasetNotFoundError, build_dataset
from polyattn.data.lra.image import grayscale_tokens
from polyattn.data.lra.listops import (
    LISTOPS_VOCAB,
    OPERATORS,
    evaluate_listops,
    generate_listops,
    listops_length,
    read_listops_tsv,
    tokenize_listops,
    write_listops,
)
from polyattn.data.lra.pathfinder import (
    PathfinderSpec,
    make_pathfinder_image,
    make_pathfinder_sample,
    read_pathfinder,
    write_pathfinder,
)
from polyattn.data.lra.retrieval import read_aan_tsv


# --- ListOps ---------------------------------------------------------------------------------------
def _parse(source: str):
    """The tree of an expression, read with the official string form checked token by token.

    Returns (op, [children]) or an int; raises AssertionError on any deviation from
    "( " * (k + 1) + op + (" " + child + " )") * k + " ] )".
    """
    toks = source.split()
    pos = 0

    def node():
        nonlocal pos
        if toks[pos].isdigit():
            pos += 1
            return int(toks[pos - 1])
        opens = 0
        while toks[pos] == "(":
            opens += 1
            pos += 1
        op = toks[pos]
        assert op in OPERATORS, op
        pos += 1
        children = []
        for _ in range(opens - 1):
            children.append(node())
            assert toks[pos] == ")", toks[pos - 3 : pos + 3]
            pos += 1
        assert toks[pos : pos + 2] == ["]", ")"]
        pos += 2
        return (op, children)

    tree = node()
    assert pos == len(toks)
    return tree


def _serialize(tree) -> str:
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    text = "( " * (len(children) + 1) + op
    for c in children:
        text += " " + _serialize(c) + " )"
    return text + " ] )"


def _value(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    vals = [_value(c) for c in children]
    return {
        "[MIN": min(vals),
        "[MAX": max(vals),
        "[MED": int(np.median(vals)),
        "[SM": int(np.sum(vals)) % 10,
    }[op]


def _stats(tree, depth=1):
    """(max depth of an operator node, [argument counts])."""
    if isinstance(tree, int):
        return 0, []
    deepest, counts = depth, [len(tree[1])]
    for c in tree[1]:
        d, k = _stats(c, depth + 1)
        deepest, counts = max(deepest, d), counts + k
    return deepest, counts


def test_official_string_form_example():
    assert evaluate_listops("( ( ( [MAX 2 ) 3 ) ] )") == 3
    assert _serialize(("[MAX", [2, 3])) == "( ( ( [MAX 2 ) 3 ) ] )"
    assert listops_length("( ( ( [MAX 2 ) 3 ) ] )") == 4  # op, "]", two digits
    assert evaluate_listops("( ( ( ( [MED 1 ) 2 ) 8 ) ] )") == 2
    assert evaluate_listops("( ( ( ( ( [MED 1 ) 2 ) 5 ) 8 ) ] )") == 3  # int(median) truncates 3.5


@pytest.mark.parametrize(
    "kwargs",
    [{"min_length": 500, "max_length": 2000}, {"min_length": 20, "max_length": 60, "max_depth": 4, "max_args": 5}],
)
def test_listops_generator_invariants(kwargs):
    n = 12 if kwargs["min_length"] == 500 else 60
    items = list(generate_listops(n, seed=3, **kwargs))
    assert len(items) == n and len({s for s, _ in items}) == n  # unique
    max_depth, max_args = kwargs.get("max_depth", 10), kwargs.get("max_args", 10)
    for source, target in items:
        tree = _parse(source)  # the official form, exactly
        assert _serialize(tree) == source
        assert kwargs["min_length"] < listops_length(source) < kwargs["max_length"]
        deepest, counts = _stats(tree)
        assert deepest <= max_depth - 1  # operators only above max_depth
        assert all(2 <= k <= max_args for k in counts)
        assert 0 <= target <= 9
        assert evaluate_listops(source) == target == _value(tree)


def test_listops_generator_deterministic_by_seed():
    a = list(generate_listops(5, seed=1, min_length=20, max_length=80))
    b = list(generate_listops(5, seed=1, min_length=20, max_length=80))
    c = list(generate_listops(5, seed=2, min_length=20, max_length=80))
    assert a == b and a != c


def test_listops_operators_all_appear():
    items = list(generate_listops(40, seed=0, min_length=20, max_length=80))
    text = " ".join(s for s, _ in items)
    assert all(op in text for op in OPERATORS)
    assert "[FIRST" not in text and "[LAST" not in text


def test_listops_tsv_round_trip(tmp_path):
    paths = write_listops(tmp_path, 6, 2, 3, seed=0, min_length=20, max_length=80, progress=False)
    assert sorted(p.name for p in paths.values()) == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv"]
    raw = (tmp_path / "basic_train.tsv").read_bytes()
    assert raw.startswith(b"Source\tTarget\r\n")  # csv's line ends, as in the release
    with open(tmp_path / "basic_train.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    assert len(rows) == 6
    expected = list(generate_listops(11, seed=0, min_length=20, max_length=80))
    assert [(s, int(t)) for s, t in rows] == expected[:6]
    store, labels = read_listops_tsv(tmp_path / "basic_train.tsv", tokens="brackets")
    for i, (s, t) in enumerate(expected[:6]):
        assert labels[i] == t
        assert len(store[i]) == listops_length(s)
        assert list(store[i]) == list(tokenize_listops(s, "brackets"))
    # the splits are disjoint
    all_rows = set()
    for p in paths.values():
        with open(p, newline="") as f:
            all_rows |= {r[0] for r in list(csv.reader(f, delimiter="\t"))[1:]}
    assert len(all_rows) == 11


def test_listops_tokens():
    s = "( ( ( [MAX 2 ) ( ( ( [SM 4 ) 9 ) ] ) ) ] )"
    lra = tokenize_listops(s, "lra")
    br = tokenize_listops(s, "brackets")
    v = LISTOPS_VOCAB
    assert list(lra) == [v["[MAX"], v["2"], v["[SM"], v["4"], v["9"]]
    assert list(br) == [v["[MAX"], v["2"], v["[SM"], v["4"], v["9"], v["]"], v["]"]]
    with pytest.raises(ValueError, match="single digits"):
        tokenize_listops("( ( ( [MAX 12 ) 3 ) ] )")
    with pytest.raises(ValueError, match="unexpected"):
        tokenize_listops("( ( ( [MAX 1 ) x ) ] )")


def _write_tsv(path: Path, rows, header=("Source", "Target")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        if header:
            w.writerow(header)
        w.writerows(rows)


def test_listops_loader_official_files(tmp_path):
    rows = [("( ( ( [MIN 4 ) 7 ) ] )", 4), ("( ( ( ( [SM 5 ) 6 ) 7 ) ] )", 8), ("( ( ( [MED 1 ) 3 ) ] )", 2)]
    for split in ("train", "val", "test"):
        _write_tsv(tmp_path / f"basic_{split}.tsv", rows)
    bundle = build_dataset({"name": "lra_listops", "root": str(tmp_path), "max_len": 4}, seed=0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (3, 3, 3)
    x, y = bundle.train[1]
    v = LISTOPS_VOCAB
    assert x["tokens"].tolist() == [v["[SM"], v["5"], v["6"], v["7"]] and int(y) == 8
    x, _ = bundle.train[0]
    assert x["tokens"].tolist() == [v["[MIN"], v["4"], v["7"], 0]
    assert x["padding_mask"].tolist() == [False, False, False, True]
    assert bundle.model_overrides["vocab_size"] == len(LISTOPS_VOCAB) + 1
    assert bundle.model_overrides["max_len"] == 4 and bundle.num_classes == 10


def test_listops_malformed_file(tmp_path):
    _write_tsv(tmp_path / "basic_train.tsv", [("( ( ( [MIN 4 ) 7 ) ] )", 4)], header=("Text", "Label"))
    with pytest.raises(DatasetFormatError, match="Source<TAB>Target"):
        read_listops_tsv(tmp_path / "basic_train.tsv")
    _write_tsv(tmp_path / "basic_train.tsv", [("( ( ( [MIN 4 ) 7 ) ] )", 12)])
    with pytest.raises(DatasetFormatError, match="line 2"):
        read_listops_tsv(tmp_path / "basic_train.tsv")


def test_missing_listops_names_path_layout_and_command(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset({"name": "lra_listops", "root": str(tmp_path / "nope")}, seed=0)
    msg = str(e.value)
    assert str(tmp_path / "nope") in msg and "basic_train.tsv" in msg and "polyattn data listops" in msg
    (tmp_path / "partial").mkdir()
    _write_tsv(tmp_path / "partial" / "basic_train.tsv", [])
    with pytest.raises(DatasetNotFoundError, match="basic_val.tsv"):
        build_dataset({"name": "lra_listops", "root": str(tmp_path / "partial")}, seed=0)


# --- Pathfinder -----------------------------------------------------------------------------------
def _segment_gap(p, q) -> float:
    """Smallest distance between two segments (sampled finely)."""
    t = np.linspace(0, 1, 21)[:, None]
    a = np.asarray(p[0]) + t * (np.asarray(p[1]) - np.asarray(p[0]))
    b = np.asarray(q[0]) + t * (np.asarray(q[1]) - np.asarray(q[0]))
    return float(np.min(np.linalg.norm(a[:, None] - b[None], axis=-1)))


@pytest.mark.parametrize("label", [0, 1])
def test_pathfinder_sample_geometry(label):
    spec = PathfinderSpec()  # LRA's 32x32, contour length 14
    sample = make_pathfinder_sample(np.random.default_rng([5, label]), spec, label)
    assert sample.image.shape == (32, 32) and sample.image.dtype == np.uint8
    a, b = sample.targets
    assert len(a) == len(b) == 14
    tips = {0: (a[0][0], a[-1][1]), 1: (b[0][0], b[-1][1])}
    m0, m1 = (tuple(np.round(m, 6)) for m in sample.marks)
    owner0 = [k for k, (start, _) in tips.items() if tuple(np.round(start, 6)) == m0]
    owner1 = [k for k, (_, end) in tips.items() if tuple(np.round(end, 6)) == m1]
    assert len(owner0) == len(owner1) == 1
    assert (owner0[0] == owner1[0]) == (label == 1)  # connected = the two marks end the same contour
    # the origin ends of the two contours start seed_distance apart
    assert math.dist(a[0][0], b[0][0]) == pytest.approx(spec.seed_distance)
    # consecutive paddles of a contour: length paddle_length, separated by the margin
    for contour in sample.targets + sample.distractors:
        for p, q in zip(contour, contour[1:], strict=False):
            assert math.dist(*p) == pytest.approx(spec.paddle_length)
            assert math.dist(p[1], q[0]) == pytest.approx(spec.margin)
    # different contours never touch
    contours = sample.targets + sample.distractors
    for i in range(len(contours)):
        for j in range(i + 1, len(contours)):
            gap = min(_segment_gap(p, q) for p in contours[i] for q in contours[j])
            assert gap > spec.paddle_thickness
    # the markers are drawn: bright pixels at both marks
    for m in sample.marks:
        assert sample.image[int(m[0]), int(m[1])] > 150


def test_pathfinder_deterministic_and_labels_differ():
    spec = PathfinderSpec(size=16, contour_length=5, num_distractors=2, seed_distance=4)
    a = make_pathfinder_image(np.random.default_rng(1), spec, 1)
    b = make_pathfinder_image(np.random.default_rng(1), spec, 1)
    c = make_pathfinder_image(np.random.default_rng(2), spec, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="label"):
        make_pathfinder_sample(np.random.default_rng(0), spec, 2)


def test_pathfinder_write_and_read_release_layout(tmp_path):
    spec = PathfinderSpec(size=16, contour_length=6, num_distractors=2, seed_distance=4)
    level = write_pathfinder(tmp_path, 12, spec, seed=4, workers=1, progress=False)
    assert level == tmp_path / "curv_baseline"
    rows = (level / "metadata" / "0.npy").read_text().splitlines()
    assert len(rows) == 12
    fields = rows[3].split()
    assert fields[:3] == ["imgs/0", "sample_3.png", "3"] and fields[3] in ("0", "1")
    with Image.open(level / "imgs" / "0" / "sample_3.png") as im:
        assert im.mode == "L" and im.size == (16, 16)
    images, labels, info = read_pathfinder(tmp_path, "easy", progress=False)
    assert images.shape == (12, 16, 16) and labels.tolist() == [int(r.split()[3]) for r in rows]
    rng = np.random.default_rng([4, 0, 3])  # image 3 of folder 0, seed 4
    assert np.array_equal(images[3], make_pathfinder_image(rng, spec, int(rng.integers(2))))
    bundle = build_dataset({"name": "lra_pathfinder", "root": str(tmp_path), "difficulty": "easy"}, seed=0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (9, 1, 2)
    x, y = bundle.train[0]
    assert x["tokens"].shape == (256,) and "padding_mask" not in x
    assert bundle.model_overrides == {"vocab_size": 256, "max_len": 256, "num_classes": 2, "pair": False}


def test_pathfinder_loader_release_quirks(tmp_path):
    """Binary .npy metadata (the original generator's form), an empty image file skipped."""
    level = tmp_path / "curv_contour_length_14"
    (level / "imgs" / "0").mkdir(parents=True)
    (level / "metadata").mkdir()
    rows = []
    for i in range(3):
        img = np.full((32, 32), 10 * i, dtype=np.uint8)
        Image.fromarray(img, mode="L").save(level / "imgs" / "0" / f"sample_{i}.png")
        rows.append(["imgs/0", f"sample_{i}.png", str(i), str(i % 2), "1.0", "14", "4", "2", "0.5", "1", "1"])
    (level / "imgs" / "0" / "sample_3.png").write_bytes(b"")
    rows.append(["imgs/0", "sample_3.png", "3", "1", "1.0", "14", "4", "2", "0.5", "1", "1"])
    np.save(level / "metadata" / "0.npy", np.array(rows))
    images, labels, info = read_pathfinder(tmp_path, "hard", progress=False)
    assert images.shape == (3, 32, 32) and labels.tolist() == [0, 1, 0] and info["empty_skipped"] == 1
    assert images[2, 0, 0] == 20
    (level / "metadata" / "1.npy").write_text("imgs/0 sample_0.png 0 7\n")
    with pytest.raises(DatasetFormatError, match="label 0|1"):
        read_pathfinder(tmp_path, "hard", progress=False)


def test_missing_pathfinder(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset({"name": "lra_pathfinder", "root": str(tmp_path)}, seed=0)
    msg = str(e.value)
    assert "curv_contour_length_14" in msg and "metadata" in msg and "polyattn data pathfinder" in msg


# --- Text (aclImdb) ----------------------------------------------------------------------------------
def _imdb(root: Path) -> None:
    reviews = {
        ("train", "pos"): ["Great film!", "Loved it, truly."],
        ("train", "neg"): ["Awful.", "Bad <br />acting \u00e9"],
        ("test", "pos"): ["Superb"],
        ("test", "neg"): ["Dull", "Boring plot"],
    }
    for (split, label), texts in reviews.items():
        d = root / "aclImdb" / split / label
        d.mkdir(parents=True)
        for i, t in enumerate(texts):
            (d / f"{i}_{8 if label == 'pos' else 2}.txt").write_bytes(t.encode("utf-8"))
    (root / "aclImdb" / "train" / "unsup").mkdir()  # present in the release, ignored


def test_imdb_loader(tmp_path):
    _imdb(tmp_path)
    bundle = build_dataset({"name": "lra_text", "root": str(tmp_path), "max_len": 8}, seed=0)
    assert len(bundle.train) == 4 and len(bundle.val) == 3 and bundle.test is None  # LRA: val = test
    assert bundle.info["val_is_test"] and bundle.model_overrides["vocab_size"] == 257
    x, y = bundle.train[1]  # neg, id 1: UTF-8 bytes + 1, truncated to 8
    raw = "Bad <br />acting \u00e9".encode()[:8]
    assert int(y) == 0 and x["tokens"].tolist() == [b + 1 for b in raw]
    x, y = bundle.train[3]  # pos, id 1
    assert int(y) == 1 and x["padding_mask"].sum() == 0
    x, _ = bundle.val[2]  # "Superb": 6 bytes then padding
    assert x["padding_mask"].tolist() == [False] * 6 + [True] * 2
    held = build_dataset({"name": "lra_text", "root": str(tmp_path), "val_fraction": 0.5}, seed=0)
    assert len(held.train) == 2 and len(held.val) == 2 and len(held.test) == 3


def test_missing_imdb(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset({"name": "lra_text", "root": str(tmp_path / "imdb")}, seed=0)
    assert str(tmp_path / "imdb") in str(e.value) and "train/pos/<id>_<rating>.txt" in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="data.root is not set"):
        build_dataset({"name": "lra_text"}, seed=0)


# --- Retrieval (AAN) -------------------------------------------------------------------------------
def _aan(root: Path, n: int = 3) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval", "test"):
        lines = [f"{i % 2}\tid{i}a\tid{i}b\tpaper text {i} {'x' * i}\tother paper {i}" for i in range(n)]
        (root / f"new_aan_pairs.{split}.tsv").write_text("\n".join(lines) + "\n")


def test_aan_loader(tmp_path):
    _aan(tmp_path / "tsv_data")
    bundle = build_dataset({"name": "lra_retrieval", "root": str(tmp_path / "tsv_data"), "max_len": 16}, seed=0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (3, 3, 3)
    x, y = bundle.train[2]
    assert set(x) == {"tokens1", "padding_mask1", "tokens2", "padding_mask2"} and int(y) == 0
    assert x["tokens1"].tolist() == [b + 1 for b in b"paper text 2 xx"] + [0]
    assert x["tokens2"][:13].tolist() == [b + 1 for b in b"other paper 2"] and x["padding_mask2"][13:].all()
    assert bundle.model_overrides["pair"] is True
    a, b, labels = read_aan_tsv(tmp_path / "tsv_data" / "new_aan_pairs.test.tsv", max_len=5, progress=False)
    assert len(a[0]) == 5 and labels.tolist() == [0, 1, 0]


def test_aan_malformed_and_missing(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\tid1\tid2\tonly four fields\n")
    with pytest.raises(DatasetFormatError, match="line 1: 4 tab-separated fields"):
        read_aan_tsv(bad, progress=False)
    bad.write_text("3\tid1\tid2\ta\tb\n")
    with pytest.raises(DatasetFormatError, match="not 0 or 1"):
        read_aan_tsv(bad, progress=False)
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset({"name": "lra_retrieval", "root": str(tmp_path)}, seed=0)
    assert "new_aan_pairs.train.tsv" in str(e.value) and str(tmp_path) in str(e.value)


# --- Image (CIFAR-10) ----------------------------------------------------------------------------
def _cifar(root: Path) -> np.ndarray:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        first = data if first is None else first
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [0, 1, 2, 3]}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return first


def test_cifar_gray_loader(tmp_path):
    first = _cifar(tmp_path)
    bundle = build_dataset({"name": "lra_image", "root": str(tmp_path)}, seed=0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (18, 2, 4)  # 90% / 10% of 20, test 4
    x, y = bundle.train[0]
    assert x["tokens"].shape == (1024,) and x["tokens"].dtype == torch.long and int(y) == 0
    rgb = first[0].reshape(3, 32, 32).astype(np.float64) / 255
    gray = np.floor((0.2989 * rgb[0] + 0.5870 * rgb[1] + 0.1140 * rgb[2]) * 255.5).clip(0, 255)
    assert np.abs(x["tokens"].numpy() - gray.reshape(-1)).max() <= 1  # float32 vs float64 rounding at most 1
    assert grayscale_tokens(np.full((1, 3, 2, 2), 255, dtype=np.uint8)).tolist() == [[255] * 4]
    assert bundle.model_overrides == {"vocab_size": 256, "max_len": 1024, "num_classes": 10, "pair": False}


def test_missing_cifar(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset({"name": "lra_image", "root": str(tmp_path / "cifar")}, seed=0)
    assert str(tmp_path / "cifar") in str(e.value) and "data_batch_1" in str(e.value)
