"""The toy world (v2): deterministic procedural 128×128 scenes with exact ground truth.

A scene is a background (one flat colour, or a linear gradient between two background colours)
with one or two non-overlapping objects (disc, square, triangle), each in its own colour of the
object palette with a black **spot**, a disc at a fixed off-centre place of its body (upper left
for discs and squares, lower left for triangles): the inner structure a point can be tracked on.
Objects are 36–56 px across alone, 28–44 px in pairs (4.5–7 latent cells of the factor-8 VAE),
and ToyBench drags them 8–24 px (1–3 cells). Everything a user or a test needs to build scenes
is in the constants below (and in ``weights/toy-sd15/WORLD.md``):

- object colours (saturated): ``PALETTE``; background colours (pale or dark, unsaturated):
  ``BACKGROUNDS``. Every object colour is at least ``MIN_COLOUR_GAP`` (RGB Euclidean, 0–255) from
  every background colour and from every other object colour, so colour segmentation is exact up
  to the anti-aliased rim.
- shapes: ``disc`` (size = diameter), ``square`` (axis-aligned, size = side), ``triangle``
  (equilateral, pointing up, size = side; its centre is the centroid).
- the spot: centre ``SPOT[shape][:2]`` × size from the object's centre, radius ``SPOT[shape][2]``
  × size, colour ``SPOT_RGB``; always inside the body (at least 0.06 × size from its outline).
- sizes ``SIZE_RANGE`` px (one object) or ``PAIR_SIZE_RANGE`` (two); objects lie ``MARGIN`` px
  inside the image (bounding circles) and at least ``GAP`` px apart (their outlines).
- edges are anti-aliased by area coverage of a one-pixel box filter, approximated from the signed
  distance: coverage = clip(0.5 − d, 0, 1).

Coordinates are (x, y) pixels, x to the right, y down, pixel centres at integers.
Captions name colour, shape, the spot and position ("a red disc with a black spot at the top left
and a blue square with a black spot at the bottom right on a light gray background").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

VERSION = 2
IMAGE_SIZE = 128
SIZE_RANGE = (36, 56)
PAIR_SIZE_RANGE = (28, 44)
PAIR_FRACTION = 0.4  # of random scenes with two objects
MARGIN = 4
GAP = 6
MIN_COLOUR_GAP = 90.0

SPOT_NAME = "black"
SPOT_RGB = (15, 15, 15)
# per shape: (dx, dy, radius) of the spot as fractions of the object's size, from its centre
SPOT: dict[str, tuple[float, float, float]] = {
    "disc": (-0.17, -0.17, 0.16),
    "square": (-0.2, -0.2, 0.16),
    "triangle": (-0.1, 0.06, 0.13),
}

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 20),
    "magenta": (230, 40, 220),
    "cyan": (20, 200, 220),
    "orange": (245, 130, 0),
    "purple": (110, 40, 160),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light gray": (200, 200, 200),
    "white": (245, 245, 245),
    "beige": (225, 215, 185),
    "dark gray": (70, 70, 70),
    "pale blue": (185, 205, 230),
}

SHAPES = ("disc", "square", "triangle")

_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "center", "right")


@dataclass(frozen=True)
class Obj:
    """One object: ``shape`` in SHAPES, ``colour`` a PALETTE name, centre (x, y) px, ``size`` px."""

    shape: str
    colour: str
    x: float
    y: float
    size: float

    @property
    def rgb(self) -> np.ndarray:
        return np.asarray(PALETTE[self.colour], np.float32)

    @property
    def radius(self) -> float:
        """Radius of the bounding circle about the centre (for placement)."""
        if self.shape == "disc":
            return self.size / 2
        if self.shape == "square":
            return self.size / np.sqrt(2)
        return self.size / np.sqrt(3)  # equilateral triangle: centroid to vertex

    def moved(self, dx: float, dy: float) -> "Obj":
        return replace(self, x=self.x + dx, y=self.y + dy)

    @property
    def spot(self) -> "Obj":
        """The black spot as a disc object (centre and diameter in px)."""
        fx, fy, fr = SPOT[self.shape]
        return Obj("disc", self.colour, self.x + fx * self.size, self.y + fy * self.size,
                   2 * fr * self.size)

    def point(self, fx: float, fy: float) -> tuple[float, float]:
        """The point (x, y) px at (fx, fy) × size from the centre."""
        return self.x + fx * self.size, self.y + fy * self.size


@dataclass(frozen=True)
class Spec:
    """A scene description: background colour names (one, or two for a gradient at
    ``angle`` degrees, 0 = left→right, 90 = top→bottom) and the objects, back to front."""

    background: tuple[str, ...]
    objects: tuple[Obj, ...]
    angle: float = 0.0
    size: int = IMAGE_SIZE

    def with_object(self, i: int, obj: Obj) -> "Spec":
        objs = list(self.objects)
        objs[i] = obj
        return replace(self, objects=tuple(objs))

    def moved(self, moves: Sequence[tuple[int, float, float]]) -> "Spec":
        """The scene with object i moved by (dx, dy) for each (i, dx, dy): the ground truth of a
        perfect drag."""
        s = self
        for i, dx, dy in moves:
            s = s.with_object(i, s.objects[i].moved(dx, dy))
        return s


@dataclass
class Scene:
    """A rendered scene: ``image`` (S, S, 3) uint8, per-object ``masks`` (n, S, S) bool (body
    coverage ≥ ½, the spot included), per-object ``spot_masks`` (n, S, S) bool, ``centroids`` and
    ``spot_centres`` (n, 2) (x, y) px (the exact geometric centres), ``caption``."""

    spec: Spec
    image: np.ndarray
    masks: np.ndarray
    coverage: np.ndarray = field(repr=False)
    caption: str = ""
    spot_masks: np.ndarray = field(repr=False, default=None)

    @property
    def centroids(self) -> np.ndarray:
        return np.asarray([[o.x, o.y] for o in self.spec.objects], np.float64).reshape(-1, 2)

    @property
    def spot_centres(self) -> np.ndarray:
        return np.asarray([[o.spot.x, o.spot.y] for o in self.spec.objects], np.float64).reshape(-1, 2)


# ----------------------------------------------------------------------------------------------
# rendering


def signed_distance(obj: Obj, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Signed distance (px, negative inside) from pixel centres to the object's outline
    (exact for discs; the max of edge distances for squares and triangles, exact on edges)."""
    dx, dy = xx - obj.x, yy - obj.y
    if obj.shape == "disc":
        return np.sqrt(dx * dx + dy * dy) - obj.size / 2
    if obj.shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - obj.size / 2
    if obj.shape == "triangle":
        # equilateral, side s, pointing up, centroid at the origin: inradius r = s/(2√3);
        # edges have outward normals (0, 1), (±√3/2, −1/2), each at distance r from the centroid
        r = obj.size / (2 * np.sqrt(3))
        c, s = np.sqrt(3) / 2, 0.5
        return np.maximum.reduce([dy - r, c * dx - s * dy - r, -c * dx - s * dy - r])
    raise ValueError(f"unknown shape {obj.shape!r}; choose one of {SHAPES}")


def coverage(obj: Obj, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) float32 area coverage in [0, 1] (one-pixel box filter from the distance)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.clip(0.5 - signed_distance(obj, xx, yy), 0.0, 1.0).astype(np.float32)


def background(spec: Spec) -> np.ndarray:
    """(S, S, 3) float32 background in 0–255."""
    s = spec.size
    cols = [np.asarray(BACKGROUNDS[b], np.float32) for b in spec.background]
    if len(cols) == 1:
        return np.broadcast_to(cols[0], (s, s, 3)).copy()
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1)
    a = np.deg2rad(spec.angle)
    proj = (xx - 0.5) * np.cos(a) + (yy - 0.5) * np.sin(a)
    u = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    return cols[0] * (1 - u[..., None]) + cols[1] * u[..., None]


def render(spec: Spec) -> Scene:
    """Render a scene description (objects composited back to front by coverage)."""
    for o in spec.objects:
        if o.colour not in PALETTE:
            raise ValueError(f"unknown object colour {o.colour!r}; choose one of {sorted(PALETTE)}")
    for b in spec.background:
        if b not in BACKGROUNDS:
            raise ValueError(f"unknown background colour {b!r}; choose one of {sorted(BACKGROUNDS)}")
    img = background(spec)
    covs, spots = [], []
    black = np.asarray(SPOT_RGB, np.float32)
    for o in spec.objects:
        c = coverage(o, spec.size)
        img = img * (1 - c[..., None]) + o.rgb * c[..., None]
        cs = coverage(o.spot, spec.size)  # inside the body, so drawn over it
        img = img * (1 - cs[..., None]) + black * cs[..., None]
        covs.append(c)
        spots.append(cs)
    empty = np.zeros((0, spec.size, spec.size), np.float32)
    cov = np.stack(covs) if covs else empty
    spot = np.stack(spots) if spots else empty
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return Scene(spec=spec, image=image, masks=cov >= 0.5, coverage=cov, caption=caption(spec),
                 spot_masks=spot >= 0.5)


# ----------------------------------------------------------------------------------------------
# captions


def position_words(x: float, y: float, size: int = IMAGE_SIZE) -> str:
    """"at the top left", "at the bottom", "in the center", … from thirds of the image."""
    row = _ROWS[min(2, int(3 * y / size))]
    col = _COLS[min(2, int(3 * x / size))]
    if row == "middle" and col == "center":
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"at the {row} {col}"


def describe(o: Obj, size: int = IMAGE_SIZE, positions: bool = True) -> str:
    art = "an" if o.colour[0] in "aeiou" else "a"
    words = f"{art} {o.colour} {o.shape} with a {SPOT_NAME} spot"
    return f"{words} {position_words(o.x, o.y, size)}" if positions else words


def caption(spec: Spec, positions: bool = True) -> str:
    objs = " and ".join(describe(o, spec.size, positions) for o in spec.objects)
    if len(spec.background) == 1:
        bg = f"on a {spec.background[0]} background"
    else:
        bg = f"on a {spec.background[0]} and {spec.background[1]} gradient background"
    return f"{objs} {bg}"


# ----------------------------------------------------------------------------------------------
# random scenes


def _apart(o: Obj, p: Obj, size: int) -> bool:
    """Whether the outlines of o and p are at least GAP px apart (tested on a half-pixel grid
    around the two objects; exact for the shapes' signed distances)."""
    if np.hypot(o.x - p.x, o.y - p.y) >= o.radius + p.radius + GAP:
        return True
    lo = max(0.0, min(o.x - o.radius, p.x - p.radius) - GAP)
    hi = min(size - 1.0, max(o.x + o.radius, p.x + p.radius) + GAP)
    lo_y = max(0.0, min(o.y - o.radius, p.y - p.radius) - GAP)
    hi_y = min(size - 1.0, max(o.y + o.radius, p.y + p.radius) + GAP)
    yy, xx = np.mgrid[lo_y:hi_y + 0.5:0.5, lo:hi + 0.5:0.5].astype(np.float32)
    # a point within GAP/2 of both outlines means the outlines are closer than GAP
    return not np.any((signed_distance(o, xx, yy) <= GAP / 2) & (signed_distance(p, xx, yy) <= GAP / 2))


def _fits(o: Obj, others: Sequence[Obj], size: int) -> bool:
    r = o.radius
    if not (MARGIN + r <= o.x <= size - 1 - MARGIN - r and MARGIN + r <= o.y <= size - 1 - MARGIN - r):
        return False
    return all(_apart(o, p, size) for p in others)


def fits(spec: Spec, i: int | None = None) -> bool:
    """Whether object i (or every object) lies inside the margin and apart from the others."""
    idx = range(len(spec.objects)) if i is None else [i]
    return all(_fits(spec.objects[k], [p for j, p in enumerate(spec.objects) if j != k], spec.size)
               for k in idx)


def random_spec(seed: int, n_objects: int | None = None, size: int = IMAGE_SIZE) -> Spec:
    """A deterministic random scene description for ``seed`` (numpy PCG64)."""
    rng = np.random.default_rng(seed)
    bg_names = list(BACKGROUNDS)
    if rng.random() < 0.5:
        bg = (bg_names[rng.integers(len(bg_names))],)
    else:
        i, j = rng.choice(len(bg_names), 2, replace=False)
        bg = (bg_names[i], bg_names[j])
    angle = float(rng.choice([0.0, 45.0, 90.0, 135.0]))
    n = int(n_objects if n_objects is not None else 1 + (rng.random() < PAIR_FRACTION))
    colours = rng.choice(len(PALETTE), n, replace=False)
    names = list(PALETTE)
    lo, hi = SIZE_RANGE if n == 1 else PAIR_SIZE_RANGE
    for _attempt in range(50):  # a first object placed where no second one fits: place both again
        objs: list[Obj] = []
        for k in range(n):
            for _ in range(200):
                shape = SHAPES[rng.integers(len(SHAPES))]
                sz = float(rng.integers(lo, hi + 1))
                o = Obj(shape, names[colours[k]], float(rng.uniform(0, size - 1)),
                        float(rng.uniform(0, size - 1)), sz)
                if _fits(o, objs, size):
                    objs.append(o)
                    break
            else:
                break
        if len(objs) == n:
            return Spec(background=bg, objects=tuple(objs), angle=angle if len(bg) == 2 else 0.0, size=size)
    raise RuntimeError(f"seed {seed}: could not place {n} objects")  # pragma: no cover - never seen


def random_scene(seed: int, n_objects: int | None = None) -> Scene:
    return render(random_spec(seed, n_objects))


def batch(seeds: Sequence[int]) -> tuple[np.ndarray, list[str]]:
    """(B, S, S, 3) uint8 images and their captions for ``seeds``."""
    scenes = [random_scene(int(s)) for s in seeds]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def check_palette() -> float:
    """The smallest RGB distance between an object colour (or the spot's) and any other palette,
    spot or background colour (asserted ≥ MIN_COLOUR_GAP by the tests)."""
    objs = np.asarray(list(PALETTE.values()) + [SPOT_RGB], np.float32)
    bgs = np.asarray(list(BACKGROUNDS.values()), np.float32)
    d_ob = np.linalg.norm(objs[:, None] - bgs[None], axis=-1).min()
    d_oo = np.linalg.norm(objs[:, None] - objs[None], axis=-1)
    d_oo = d_oo[~np.eye(len(objs), dtype=bool)].min()
    return float(min(d_ob, d_oo))


def world_markdown() -> str:
    """The world's description for users who build their own scenes (written next to the toy
    weights as WORLD.md; a test keeps the committed file equal to this)."""
    lines = [f"# The toy world (v{VERSION})", "",
             f"Scenes are {IMAGE_SIZE}×{IMAGE_SIZE} RGB, generated by `jaxdrag.toy.world` "
             "(`random_scene(seed)`, or `render(Spec(...))` for a scene of your own).", "",
             "## Object colours (saturated)", "", "| name | RGB |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in PALETTE.items()]
    lines += ["", "## Background colours", "", "| name | RGB |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in BACKGROUNDS.items()]
    lines += ["", f"Spot colour ({SPOT_NAME}): {SPOT_RGB}.", "",
              f"Every object colour and the spot colour are at least {MIN_COLOUR_GAP:g} (RGB Euclidean "
              "distance, 0–255) from every other palette colour and every background colour.", "",
              "## The spot (inner structure)", "",
              "Every object carries a black spot, a disc inside its body at a fixed place: the point a "
              "drag's handle is put on, as a DragBench annotator would pick a distinctive point. "
              "Offsets and radius as fractions of the object's size, from its centre (x right, y down):",
              "", "| shape | spot centre (dx, dy) | spot radius |", "| --- | --- | --- |"]
    lines += [f"| {k} | ({v[0]:+g}, {v[1]:+g}) | {v[2]:g} |" for k, v in SPOT.items()]
    lines += ["",
              "## Scenes", "",
              "- background: one flat background colour, or a linear gradient between two (at 0°, 45°, 90° "
              "or 135°; 0° runs left → right, 90° top → bottom), half of the scenes each;",
              f"- 1 object ({100 * (1 - PAIR_FRACTION):.0f} % of the scenes) or 2, each in a different "
              "object colour, shapes: "
              + ", ".join(f"`{s}`" for s in SHAPES)
              + " (disc: size = diameter; square: axis-aligned, size = side; triangle: equilateral, "
              "pointing up, size = side, centred on its centroid);",
              f"- sizes {SIZE_RANGE[0]}–{SIZE_RANGE[1]} px for one object, {PAIR_SIZE_RANGE[0]}–"
              f"{PAIR_SIZE_RANGE[1]} px for two (the VAE's latent cell is 8 px); objects at least {MARGIN} px "
              f"inside the image (bounding circles) and {GAP} px apart (outlines);",
              "- edges anti-aliased (coverage of a one-pixel box filter, from the signed distance);",
              "- coordinates (x, y) in pixels, x to the right, y down, pixel centres at integers;",
              "- ground truth: per-object coverage and masks (coverage ≥ ½, spot included), spot masks, "
              "object centres and spot centres (x, y);",
              "- captions: `a red disc with a black spot at the top left and a blue square with a black "
              "spot on the right on a light gray background` — colour, shape, the spot, position (thirds "
              "of the image: top/middle/bottom × "
              "left/center/right; \"in the center\" for the middle cell), background;",
              "- seeds below 1 000 000 are training scenes; ToyBench and the quality measurements use "
              "seeds from 1 000 000 up.", ""]
    return "\n".join(lines)
