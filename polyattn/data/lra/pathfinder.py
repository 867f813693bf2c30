"""Pathfinder (LRA): are the two circles joined by one dashed contour? 32x32 pixels = 1,024 tokens.

Generator after the original one (Linsley et al. 2018, "Learning long-range
spatial dependencies with horizontal gated recurrent units"; drewlinsley/pathfinder,
snakes2.py and snakes.py), with the settings LRA used for pathfinder32/64/128/256
(google-research/long-range-arena, lra_benchmarks/data/pathfinder.py). Every
image holds two target contours of ``contour_length`` short line segments
("paddles", ``paddle_length`` long and ``paddle_thickness`` wide, a gap of
``margin`` between consecutive ones) plus short distractor contours. The first
target contour starts in the central box (``PathfinderSpec.seed_box``: a border
of 2 x ``seed_distance`` is kept free, as the original does for its first
seed); the second starts ``seed_distance`` from the first. Contours turn with
weight cos^2(min(turn x continuity, pi/2)), as the original's. One circle marks
the start of one target contour; the other marks the far end of the same
contour (label 1, connected) or of the other one (label 0). Both classes
therefore hold the same strokes; only the connectivity differs. Contours keep a
margin from each other, so joining strokes never touch.

``PathfinderSpec(size=N)`` takes LRA's settings for N = 32, 64, 128, 256 and
scales the nearest of those for other sizes (see ``PathfinderSpec``).

Files use the layout of the LRA release (lra_release/pathfinder32/):

    ROOT/curv_contour_length_14/imgs/<b>/sample_<i>.png     8-bit grayscale
    ROOT/curv_contour_length_14/metadata/<b>.npy             text, one line per image:
        "imgs/<b> sample_<i>.png <i> <label> <continuity> <contour_length> <distractor_length>
         <paddle_length> <paddle_thickness> <paddle_margin> 1"

(the ".npy" metadata files of the release are whitespace-separated text with
the image folder, file name, index and label in the first four fields; the
binary .npy form of the original generator is read too). Difficulties:
easy = curv_baseline (contour length 6), intermediate = curv_contour_length_9,
hard = curv_contour_length_14 (the LRA task). Splits: 80/10/10 of the
shuffled images, as LRA.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import DatasetError, DatasetFormatError, DatasetNotFoundError
from ..registry import DataBundle, int_at_least, register_dataset
from .common import FixedLengthDataset, bar_disabled, cached_dir, lra_bundle, split_indices

__all__ = [
    "PathfinderSpec",
    "LRA_SETTINGS",
    "PATHFINDER_LAYOUT",
    "DIFFICULTIES",
    "level_folder",
    "PathfinderSample",
    "make_pathfinder_image",
    "make_pathfinder_sample",
    "write_pathfinder",
    "read_pathfinder",
    "load_pathfinder",
]

# difficulty -> (folder of the release, contour length)
DIFFICULTIES = {
    "easy": ("curv_baseline", 6),
    "intermediate": ("curv_contour_length_9", 9),
    "hard": ("curv_contour_length_14", 14),
}
IMAGES_PER_FOLDER = 1000

# LRA's generator settings per image size, in the original's terms: the docstrings of Pathfinder32/64/128/256 in
# google-research/long-range-arena lra_benchmarks/data/pathfinder.py, over the defaults of drewlinsley/pathfinder
# snakes2_wrapper.py where LRA leaves a setting out (paddle length 5, padding 22, seed distance 27).
# paddle_margins: the original's paddle_margin_list, one drawn per image. distractor_budget: num_distractor_snakes
# = budget // distractor_length. contrast: snake_contrast x paddle_contrast, the targets' stroke intensity; the
# distractors get snake_contrast alone (snakes.make_many_snakes is not handed the paddle contrast).
LRA_SETTINGS = {
    32: {
        "paddle_length": 2.0,
        "paddle_thickness": 0.5,
        "paddle_margins": (1.0,),
        "marker_radius": 1.5,
        "seed_distance": 7.0,
        "continuity": 1.0,
        "padding": 1,
        "contrast": 1.5,
        "distractor_contrast": 2.0,
        "distractor_budget": 20,
    },
    64: {
        "paddle_length": 5.0,
        "paddle_thickness": 1.0,
        "paddle_margins": (1.0,),
        "marker_radius": 2.5,
        "seed_distance": 12.0,
        "continuity": 1.8,
        "padding": 1,
        "contrast": 0.8,
        "distractor_contrast": 0.8,
        "distractor_budget": 22,
    },
    128: {
        "paddle_length": 5.0,
        "paddle_thickness": 1.5,
        "paddle_margins": (2.0, 3.0),
        "marker_radius": 3.0,
        "seed_distance": 20.0,
        "continuity": 1.8,
        "padding": 1,
        "contrast": 0.9,
        "distractor_contrast": 0.9,
        "distractor_budget": 35,
    },
    256: {
        "paddle_length": 5.0,
        "paddle_thickness": 2.0,
        "paddle_margins": (3.0,),
        "marker_radius": 5.0,
        "seed_distance": 27.0,
        "continuity": 1.8,
        "padding": 22,
        "contrast": 1.0,
        "distractor_contrast": 1.0,
        "distractor_budget": 30,
    },
}
# Below these, scaled-down strokes and circles fade into the 8-bit antialiasing (pathfinder32's are the thinnest).
_MIN_THICKNESS = 0.5
_MIN_MARKER_RADIUS = 1.0

PATHFINDER_LAYOUT = """\
ROOT/   (e.g. lra_release/pathfinder32/; ROOT may also be one difficulty folder)
  curv_baseline/ | curv_contour_length_9/ | curv_contour_length_14/
    imgs/<b>/sample_<i>.png     grayscale images, all the same size (32x32 in LRA)
    metadata/<b>.npy            one line per image: "imgs/<b> sample_<i>.png <i> <label> ..."
"""
_GENERATE_HINT = (
    "generate it with: polyattn data pathfinder --out DIR   (or leave data.root unset to generate into the cache)"
)


def _size_settings(size: int) -> dict:
    """This generator's settings for an image size: LRA's for 32/64/128/256, else the nearest of those scaled."""
    ref = min(LRA_SETTINGS, key=lambda s: (abs(math.log(max(size, 1) / s)), s))
    base, f = LRA_SETTINGS[ref], max(size, 1) / ref
    # A straight contour of the original has gaps of twice the paddle margin: snakes.extend_snake moves the pivot
    # length + 2 * margin ahead and draws the next paddle from margin past it.
    gaps = tuple(2 * m * f for m in base["paddle_margins"])
    return {
        "paddle_length": base["paddle_length"] * f,
        "paddle_thickness": max(base["paddle_thickness"] * f, min(_MIN_THICKNESS, base["paddle_thickness"])),
        "margin": min(gaps),
        "margin_choices": gaps if len(gaps) > 1 else (),
        "marker_radius": max(base["marker_radius"] * f, min(_MIN_MARKER_RADIUS, base["marker_radius"])),
        "seed_distance": base["seed_distance"] * f,
        "continuity": base["continuity"],
        "padding": max(1, round(base["padding"] * f)),
        "contrast": base["contrast"],
        "distractor_contrast": base["distractor_contrast"],
        "distractor_budget": base["distractor_budget"],
    }


@dataclass(frozen=True)
class PathfinderSpec:
    """Generator settings; lengths in pixels of the final image.

    Settings left at None take the value for ``size``: for 32, 64, 128 and 256
    the ones LRA generated pathfinder32/64/128/256 with (``LRA_SETTINGS``; at 32:
    paddle length 2, thickness 0.5, gap 2, marker radius 1.5, seed distance 7,
    continuity 1, distractor length contour_length // 3 and 20 // that many
    distractors). Other sizes take the settings of the nearest of those four
    sizes with every length (paddle length and thickness, gap, marker radius,
    seed distance, border padding) scaled by size / that size, counts,
    continuity and contrasts unchanged, and paddles no thinner than 0.5 and
    circles no smaller than radius 1 (16 px: paddle length 1, gap 1, seed
    distance 3.5).

    ``margin`` is the gap between consecutive paddles of a contour and the
    clearance kept around strokes; the original's "paddle margin" is half of it
    (its straight contours have gaps of two paddle margins). ``margin_choices``,
    when not empty, holds the gaps each image draws its own from (pathfinder128:
    4 or 6); it defaults to that of ``size`` unless ``margin`` is given.
    """

    size: int = 32
    contour_length: int = 14
    distractor_length: int | None = None  # None: contour_length // 3
    num_distractors: int | None = None  # None: distractor_budget // distractor_length
    paddle_length: float | None = None
    paddle_thickness: float | None = None
    margin: float | None = None
    margin_choices: tuple[float, ...] | None = None
    marker_radius: float | None = None
    continuity: float | None = None  # turn weight cos^2(min(turn * continuity, pi/2)): 1 allows up to 90 degrees
    seed_distance: float | None = None
    padding: int | None = None
    contrast: float | None = None  # target strokes' intensity before clipping to 1
    distractor_contrast: float | None = None
    distractor_budget: int | None = None
    # this renderer's supersampling; None: at least 4 sub-pixels across a paddle (the original draws at 2x and
    # downsamples with Lanczos)
    antialias: int | None = None

    def __post_init__(self) -> None:
        base = _size_settings(self.size)
        if self.margin_choices is None:
            choices = base["margin_choices"] if self.margin is None else ()
        else:
            choices = self.margin_choices
        # a tuple of floats keeps the spec hashable and its asdict() stable for the cache key
        object.__setattr__(self, "margin_choices", tuple(float(c) for c in choices))
        if self.margin is None and self.margin_choices:
            object.__setattr__(self, "margin", min(self.margin_choices))
        for f in fields(self):
            if f.name in base and getattr(self, f.name) is None:
                object.__setattr__(self, f.name, base[f.name])
        if self.antialias is None:
            # coarser sampling lets the ink of thin paddles jump with their position by over 10%
            object.__setattr__(self, "antialias", max(4, math.ceil(4 / self.paddle_thickness)))

    @property
    def paddle_margin(self) -> float:
        """The original generator's name for half the gap (what its metadata records)."""
        return self.margin / 2

    def seed_box(self) -> tuple[float, float]:
        """(low, high) in either coordinate of the box that holds the first target contour's first paddle.

        The original keeps a border of 2 x seed_distance free when it draws that paddle
        (snakes2.initialize_two_seeds); where that leaves less than two paddle lengths
        (small images), the box is that wide around the centre instead.
        """
        lo, hi = 2 * self.seed_distance, self.size - 2 * self.seed_distance
        if hi - lo < 2 * self.paddle_length:
            lo, hi = self.size / 2 - self.paddle_length, self.size / 2 + self.paddle_length
        return max(lo, float(self.padding)), min(hi, float(self.size - self.padding))

    def resolved(self) -> PathfinderSpec:
        d = self.distractor_length or max(1, self.contour_length // 3)
        n = self.num_distractors if self.num_distractors is not None else self.distractor_budget // d
        return replace(self, distractor_length=d, num_distractors=n)

    def check(self) -> None:
        if self.size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {self.size}")
        if self.contour_length < 1:
            raise ValueError(f"contour_length must be >= 1, got {self.contour_length}")
        if (self.num_distractors or 0) < 0 or (self.distractor_length or 0) < 0:
            raise ValueError(
                f"num_distractors and distractor_length must be >= 0, got {self.num_distractors}, "
                f"{self.distractor_length}"
            )
        if min(self.paddle_length, self.paddle_thickness, self.marker_radius) <= 0 or self.margin < 0:
            raise ValueError("paddle_length, paddle_thickness, marker_radius must be > 0 and margin >= 0")
        if any(c < 0 for c in self.margin_choices):
            raise ValueError(f"margin_choices must be >= 0, got {self.margin_choices}")
        if self.seed_distance <= 0 or self.padding < 0:
            raise ValueError("seed_distance must be > 0 and padding >= 0")


def level_folder(contour_length: int) -> str:
    """Release folder name of a contour length (6 -> curv_baseline)."""
    return "curv_baseline" if contour_length == 6 else f"curv_contour_length_{contour_length}"


# --- generation ---------------------------------------------------------------------
_ANGLES = np.linspace(-math.pi, math.pi, 48, endpoint=False)
_ALONG = np.linspace(0.0, 1.0, 5)  # points checked along a candidate paddle


class _Canvas:
    """Occupancy of one image: where a new stroke may not go (other strokes plus margin, the border)."""

    def __init__(self, spec: PathfinderSpec) -> None:
        self.spec = spec
        s, p = spec.size, spec.padding
        self.blocked = np.zeros((s, s), dtype=bool)
        self.blocked[:p], self.blocked[s - p :], self.blocked[:, :p], self.blocked[:, s - p :] = True, True, True, True
        self.centres = np.arange(s) + 0.5  # pixel centre coordinates along either axis

    def free(self, py: np.ndarray, px: np.ndarray, exempt: tuple | None = None) -> np.ndarray:
        """Points (py, px) -> bool: inside the image and not blocked (``exempt`` pixels count as free)."""
        s = self.spec.size
        iy, ix = np.floor(py).astype(np.intp), np.floor(px).astype(np.intp)
        inside = (iy >= 0) & (iy < s) & (ix >= 0) & (ix < s)
        if exempt is not None:
            self.blocked[exempt] = False
        taken = self.blocked[np.minimum(np.maximum(iy, 0), s - 1), np.minimum(np.maximum(ix, 0), s - 1)]
        if exempt is not None:
            self.blocked[exempt] = True
        return inside & ~taken

    def block_segment(self, a: tuple, b: tuple, radius: float) -> tuple:
        """Block pixels within ``radius`` of segment ab; returns (rows, cols) of those newly blocked."""
        s = self.spec.size
        y0 = max(0, math.floor(min(a[0], b[0]) - radius))
        x0 = max(0, math.floor(min(a[1], b[1]) - radius))
        y1 = min(s, math.ceil(max(a[0], b[0]) + radius) + 1)
        x1 = min(s, math.ceil(max(a[1], b[1]) + radius) + 1)
        c = self.centres
        near = _segment_distance(c[y0:y1, None], c[None, x0:x1], a, b) <= radius
        region = self.blocked[y0:y1, x0:x1]
        rows, cols = np.nonzero(near & ~region)
        region |= near
        return rows + y0, cols + x0

    def block_disk(self, c: tuple, radius: float) -> None:
        d = np.hypot(self.centres[:, None] - c[0], self.centres[None, :] - c[1])
        self.blocked |= d <= radius


def _segment_distance(py: np.ndarray, px: np.ndarray, a: tuple, b: tuple) -> np.ndarray:
    """Distance of the points (py, px) (broadcast together) to the segment ab."""
    dy, dx = b[0] - a[0], b[1] - a[1]
    ry, rx = py - a[0], px - a[1]
    # np.minimum/np.maximum: np.clip costs several times more on arrays this small
    t = np.minimum(np.maximum((ry * dy + rx * dx) / max(dy * dy + dx * dx, 1e-12), 0.0), 1.0)
    return np.hypot(ry - t * dy, rx - t * dx)


def _on_paddle(py: np.ndarray, px: np.ndarray, a: tuple, b: tuple, half: float) -> np.ndarray:
    """Points (py, px) on the paddle ab of half-width ``half``: flat ends, as the original's PIL line."""
    dy, dx = b[0] - a[0], b[1] - a[1]
    length = max(math.hypot(dy, dx), 1e-12)
    ry, rx = py - a[0], px - a[1]
    along = (ry * dy + rx * dx) / length
    across = np.abs(ry * dx - rx * dy) / length
    return (along >= 0) & (along <= length) & (across <= half)


def _step(p: tuple, theta: float, length: float) -> tuple:
    return (p[0] + length * math.sin(theta), p[1] + length * math.cos(theta))  # (y, x)


@functools.lru_cache(maxsize=16)
def _growth_tables(spec: PathfinderSpec) -> tuple[np.ndarray, np.ndarray]:
    """Turn weights over _ANGLES, and the distances ahead at which a new paddle must find free pixels."""
    weight = np.cos(np.minimum(np.abs(_ANGLES) * spec.continuity, math.pi / 2)) ** 2
    weight = np.where(weight > 1e-6, weight, 0.0)
    # from just past the gap to a little beyond the far end
    reach = spec.margin + np.append(_ALONG * spec.paddle_length, spec.paddle_length + spec.paddle_thickness)
    return weight, reach


class _Snake:
    """A contour being grown: its paddles, its start (tip), current end and heading.

    Each paddle blocks its surroundings at once; the snake's own newest paddle
    is exempt when the next one is placed (that one starts a margin away from it).
    """

    def __init__(self, start: tuple, theta: float, canvas: _Canvas) -> None:
        self.spec = spec = canvas.spec
        end = _step(start, theta, spec.paddle_length)
        self.paddles = [(start, end)]
        self.tip, self.end, self.theta = start, end, theta
        self.last = canvas.block_segment(start, end, spec.paddle_thickness / 2 + spec.margin)
        self.weight, self.reach = _growth_tables(spec)

    def grow(self, canvas: _Canvas, rng: np.random.Generator) -> bool:
        """Add one paddle ahead of the end, turning with weight cos^2(min(turn * continuity, pi/2))."""
        spec = self.spec
        headings = self.theta + _ANGLES
        sin, cos = np.sin(headings), np.cos(headings)
        py = self.end[0] + self.reach[:, None] * sin
        px = self.end[1] + self.reach[:, None] * cos
        w = np.where(canvas.free(py, px, self.last).all(0), self.weight, 0.0)
        cdf = np.cumsum(w)
        if cdf[-1] <= 0:
            return False
        k = min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)
        theta = float(headings[k])
        a = _step(self.end, theta, spec.margin)
        b = _step(a, theta, spec.paddle_length)
        self.last = canvas.block_segment(a, b, spec.paddle_thickness / 2 + spec.margin)
        self.paddles.append((a, b))
        self.end, self.theta = b, theta
        return True


def _seed(
    canvas: _Canvas,
    rng: np.random.Generator,
    near: tuple | None = None,
    box: tuple[float, float] | None = None,
    tries: int = 30,
) -> _Snake | None:
    """A free first paddle: within ``box`` (both coordinates), starting ``seed_distance`` from ``near``, or anywhere."""
    spec = canvas.spec
    along = _ALONG * spec.paddle_length
    for _ in range(tries):
        theta = float(rng.uniform(-math.pi, math.pi))
        if near is not None:
            start = _step(near, float(rng.uniform(-math.pi, math.pi)), spec.seed_distance)
        else:
            lo, hi = box if box is not None else (spec.padding, spec.size - spec.padding)
            y, x = rng.uniform(lo, hi, size=2)
            start = (float(y), float(x))
        if box is not None:
            # the whole paddle in the box: the original dilates the blocked border by the oriented paddle first
            end = _step(start, theta, spec.paddle_length)
            if not (box[0] <= end[0] <= box[1] and box[0] <= end[1] <= box[1]):
                continue
        if canvas.free(start[0] + along * math.sin(theta), start[1] + along * math.cos(theta)).all():
            return _Snake(start, theta, canvas)
    return None


def _targets(rng: np.random.Generator, spec: PathfinderSpec) -> tuple[_Canvas, list[_Snake]] | None:
    canvas = _Canvas(spec)
    first = _seed(canvas, rng, box=spec.seed_box())
    second = None if first is None else _seed(canvas, rng, near=first.tip)
    if second is None:
        return None
    snakes = [first, second]
    # Grow both in turn so that neither gets the image to itself.
    for _ in range(spec.contour_length - 1):
        for snake in snakes:
            if not snake.grow(canvas, rng):
                return None
    return canvas, snakes


def _render(strokes: list[tuple[list, float]], disks: list, spec: PathfinderSpec) -> np.ndarray:
    """Paddles (groups of (paddles, intensity)) and marker disks drawn at ``antialias`` times the size,
    then averaged down to 8 bits."""
    aa, size = spec.antialias, spec.size
    n = size * aa
    fine = (np.arange(n) + 0.5) / aa  # sub-pixel centres in image coordinates
    ink = np.zeros((n, n), dtype=np.float32)
    half = spec.paddle_thickness / 2
    for paddles, intensity in strokes:
        for a, b in paddles:
            y0, x0 = (max(0, math.floor((min(a[i], b[i]) - half) * aa)) for i in (0, 1))
            y1, x1 = (min(n, math.ceil((max(a[i], b[i]) + half) * aa)) for i in (0, 1))
            if y1 > y0 and x1 > x0:
                hit = _on_paddle(fine[y0:y1, None], fine[None, x0:x1], a, b, half)
                region = ink[y0:y1, x0:x1]
                region[hit] = np.maximum(region[hit], intensity)
    marks = np.zeros_like(ink)
    r = spec.marker_radius
    for c in disks:
        y0, x0 = (max(0, math.floor((c[i] - r) * aa)) for i in (0, 1))
        y1, x1 = (min(n, math.ceil((c[i] + r) * aa)) for i in (0, 1))
        inside = np.hypot(fine[y0:y1, None] - c[0], fine[None, x0:x1] - c[1]) <= r
        marks[y0:y1, x0:x1][inside] = 1.0
    image = np.maximum(ink.reshape(size, aa, size, aa).mean((1, 3)), marks.reshape(size, aa, size, aa).mean((1, 3)))
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


@dataclass
class PathfinderSample:
    """An image with the geometry behind it: contours as lists of paddles ((y, x), (y, x)), the two marks.

    ``targets[0]`` is the contour seeded in the central box; ``margin`` is the gap this image was drawn with.
    """

    image: np.ndarray
    label: int
    targets: list  # the two target contours
    distractors: list
    marks: list  # the two marker centres
    margin: float | None = None


def make_pathfinder_sample(rng: np.random.Generator, spec: PathfinderSpec, label: int) -> PathfinderSample:
    """One image with label 1 (the markers are the two ends of one contour) or 0 (ends of different contours)."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    spec = spec.resolved()
    if spec.margin_choices:
        # one gap per image, as the original draws one paddle margin per image
        spec = replace(spec, margin=float(rng.choice(spec.margin_choices)), margin_choices=())
    for _ in range(1000):
        made = _targets(rng, spec)
        if made is None:
            continue
        canvas, snakes = made
        origin = int(rng.integers(2))
        end_snake = origin if label == 1 else 1 - origin
        marks = [snakes[origin].tip, snakes[end_snake].end]
        # Keep distractors off every contour end, so that no end looks different from another.
        for snake in snakes:
            for tip in (snake.tip, snake.end):
                canvas.block_disk(tip, spec.marker_radius + spec.margin)
        distractors = []
        for _ in range(spec.num_distractors):
            d = _seed(canvas, rng)
            if d is None:
                continue
            for _ in range(spec.distractor_length - 1):
                if not d.grow(canvas, rng):
                    break
            distractors.append(d.paddles)
        targets = [s.paddles for s in snakes]
        strokes = [([p for c in targets for p in c], spec.contrast)]
        strokes.append(([p for c in distractors for p in c], spec.distractor_contrast))
        image = _render(strokes, marks, spec)
        return PathfinderSample(image, label, targets, distractors, marks, spec.margin)
    raise RuntimeError(
        f"could not place two contours of {spec.contour_length} paddles in a {spec.size}x{spec.size} image "
        "after 1000 tries: use a shorter contour_length or a larger size"
    )


def make_pathfinder_image(rng: np.random.Generator, spec: PathfinderSpec, label: int) -> np.ndarray:
    """One (size, size) uint8 image with label 1 (markers joined by one contour) or 0."""
    return make_pathfinder_sample(rng, spec, label).image


def _write_folder(args: tuple) -> list[str]:
    """Write images folder b (indices 0..n-1) and return its metadata lines."""
    level_dir, b, n, seed, spec_dict = args
    spec = PathfinderSpec(**spec_dict)
    r = spec.resolved()
    img_dir = Path(level_dir) / "imgs" / str(b)
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        rng = np.random.default_rng([seed, b, i])  # each image reproducible on its own
        label = int(rng.integers(2))
        sample = make_pathfinder_sample(rng, spec, label)
        Image.fromarray(sample.image, mode="L").save(img_dir / f"sample_{i}.png")
        # the release's fields; its paddle margin is half this generator's gap (see PathfinderSpec)
        lines.append(
            f"imgs/{b} sample_{i}.png {i} {label} {r.continuity} {r.contour_length} {r.distractor_length} "
            f"{r.paddle_length} {r.paddle_thickness} {sample.margin / 2} 1"
        )
    return lines


def write_pathfinder(
    out_dir: str | os.PathLike,
    num_images: int,
    spec: PathfinderSpec = PathfinderSpec(),
    seed: int = 0,
    workers: int = 1,
    progress: bool | None = None,
) -> Path:
    """Generate ``num_images`` images into out_dir/<level folder>/ in the release layout; returns that folder."""
    spec.check()
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: one per CPU core), got {workers}")
    level_dir = Path(out_dir) / level_folder(spec.contour_length)
    (level_dir / "metadata").mkdir(parents=True, exist_ok=True)
    jobs = []
    for b, start in enumerate(range(0, num_images, IMAGES_PER_FOLDER)):
        jobs.append((str(level_dir), b, min(IMAGES_PER_FOLDER, num_images - start), seed, asdict(spec)))
    workers = max(1, workers or os.cpu_count() or 1)
    with tqdm(total=num_images, desc="pathfinder", unit="img", disable=bar_disabled(progress)) as bar:
        if workers == 1:
            results = map(_write_folder, jobs)
            pool = None
        else:
            pool = ProcessPoolExecutor(workers)
            results = pool.map(_write_folder, jobs)
        try:
            for (_, b, n, _, _), lines in zip(jobs, results, strict=True):
                meta = level_dir / "metadata" / f"{b}.npy"
                tmp = meta.with_suffix(".tmp")
                tmp.write_text("".join(line + "\n" for line in lines))
                os.replace(tmp, meta)
                bar.update(n)
        finally:
            if pool is not None:
                pool.shutdown()
    return level_dir


# --- reading ----------------------------------------------------------------------
def _metadata_rows(path: Path) -> list[list[str]]:
    raw = path.read_bytes()
    if raw.startswith(b"\x93NUMPY"):  # the original generator's binary form
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise DatasetFormatError.for_path(
                path, PATHFINDER_LAYOUT, problem=f"malformed metadata file ({e})"
            ) from None
        return [[str(v) for v in row] for row in np.atleast_2d(arr)]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DatasetFormatError.for_path(
            path, PATHFINDER_LAYOUT, problem="malformed metadata file (neither text nor .npy)"
        ) from None
    return [line.split() for line in text.splitlines() if line.strip()]


def _level_dir(root, difficulty: str) -> Path:
    path = Path(os.path.expanduser(str(root)))
    if not path.is_dir():
        raise DatasetNotFoundError.for_path(
            path, PATHFINDER_LAYOUT, _GENERATE_HINT, problem="Pathfinder folder not found"
        )
    if (path / "metadata").is_dir():
        return path
    folder = DIFFICULTIES[difficulty][0]
    level = path / folder
    if not (level / "metadata").is_dir():
        raise DatasetNotFoundError.for_path(
            level / "metadata",
            PATHFINDER_LAYOUT,
            _GENERATE_HINT,
            problem=f"Pathfinder metadata folder not found (difficulty {difficulty!r})",
        )
    return level


def read_pathfinder(
    root, difficulty: str = "hard", limit: int | None = None, progress: bool | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images uint8 (N, H, W), labels (N,), info) of one difficulty, in metadata order.

    Empty image files (a few exist in the release) are skipped and counted in ``info``.
    """
    level = _level_dir(root, difficulty)
    files = sorted(
        (p for p in (level / "metadata").iterdir() if p.suffix == ".npy"),
        key=lambda p: (0, int(p.stem)) if p.stem.isdigit() else (1, p.stem),
    )
    if not files:
        raise DatasetNotFoundError.for_path(
            level / "metadata", PATHFINDER_LAYOUT, _GENERATE_HINT, problem="no metadata/*.npy files in"
        )
    rows = []
    for meta in files:
        for j, row in enumerate(_metadata_rows(meta)):
            if len(row) < 4 or row[3] not in ("0", "1"):
                raise DatasetFormatError.for_path(
                    meta,
                    PATHFINDER_LAYOUT,
                    problem=f"malformed metadata file (row {j + 1}: {' '.join(row)[:80]!r}; "
                    "expected '<folder> <file> <index> <label 0|1> ...')",
                )
            rows.append((level / row[0] / row[1], int(row[3])))
    if limit is not None:
        rows = rows[:limit]
    images, labels, empty = [], [], 0
    shape = None
    for path, label in tqdm(rows, desc="pathfinder images", unit="img", disable=bar_disabled(progress), leave=False):
        if not path.is_file():
            raise DatasetNotFoundError.for_path(
                path, PATHFINDER_LAYOUT, problem="Pathfinder image listed in metadata not found"
            )
        if path.stat().st_size == 0:
            empty += 1
            continue
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"), dtype=np.uint8)
        except Exception as e:
            raise DatasetFormatError.for_path(path, PATHFINDER_LAYOUT, problem=f"unreadable image ({e})") from None
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise DatasetFormatError.for_path(
                path, PATHFINDER_LAYOUT, problem=f"image of size {arr.shape}, the others are {shape}"
            )
        images.append(arr)
        labels.append(label)
    if not images:
        raise DatasetFormatError.for_path(level, PATHFINDER_LAYOUT, problem="no readable images in")
    info = {"level": str(level), "images": len(images), "empty_skipped": empty}
    return np.stack(images), np.asarray(labels, dtype=np.int64), info


def load_pathfinder(
    root, difficulty: str = "hard", seed: int = 0, limit: int | None = None, progress: bool | None = None
) -> tuple[dict[str, FixedLengthDataset], dict]:
    """Shuffled 80/10/10 train/val/test splits of pixel-token sequences (pixel value = token)."""
    images, labels, info = read_pathfinder(root, difficulty, limit, progress)
    tokens = images.reshape(len(images), -1)
    parts = split_indices(len(labels), (0.8, 0.1, 0.1), seed)
    empty = [name for name, idx in zip(("train", "val", "test"), parts, strict=True) if not len(idx)]
    if empty:
        raise DatasetError(
            f"Pathfinder: {len(labels)} readable images in {info['level']} leave the {' and '.join(empty)} "
            "split(s) of the 80/10/10 split empty; use at least 10 images (raise data.num_images, or "
            "generate more with: polyattn data pathfinder --out DIR)"
        )
    splits = {
        name: FixedLengthDataset(tokens[idx], labels[idx])
        for name, idx in zip(("train", "val", "test"), parts, strict=True)
    }
    info["image_size"] = list(images.shape[1:])
    return splits, info


# --- the registered dataset ---------------------------------------------------------------
_DEFAULTS = {
    "difficulty": "hard",
    # generated images (the count the pathfinder generator defaults to); with root: at most this many read
    "num_images": 200000,
    "image_size": 32,
    "gen_contour_length": None,  # None: 6 / 9 / 14 by difficulty
    "gen_num_distractors": None,  # None: the size's distractor budget // (contour_length // 3), 20 // 4 at 32
    "gen_workers": 0,  # processes generating images (0 = all cores); does not change the images
}


def _generated_root(cfg: dict) -> Path:
    contour = cfg["gen_contour_length"] or DIFFICULTIES[cfg["difficulty"]][1]
    spec = PathfinderSpec(
        size=int(cfg["image_size"]), contour_length=int(contour), num_distractors=cfg["gen_num_distractors"]
    )
    params = {"format": 2, "seed": int(cfg["seed"]), "num_images": int(cfg["num_images"]), **asdict(spec)}

    def generate(tmp: Path) -> None:
        write_pathfinder(tmp, int(cfg["num_images"]), spec, int(cfg["seed"]), int(cfg["gen_workers"]))

    return cached_dir("pathfinder", params, generate) / level_folder(spec.contour_length)


_CHECKS = {
    # the 80/10/10 split needs 10 images for a non-empty test split
    "num_images": int_at_least(10),
    "image_size": int_at_least(8),
    "gen_contour_length": int_at_least(1, nullable=True),
    "gen_num_distractors": int_at_least(0, nullable=True),
    "gen_workers": int_at_least(0),
}


@register_dataset("lra_pathfinder", _DEFAULTS, {"difficulty": tuple(DIFFICULTIES)}, _CHECKS, free=("gen_workers",))
def build_lra_pathfinder(cfg: dict, seed: int) -> DataBundle:
    """Pathfinder from ``data.root`` (release layout), or generated into the cache when root is unset."""
    if cfg["root"]:
        root, source = cfg["root"], str(cfg["root"])
    else:
        root = _generated_root(cfg)
        source = f"generated (seed {cfg['seed']}) in {root}"
    splits, info = load_pathfinder(root, cfg["difficulty"], int(cfg["seed"]), int(cfg["num_images"]))
    h, w = info["image_size"]
    return lra_bundle(
        "lra_pathfinder",
        source,
        splits,
        2,
        256,
        h * w,
        difficulty=cfg["difficulty"],
        image_size=[h, w],
        empty_skipped=info["empty_skipped"],
    )
