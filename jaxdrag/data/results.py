"""Writing results: the edited image, the trajectory overlay, side-by-side pictures and the JSON
report of each edit, each file written atomically (temporary file, fsync, rename) so an
interrupted run never leaves a half-written result; ``is_done`` tells a rerun what to skip."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .requests import EditResult


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; results get the usual permissions (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def overlay(image: np.ndarray, initial: np.ndarray, final: np.ndarray, targets: np.ndarray,
            trajectory: np.ndarray) -> np.ndarray:
    """The edited image with each pair's tracked trajectory (yellow), initial handle (red ring),
    final handle (red dot), target (blue dot) and an arrow from initial handle to target."""
    im = Image.fromarray(image).convert("RGB")
    d = ImageDraw.Draw(im)
    r = max(3, min(im.size) // 100)
    for i in range(len(targets)):
        (hx, hy), (tx, ty), (fx, fy) = initial[i], targets[i], final[i]
        d.line([(hx, hy), (tx, ty)], fill=(255, 255, 255), width=1)
        path = [tuple(p) for p in trajectory[:, i]]
        if len(path) > 1:
            d.line(path, fill=(255, 220, 0), width=2)
        d.ellipse([hx - r, hy - r, hx + r, hy + r], outline=(255, 0, 0), width=2)
        d.ellipse([tx - r, ty - r, tx + r, ty + r], fill=(0, 90, 255))
        d.ellipse([fx - r, fy - r, fx + r, fy + r], fill=(255, 0, 0))
    return np.asarray(im)


def upscale(a: np.ndarray, k: int) -> np.ndarray:
    """(H, W, …) → (H·k, W·k, …), nearest neighbour."""
    return np.repeat(np.repeat(np.asarray(a), k, axis=0), k, axis=1)


def _sc(p, k: int) -> np.ndarray:
    """Pixel coordinates of an image upscaled k× (pixel centres stay centres)."""
    return (np.asarray(p, np.float64) + 0.5) * k - 0.5


def result_overlay(result: EditResult, k: int = 1) -> np.ndarray:
    """``overlay`` of the result, the image upscaled (nearest) k× and everything drawn at that
    scale: (H·k, W·k, 3) uint8."""
    return overlay(upscale(result.image, k), _sc(result.initial_handles, k), _sc(result.handles, k),
                   _sc(result.targets, k), _sc(result.trajectory, k))


def side_by_side(image: np.ndarray, result: EditResult, min_width: int = 384) -> np.ndarray:
    """Input with handles (red), targets (blue) and arrows | output with the tracked trajectory,
    each upscaled (nearest) by an integer factor so a panel is at least ``min_width`` wide, with
    a 4-px white gap. Returns (H·k, 2·W·k + 4, 3) uint8."""
    k = max(1, -(-min_width // image.shape[1]))
    n = len(result.targets)
    left = overlay(upscale(image, k), _sc(result.initial_handles, k), _sc(result.initial_handles, k),
                   _sc(result.targets, k), np.zeros((0, n, 2)))
    right = result_overlay(result, k)
    gap = np.full((left.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def report(result: EditResult) -> dict:
    return {
        "name": result.name,
        "points": {"initial_handles": result.initial_handles.round(3).tolist(),
                   "targets": result.targets.round(3).tolist()},
        "final_handles": result.handles.round(3).tolist(),
        "iterations": result.iterations, "reached": result.reached,
        "trajectory": result.trajectory.round(3).tolist(),
        "losses": [None if not np.isfinite(v) else round(float(v), 6) for v in result.losses],
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "config": result.config,
        "failure": result.failure,
        **({"interpolation": {"alphas": [a for a, _ in result.interpolation], "strip": "interpolation.png"}}
           if result.interpolation else {}),
        **({"snapshots": [{"max_iters": sn["max_iters"], "iterations": sn["iterations"], "reached": sn["reached"],
                           "final_handles": np.asarray(sn["handles"]).round(3).tolist(),
                           "image": f"snapshots/iters_{sn['max_iters']:04d}.png"} for sn in result.snapshots]}
           if result.snapshots else {}),
    }


def strip(images: Sequence[np.ndarray], labels: Sequence[str], gap: int = 4) -> np.ndarray:
    """Images side by side (same height) on white with a caption band under each: (H + 16, ΣW + gaps, 3)."""
    h = max(im.shape[0] for im in images)
    w = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (w, h + 16), "white")
    d = ImageDraw.Draw(canvas)
    x = 0
    for im, label in zip(images, labels):
        canvas.paste(Image.fromarray(im), (x, 0))
        d.text((x + 2, h + 2), label, fill=(0, 0, 0))
        x += im.shape[1] + gap
    return np.asarray(canvas)


def write_result(result: EditResult, folder: Path) -> None:
    """edited.png, overlay.png, then report.json — each written atomically; the report is written
    last, so its presence (with the image) marks the result complete. A failed result writes its
    report only (no image), so a resumed run tries it again."""
    folder = Path(folder)
    if result.failure is not None:
        atomic_write(folder / "report.json", json.dumps(report(result), indent=1).encode())
        return
    atomic_write(folder / "edited.png", png_bytes(result.image))
    ov = overlay(result.image, result.initial_handles, result.handles, result.targets, result.trajectory)
    atomic_write(folder / "overlay.png", png_bytes(ov))
    if result.interpolation:
        atomic_write(folder / "interpolation.png",
                      png_bytes(strip([im for _, im in result.interpolation], [f"alpha {a:g}" for a, _ in result.interpolation])))
    for sn in result.snapshots:
        if sn["image"] is not None:
            atomic_write(folder / "snapshots" / f"iters_{sn['max_iters']:04d}.png", png_bytes(sn["image"]))
    atomic_write(folder / "report.json", json.dumps(report(result), indent=1).encode())


def is_done(folder: Path) -> bool:
    try:
        json.loads((Path(folder) / "report.json").read_text())
        return (Path(folder) / "edited.png").exists()
    except (OSError, ValueError):
        return False


def write_json(path: Path, obj) -> None:
    atomic_write(Path(path), json.dumps(obj, indent=1).encode())
