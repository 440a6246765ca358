"""What the user draws and clicks, as arrays: the image and mask out of the editor's value,
handle/target points, the picture of them shown to click on, and the one-line messages for input
that cannot be run. Pure functions of numpy arrays and lists (no Gradio here)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..data import upscale  # noqa: F401 - the page's upscale too

DISPLAY_MIN = 512  # the points view is upscaled by an integer factor to at least this many px


class InputError(ValueError):
    """UI input that cannot be run; the message is shown in the page as is."""


def to_rgb(a: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1|3|4) image (RGBA composited on white) → (H, W, 3) uint8."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        alpha = a[..., 3:].astype(np.float32) / 255
        return np.round(a[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return a[..., :3]


def editor_value(image: np.ndarray) -> dict:
    """The image editor's value for ``image`` with nothing painted (a loaded mask is shown in the
    points view, not as an editor layer: the editor does not draw layers it is given)."""
    return {"background": image, "layers": [], "composite": None}


def from_editor(value: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(image (H, W, 3) uint8, mask (H, W) bool or None) out of the editor's value: the background
    is the image, the union of the painted layers (alpha > 0) the editable mask; nothing painted
    means no mask. A bare array is an image without a mask."""
    if value is None:
        return None, None
    if not isinstance(value, dict):
        return to_rgb(value), None
    bg = value.get("background")
    if bg is None:
        return None, None
    image = to_rgb(bg)
    mask = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = np.asarray(layer)
        painted = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[-1] == 4 else layer.reshape(layer.shape[:2] + (-1,)).max(-1) > 0
        if mask is not None and painted.shape != mask.shape:
            raise InputError(f"the mask layers differ in size ({mask.shape[1]}×{mask.shape[0]} and "
                             f"{painted.shape[1]}×{painted.shape[0]}): clear the mask and draw it again")
        mask = painted if mask is None else mask | painted
    if mask is not None and not mask.any():
        mask = None
    return image, mask


def mask_from_file(a: np.ndarray) -> np.ndarray:
    """A mask image (white or any nonzero = editable) → (H, W) bool."""
    a = np.asarray(a)
    if a.ndim == 3:
        a = a[..., 3] if a.shape[-1] == 4 and a[..., 3].min() < 255 else a[..., :3].max(-1)
    return a > 127 if a.dtype == np.uint8 else a > 0


def display_scale(hw: tuple[int, int], minimum: int = DISPLAY_MIN) -> int:
    """The integer upscale of the points view: the smallest k with k·min(H, W) ≥ ``minimum``."""
    return max(1, -(-minimum // max(1, min(hw))))


def click_to_pixel(index: Sequence[float], scale: int, hw: tuple[int, int]) -> list[int]:
    """A click at ``index`` = (x, y) in the upscaled view → the [x, y] pixel of the image, clamped."""
    x = min(max(int(index[0]) // scale, 0), hw[1] - 1)
    y = min(max(int(index[1]) // scale, 0), hw[0] - 1)
    return [x, y]


def add_point(points: list, xy: Sequence[int]) -> list:
    """Points alternate handle, target: a click appends the next one."""
    return list(points) + [list(xy)]


def undo_point(points: list) -> list:
    return list(points)[:-1]


def describe_points(points: list) -> str:
    """'handle (x, y) → target (x, y)' per pair, the last handle 'waiting for its target'."""
    if not points:
        return "no points: click a handle, then its target"
    lines = []
    for i in range(0, len(points), 2):
        h = points[i]
        if i + 1 < len(points):
            t = points[i + 1]
            lines.append(f"{i // 2 + 1}: handle ({h[0]}, {h[1]}) → target ({t[0]}, {t[1]})")
        else:
            lines.append(f"{i // 2 + 1}: handle ({h[0]}, {h[1]}) → click its target")
    return "\n".join(lines)


def draw_points(image: np.ndarray, mask: np.ndarray | None, points: list, scale: int) -> np.ndarray:
    """The points view: ``image`` upscaled by ``scale`` (nearest), the editable mask brightened
    and the rest dimmed, each handle a red dot, each target a blue dot, an arrow between them.
    Returns (H·scale, W·scale, 3) uint8."""
    a = np.asarray(image, np.float32)
    if mask is not None and mask.shape == a.shape[:2]:
        a = np.where(mask[..., None], a, a * 0.55)
    im = Image.fromarray(upscale(a.astype(np.uint8), scale))
    d = ImageDraw.Draw(im)
    r = max(4, min(im.size) // 80)

    def c(p):
        return ((p[0] + 0.5) * scale, (p[1] + 0.5) * scale)

    for i in range(0, len(points), 2):
        hx, hy = c(points[i])
        if i + 1 < len(points):
            tx, ty = c(points[i + 1])
            d.line([(hx, hy), (tx, ty)], fill=(255, 255, 255), width=max(2, r // 2))
            v = np.array([tx - hx, ty - hy])
            n = np.linalg.norm(v)
            if n > 2 * r:  # arrow head at the target
                u, w = v / n, np.array([-v[1], v[0]]) / n
                tip = np.array([tx, ty]) - u * r
                d.polygon([tuple(tip), tuple(tip - 2 * r * u + r * w), tuple(tip - 2 * r * u - r * w)],
                          fill=(255, 255, 255))
            d.ellipse([tx - r, ty - r, tx + r, ty + r], fill=(0, 90, 255), outline=(255, 255, 255))
        d.ellipse([hx - r, hy - r, hx + r, hy + r], fill=(230, 0, 0), outline=(255, 255, 255))
    return np.asarray(im)


def check_inputs(image: np.ndarray | None, mask: np.ndarray | None, points: list) -> None:
    """Raise InputError with the message to show when the edit cannot run: no image, no points,
    a handle without its target, a point outside the image, or a mask of another size."""
    if image is None:
        raise InputError("no image: upload one, pick a sample or generate one")
    h, w = image.shape[:2]
    if mask is not None and mask.shape != (h, w):
        raise InputError(f"the mask is {mask.shape[1]}×{mask.shape[0]} but the image is {w}×{h}: "
                         f"draw the mask on this image or load a mask of its size")
    if not points:
        raise InputError("no points: click a handle on the image, then the target it should move to")
    if len(points) % 2:
        k = len(points)
        raise InputError(f"point {k} (a handle at ({points[-1][0]}, {points[-1][1]})) has no target: "
                         f"click its target, or undo it")
    for k, (x, y) in enumerate(points, 1):
        if not (0 <= x < w and 0 <= y < h):
            raise InputError(f"point {k} ({x}, {y}) is outside the {w}×{h} image")
