"""The Pathfinder generator against the original (drewlinsley/pathfinder) and LRA's per-resolution settings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyattn.data.lra.pathfinder import (
    PathfinderSpec,
    _render,
    load_pathfinder,
    make_pathfinder_sample,
    read_pathfinder,
    write_pathfinder,
)

# Written out from the sources rather than read from LRA_SETTINGS, so that a typo there fails here:
# google-research/long-range-arena lra_benchmarks/data/pathfinder.py (Pathfinder32/64/128/256 docstrings) over
# drewlinsley/pathfinder snakes2_wrapper.py's defaults. margin = 2 x the original's paddle margin.
EXPECTED = {
    32: dict(
        paddle_length=2,
        paddle_thickness=0.5,
        margin=2,
        marker_radius=1.5,
        seed_distance=7,
        continuity=1.0,
        padding=1,
        contrast=1.5,
        distractor_contrast=2.0,
        num_distractors=5,
    ),  # fmt: skip
    64: dict(
        paddle_length=5,
        paddle_thickness=1.0,
        margin=2,
        marker_radius=2.5,
        seed_distance=12,
        continuity=1.8,
        padding=1,
        contrast=0.8,
        distractor_contrast=0.8,
        num_distractors=5,
    ),  # fmt: skip
    128: dict(
        paddle_length=5,
        paddle_thickness=1.5,
        margin=4,
        marker_radius=3.0,
        seed_distance=20,
        continuity=1.8,
        padding=1,
        contrast=0.9,
        distractor_contrast=0.9,
        num_distractors=8,
    ),  # fmt: skip
    256: dict(
        paddle_length=5,
        paddle_thickness=2.0,
        margin=6,
        marker_radius=5.0,
        seed_distance=27,
        continuity=1.8,
        padding=22,
        contrast=1.0,
        distractor_contrast=1.0,
        num_distractors=7,
    ),  # fmt: skip
}


@pytest.mark.parametrize("size", sorted(EXPECTED))
def test_lra_settings_per_size(size):
    spec = PathfinderSpec(size=size).resolved()  # hard: contour length 14, distractors of 14 // 3 = 4 paddles
    assert spec.distractor_length == 4
    for name, value in EXPECTED[size].items():
        assert getattr(spec, name) == pytest.approx(value), name
    assert spec.margin_choices == ((4.0, 6.0) if size == 128 else ())
    assert spec.paddle_margin == EXPECTED[size]["margin"] / 2


def test_other_sizes_scale_the_nearest_setting():
    small = PathfinderSpec(size=16)  # pathfinder32 halved, strokes and circles kept visible
    assert (small.paddle_length, small.margin, small.seed_distance) == (1.0, 1.0, 3.5)
    assert (small.paddle_thickness, small.marker_radius, small.padding) == (0.5, 1.0, 1)
    big = PathfinderSpec(size=512)  # pathfinder256 doubled
    assert (big.paddle_length, big.paddle_thickness, big.margin, big.seed_distance) == (10.0, 4.0, 12.0, 54.0)
    assert (big.marker_radius, big.padding, big.continuity) == (10.0, 44, 1.8)
    # an explicit gap replaces pathfinder128's per-image choice; explicit settings stay
    assert PathfinderSpec(size=128, margin=3.0).margin_choices == ()
    assert PathfinderSpec(size=64, paddle_thickness=2.0, seed_distance=9).paddle_thickness == 2.0


def _check_first_seed(sample, spec):
    lo, hi = spec.seed_box()
    start, end = sample.targets[0][0]
    for p in (start, end):
        assert lo <= p[0] <= hi and lo <= p[1] <= hi
    # the other target starts seed_distance from it
    assert math.dist(start, sample.targets[1][0][0]) == pytest.approx(spec.seed_distance)


def test_first_contour_seeded_in_the_central_box():
    spec = PathfinderSpec()
    assert spec.seed_box() == (14.0, 18.0)  # a border of 2 x seed distance 7 kept free
    origins = set()
    for i in range(60):
        sample = make_pathfinder_sample(np.random.default_rng([11, i]), spec, i % 2)
        _check_first_seed(sample, spec)
        origins.add(tuple(sample.marks[0]) == tuple(sample.targets[0][0][0]))
    assert origins == {True, False}  # the origin circle still sits on either target contour
    # where 2 x seed distance leaves too little room, two paddle lengths around the centre
    tight = PathfinderSpec(size=16, contour_length=5, num_distractors=2, seed_distance=4)
    assert tight.seed_box() == (7.0, 9.0)
    for i in range(10):
        _check_first_seed(make_pathfinder_sample(np.random.default_rng([12, i]), tight, i % 2), tight)


@pytest.mark.parametrize("size", sorted(EXPECTED))
def test_paddle_thickness_drawn(size):
    """A lone paddle carries paddle_length x paddle_thickness of ink at any angle and position."""
    spec = PathfinderSpec(size=size)
    L, t = spec.paddle_length, spec.paddle_thickness
    rng = np.random.default_rng(size)
    ink = []
    for _ in range(40):
        angle = float(rng.uniform(0, 2 * math.pi))
        a = (size / 2 + float(rng.uniform(0, 1)), size / 2 + float(rng.uniform(0, 1)))
        b = (a[0] + L * math.sin(angle), a[1] + L * math.cos(angle))
        ink.append(_render([([(a, b)], 1.0)], [], spec).astype(float).sum() / 255)
    # point supersampling: each placement off by a few percent, none on average
    assert np.mean(ink) == pytest.approx(L * t, rel=0.03)
    assert np.allclose(ink, L * t, rtol=0.2)
    # across a horizontal paddle through pixel centres: the stroke is t wide at the given intensity
    y = size // 2 + 0.5
    image = _render([([((y, 4.0), (y, 4.0 + L))], spec.contrast)], [], spec).astype(float) / 255
    column = image[:, 4 + int(L) // 2]
    assert column.sum() / spec.contrast == pytest.approx(t, abs=0.02)
    assert np.count_nonzero(column) == (1 if t <= 1 else 3)


@pytest.mark.parametrize("size", [64, 128])
def test_generated_images_use_the_size_settings(size):
    spec = PathfinderSpec(size=size)
    r = spec.resolved()
    for i in range(2):
        sample = make_pathfinder_sample(np.random.default_rng([size, i]), spec, i)
        assert sample.image.shape == (size, size)
        _check_first_seed(sample, spec)
        assert [len(c) for c in sample.targets] == [14, 14] and len(sample.distractors) <= r.num_distractors
        assert sample.margin in ((4.0, 6.0) if size == 128 else (2.0,))
        for contour in sample.targets + sample.distractors:
            for p, q in zip(contour, contour[1:], strict=False):
                assert math.dist(*p) == pytest.approx(spec.paddle_length)
                assert math.dist(p[1], q[0]) == pytest.approx(sample.margin)
        # the strokes' ink: every paddle length x thickness at its contour's intensity (no clipping below 1)
        strokes = [(sum(sample.targets, []), r.contrast), (sum(sample.distractors, []), r.distractor_contrast)]
        ink = _render(strokes, [], spec).astype(float).sum() / 255
        expected = sum(len(ps) * spec.paddle_length * spec.paddle_thickness * c for ps, c in strokes)
        assert ink == pytest.approx(expected, rel=0.05)
        # the circles are drawn, brighter than the strokes
        for m in sample.marks:
            assert sample.image[int(m[0]), int(m[1])] > 240


def test_labels_balanced_and_release_loader(tmp_path):
    level = write_pathfinder(tmp_path, 40, PathfinderSpec(), seed=3, workers=1, progress=False)
    rows = [line.split() for line in (level / "metadata" / "0.npy").read_text().splitlines()]
    labels = [int(r[3]) for r in rows]
    assert 14 <= sum(labels) <= 26  # 40 fair coin flips
    # the release's fields: continuity, contour length, distractor length, paddle length, thickness, paddle margin
    assert [float(v) for v in rows[0][4:10]] == [1.0, 14, 4, 2.0, 0.5, 1.0]
    splits, info = load_pathfinder(tmp_path, "hard", seed=0, progress=False)
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (32, 4, 4)
    assert info["image_size"] == [32, 32]
    # a larger size through the same reader
    write_pathfinder(tmp_path / "64", 2, PathfinderSpec(size=64, contour_length=6), seed=0, progress=False)
    images, labels64, _ = read_pathfinder(tmp_path / "64", "easy", progress=False)
    assert images.shape == (2, 64, 64) and set(labels64.tolist()) <= {0, 1}
