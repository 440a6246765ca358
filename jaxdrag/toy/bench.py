"""ToyBench: drag tasks on held-out toy scenes whose right answer is known exactly, and metrics
measured by colour segmentation of the output.

A task moves one object (single-pair: the handle on its black spot, the point an annotator would
pick), or two objects (two-pair: one handle on each spot), or one object by two handles (two-pair:
the spot and a point of the body across from it), each by an even integer (dx, dy) of length
8–24 px (1–3 latent cells), so that the moved object stays inside the image and apart from the
others. The mask is the union of every moved object's old and new footprint, dilated by
``MASK_DILATE`` px. The prompt is the scene's caption; the edit prompt (CLIPDrag's text) is the
caption of the moved scene.

Metrics per moved object (``measure``), from the pixels within ``COLOUR_TOL`` of the object's
palette colour (each object has its own colour):
  displacement error ‖Δcentroid − (dx, dy)‖ px, where Δcentroid = centroid(output) − centroid(input)
  (both measured the same way, so the rim's anti-aliasing cancels), and relative to the drag
  length; IoU with the ground-truth moved footprint (segmented the same way from the perfectly
  edited scene, so a perfect edit has IoU 1); survival: segmented area within ±30 % of the
  input's, and its spot found; spot error ‖Δspot − (dx, dy)‖ px, the spot segmented as the
  pixels within COLOUR_TOL of the spot colour within ``SPOT_REACH`` × size of the object's
  segmented centroid (found: its area within ±``SPOT_AREA_TOL`` of the input's). An object that
  vanished has an infinite error. Background PSNR: output vs input outside the mask (where the
  right answer is the input itself).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import world

N_TASKS = 50
FIRST_SEED = 1_010_000  # held out from training (train.HELD_OUT_SEED = 1_000_000)
DRAG_RANGE = (8, 24)
MASK_DILATE = 4
COLOUR_TOL = 50.0
AREA_TOL = 0.3
SPOT_AREA_TOL = 0.5
SPOT_REACH = 0.6
# the second handle of a two-handle task, across the body from the spot (fractions of the size)
OPPOSITE: dict[str, tuple[float, float]] = {"disc": (0.2, 0.2), "square": (0.22, 0.22), "triangle": (0.12, 0.1)}


@dataclass
class Task:
    """One drag. points: [[x, y], …] alternating handle, target; moves: [(object, dx, dy)]."""

    name: str
    seed: int
    spec: world.Spec
    moves: list[tuple[int, int, int]]
    points: list[list[float]]
    kind: str  # "single" | "two-objects" | "two-handles"
    scene: world.Scene = field(repr=False, default=None)

    @property
    def image(self) -> np.ndarray:
        return self.scene.image

    @property
    def mask(self) -> np.ndarray:
        """(S, S) bool: old and new footprints of the moved objects, dilated."""
        s = self.spec.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        m = np.zeros((s, s), bool)
        for i, dx, dy in self.moves:
            o = self.spec.objects[i]
            for p in (o, o.moved(dx, dy)):
                m |= world.signed_distance(p, xx, yy) <= MASK_DILATE
        return m

    @property
    def prompt(self) -> str:
        return self.scene.caption

    @property
    def edit_prompt(self) -> str:
        return world.caption(self.spec.moved(self.moves))

    @property
    def target(self) -> world.Scene:
        """The perfectly edited scene."""
        return world.render(self.spec.moved(self.moves))

    def to_json(self) -> dict:
        return {"name": self.name, "seed": self.seed, "kind": self.kind, "moves": self.moves,
                "points": self.points, "prompt": self.prompt, "edit_prompt": self.edit_prompt,
                "objects": [asdict(o) for o in self.spec.objects]}


def _drag(rng: np.random.Generator) -> tuple[int, int]:
    """An even-integer (dx, dy) with length in DRAG_RANGE (even, so supervision-pixel targets
    — half resolution — are exact)."""
    while True:
        length = rng.uniform(*DRAG_RANGE)
        a = rng.uniform(0, 2 * np.pi)
        dx, dy = 2 * int(round(length * np.cos(a) / 2)), 2 * int(round(length * np.sin(a) / 2))
        if DRAG_RANGE[0] <= np.hypot(dx, dy) <= DRAG_RANGE[1]:
            return dx, dy


def _valid(spec: world.Spec, moves) -> bool:
    moved = spec.moved(moves)
    return world.fits(moved)


def make_task(seed: int, index: int) -> Task | None:
    """The task of ``seed`` (None if no valid drag was found for the scene)."""
    rng = np.random.default_rng(seed)
    spec = world.random_spec(seed)
    n = len(spec.objects)
    kind = ["single", "single", "two-objects" if n == 2 else "two-handles"][index % 3]
    for _ in range(50):
        if kind == "two-objects":
            moves = [(i, *_drag(rng)) for i in range(n)]
        else:
            moves = [(int(rng.integers(n)), *_drag(rng))]
        if not _valid(spec, moves):
            continue
        points: list[list[float]] = []
        for i, dx, dy in moves:
            o = spec.objects[i]
            handles = [(o.spot.x, o.spot.y)]
            if kind == "two-handles":
                handles.append(o.point(*OPPOSITE[o.shape]))
            for x, y in handles:
                hx, hy = int(round(x)), int(round(y))
                points += [[hx, hy], [hx + dx, hy + dy]]
        return Task(name=f"toy-{index:04d}", seed=seed, spec=spec, moves=[tuple(map(int, m)) for m in moves],
                    points=points, kind=kind, scene=world.render(spec))
    return None


def make_tasks(n: int = N_TASKS, first_seed: int = FIRST_SEED) -> list[Task]:
    """``n`` tasks from consecutive held-out seeds (deterministic)."""
    tasks: list[Task] = []
    seed = first_seed
    while len(tasks) < n:
        t = make_task(seed, len(tasks))
        if t is not None:
            tasks.append(t)
        seed += 1
    return tasks


DEMO_DRAG = (20, 0)


def demo_task() -> Task:
    """The demo's drag: a red disc with its black spot moved 20 px (2.5 latent cells) to the
    right, below a blue square, on a light gray and pale blue gradient; the handle on the spot."""
    spec = world.Spec(background=("light gray", "pale blue"), angle=90.0,
                      objects=(world.Obj("disc", "red", 40.0, 76.0, 44.0),
                               world.Obj("square", "blue", 98.0, 32.0, 30.0)))
    dx, dy = DEMO_DRAG
    o = spec.objects[0]
    hx, hy = int(round(o.spot.x)), int(round(o.spot.y))
    return Task(name="demo", seed=-1, spec=spec, moves=[(0, dx, dy)], points=[[hx, hy], [hx + dx, hy + dy]],
                kind="single", scene=world.render(spec))


# ----------------------------------------------------------------------------------------------
# metrics


def segment(image: np.ndarray, colour: str) -> np.ndarray:
    """(S, S) bool: pixels within COLOUR_TOL (RGB Euclidean) of the palette colour (or of the
    spot's, for ``world.SPOT_NAME``)."""
    rgb = world.SPOT_RGB if colour == world.SPOT_NAME else world.PALETTE[colour]
    d = np.linalg.norm(image.astype(np.float32) - np.asarray(rgb, np.float32), axis=-1)
    return d <= COLOUR_TOL


def segment_spot(image: np.ndarray, centre: np.ndarray | None, size: float) -> np.ndarray:
    """(S, S) bool: spot-coloured pixels within SPOT_REACH × size of ``centre`` (an object's
    segmented centroid; empty when the object was not found)."""
    s = image.shape[0]
    if centre is None:
        return np.zeros(image.shape[:2], bool)
    yy, xx = np.mgrid[0:s, 0:image.shape[1]]
    near = np.hypot(xx - centre[0], yy - centre[1]) <= SPOT_REACH * size
    return segment(image, world.SPOT_NAME) & near


def centroid(mask: np.ndarray) -> np.ndarray | None:
    """(x, y) mean of the mask's pixels, or None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.asarray([xs.mean(), ys.mean()])


def psnr_where(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """PSNR (dB, 0–255 scale) over the pixels where ``where``; inf if identical."""
    if not where.any():
        return float("nan")
    diff = a.astype(np.float64)[where] - b.astype(np.float64)[where]
    mse = float(np.mean(diff ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def measure(task: Task, output: np.ndarray, source: np.ndarray | None = None) -> dict:
    """Metrics of an edited image (S, S, 3) uint8 for ``task`` (see the module docstring).
    ``source``: the input image (default: the task's rendered scene)."""
    source = task.image if source is None else source
    target = task.target
    per = []
    for i, dx, dy in task.moves:
        o = task.spec.objects[i]
        m_in, m_out = segment(source, o.colour), segment(output, o.colour)
        c_in, c_out = centroid(m_in), centroid(m_out)
        length = float(np.hypot(dx, dy))
        if c_in is None or c_out is None:
            err = float("inf")
            moved = [float("nan"), float("nan")]
        else:
            moved = (c_out - c_in).tolist()
            err = float(np.hypot(moved[0] - dx, moved[1] - dy))
        # the ground-truth footprint, segmented from the perfectly edited scene the same way
        gt = segment(target.image, o.colour)
        iou = float((m_out & gt).sum() / max(1, (m_out | gt).sum()))
        area_in, area_out = int(m_in.sum()), int(m_out.sum())
        s_in, s_out = segment_spot(source, c_in, o.size), segment_spot(output, c_out, o.size)
        sc_in, sc_out = centroid(s_in), centroid(s_out)
        spot_in, spot_out = int(s_in.sum()), int(s_out.sum())
        spot_found = spot_in > 0 and abs(spot_out - spot_in) <= SPOT_AREA_TOL * spot_in
        spot_err = (float(np.hypot(*(sc_out - sc_in - np.asarray([dx, dy]))))
                    if sc_in is not None and sc_out is not None else float("inf"))
        survived = area_in > 0 and abs(area_out - area_in) <= AREA_TOL * area_in and spot_found
        per.append({"object": i, "drag": [dx, dy], "length": length, "moved": moved, "error": err,
                    "rel_error": err / length, "iou": iou, "area_in": area_in, "area_out": area_out,
                    "spot_error": spot_err, "spot_area_in": spot_in, "spot_area_out": spot_out,
                    "spot_found": bool(spot_found), "survived": bool(survived)})
    bg = ~task.mask
    return {"name": task.name, "kind": task.kind,
            "error": float(np.mean([p["error"] for p in per])),
            "rel_error": float(np.mean([p["rel_error"] for p in per])),
            "spot_error": float(np.mean([p["spot_error"] for p in per])),
            "iou": float(np.mean([p["iou"] for p in per])),
            "survived": all(p["survived"] for p in per),
            "bg_psnr": psnr_where(output, source, bg), "objects": per}


def summarize(metrics: Sequence[dict]) -> dict:
    """Aggregate per-task metrics: medians of the errors (an object that vanished counts as an
    infinite error), survival rate, mean IoU, median background PSNR."""
    if not metrics:
        return {"tasks": 0}
    err = np.asarray([m["error"] for m in metrics], np.float64)
    rel = np.asarray([m["rel_error"] for m in metrics], np.float64)
    psnr = np.asarray([m["bg_psnr"] for m in metrics], np.float64)
    psnr_f = np.minimum(psnr, 100.0)  # an unchanged background is inf dB; cap for the mean
    spot = np.asarray([m.get("spot_error", np.nan) for m in metrics], np.float64)
    return {"tasks": len(metrics),
            "median_error_px": float(np.median(err)),
            "median_spot_error_px": float(np.median(spot)),
            "median_rel_error": float(np.median(rel)),
            "within_25pct": float(np.mean(rel <= 0.25)),
            "mean_iou": float(np.mean([m["iou"] for m in metrics])),
            "survival": float(np.mean([m["survived"] for m in metrics])),
            "median_bg_psnr": float(np.median(psnr_f)),
            "mean_bg_psnr": float(np.mean(psnr_f))}


def table_markdown(rows: dict[str, dict], extra: dict[str, dict] | None = None) -> str:
    """A Markdown table of ``summarize`` rows keyed by method."""
    head = ("| method | tasks | median error (px) | median error / drag | ≤ 25 % | median spot error (px) "
            "| mean IoU | survived | median bg PSNR (dB) | mean iterations | s / edit |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        e = (extra or {}).get(name, {})
        lines.append(
            f"| {name} | {r['tasks']} | {r['median_error_px']:.2f} | {100 * r['median_rel_error']:.1f} % "
            f"| {100 * r['within_25pct']:.0f} % | {r.get('median_spot_error_px', float('nan')):.2f} "
            f"| {r['mean_iou']:.3f} | {100 * r['survival']:.0f} % "
            f"| {r['median_bg_psnr']:.2f} | {e.get('iterations', float('nan')):.1f} "
            f"| {e.get('seconds_per_edit', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def read_metrics(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
