"""Edit requests and results: ``EditRequest`` (an image, points alternating handle and target,
prompt, mask, per-edit hyperparameters), ``Generation`` (drag a generated image instead),
``EditResult``, and ``validate`` — every check a request gets before any work, each failure a
one-line ``RequestError`` naming the request and the field.

Coordinates: users give points as [x, y] pixels of *their* image, alternating handle, target
(DragBench's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


class RequestError(ValueError):
    """An edit request that cannot be run, with a message naming the problem."""


@dataclass(frozen=True)
class Generation:
    """A generated image to drag on (DragDiffusion's generated-image mode, ALGORITHMS.md §2.4):
    the request's prompt sampled with DDIM-50 and classifier-free guidance from ``seed`` at
    ``height`` × ``width`` (None: the model's native size; multiples of 8). The drag starts from
    the generation's own latent at t* (no inversion, no LoRA) and the denoising keeps the
    guidance, so an edit that moves nothing gives back the generated image."""

    seed: int = 0
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None

    def check(self, name: str) -> "Generation":
        """This spec validated (RequestError naming the field)."""
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool) or not 0 <= self.seed < 2 ** 32:
            raise RequestError(f"{name}: generation seed must be an integer in [0, 2^32), got {self.seed!r}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float, np.floating)) or not np.isfinite(g) or g < 1:
            raise RequestError(f"{name}: generation guidance_scale must be a number ≥ 1, got {g!r}")
        if not isinstance(self.negative_prompt, str):
            raise RequestError(f"{name}: generation negative_prompt must be text")
        for k in ("height", "width"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 64 or v % 8):
                raise RequestError(f"{name}: generation {k} must be a multiple of 8, ≥ 64, got {v!r}")
        return self

    def size(self, native: int) -> tuple[int, int]:
        return (self.height or native, self.width or native)


@dataclass
class EditRequest:
    """One edit. image: (H, W, 3) uint8; points: [(x, y), …] pixels alternating handle, target;
    mask: (H, W), nonzero = editable, or None; prompt: the image description (LoRA, inversion,
    drag, denoise); edit_prompt: CLIPDrag's text (defaults to ``prompt``, as the reference GUI);
    hypers: per-edit continuous settings (e.g. ``latent_lr``), so a sweep is a batch; seed: LoRA
    randomness. generation: drag on a generated image instead (``image`` is then None or the
    image that generation gives, which is made again from the spec)."""

    image: np.ndarray | None
    points: Sequence[Sequence[float]]
    prompt: str = ""
    mask: np.ndarray | None = None
    edit_prompt: str | None = None
    name: str = "edit"
    hypers: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    generation: Generation | None = None
    # what reading the image file did (``images.ImageInfo.to_json``: EXIF orientation applied,
    # stored and displayed size), copied into the report's config as "input"
    source: dict | None = None


@dataclass
class EditResult:
    """image (H, W, 3) uint8 at the input size; handles, targets (N, 2) and trajectory (T, N, 2)
    as [x, y] input pixels; iterations = latent updates; reached = every handle within 2
    supervision px of its target; timings in seconds per stage (wall time of the stage for the
    whole batch the edit ran in, compile time reported apart); config: everything that
    determined the result; failure: why the edit failed (then ``image`` is None and no image is
    written), e.g. ``{"diverged": {"iteration": k, "what": "latent"}}``."""

    name: str
    image: np.ndarray
    handles: np.ndarray
    targets: np.ndarray
    initial_handles: np.ndarray
    trajectory: np.ndarray
    iterations: int
    reached: bool
    losses: list[float]
    timings: dict[str, float]
    config: dict[str, Any]
    failure: dict | None = None  # e.g. {"diverged": {"iteration": 3, "what": "latent"}}; image None then
    # DragText §6: [(α, image)], (ẑ, ĉ) and (z*, c) interpolated linearly (α 0 = reconstruction, 1 = the edit)
    interpolation: list = field(default_factory=list)
    # iteration caps: [{"max_iters", "iterations", "reached", "handles", "image"}], each the result of
    # the same edit with max_iters = that cap
    snapshots: list = field(default_factory=list)


MAX_PAIRS = 64


def validate(req: EditRequest) -> EditRequest:
    """Check a request; returns it with the image as uint8 RGB and the mask as a bool array.
    Raises RequestError naming the field, the point or the shapes at fault."""
    name = req.name if isinstance(req.name, str) else repr(req.name)
    img = req.image
    if not isinstance(img, np.ndarray):
        raise RequestError(f"{name}: image must be a numpy array, got {type(img).__name__}")
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise RequestError(f"{name}: image must be (H, W, 3) RGB, got shape {img.shape}")
    img = img[..., :3]
    if img.dtype != np.uint8:
        ok = np.issubdtype(img.dtype, np.floating) and img.size and np.isfinite(img).all() \
            and img.min() >= 0 and img.max() <= 1
        if not ok:
            raise RequestError(f"{name}: image must be uint8 (or finite float in [0, 1]), got {img.dtype}")
        img = (img * 255).astype(np.uint8)
    h, w = img.shape[:2]
    if h < 16 or w < 16:
        raise RequestError(f"{name}: image is {w}×{h}; at least 16×16 is needed")
    if isinstance(req.points, (str, bytes)) or not hasattr(req.points, "__len__"):
        raise RequestError(f"{name}: points must be a list of [x, y] pairs, got {type(req.points).__name__}")
    pts = list(req.points)
    if len(pts) == 0:
        raise RequestError(f"{name}: no points given (need handle, target pairs)")
    if len(pts) % 2:
        raise RequestError(f"{name}: {len(pts)} points given; points alternate handle, target, "
                           f"so their count must be even")
    if len(pts) > 2 * MAX_PAIRS:
        raise RequestError(f"{name}: {len(pts) // 2} point pairs given; at most {MAX_PAIRS} are supported")
    for i, p in enumerate(pts):
        role = f"point {i} ({'handle' if i % 2 == 0 else 'target'} of pair {i // 2})"
        try:
            if isinstance(p, (str, bytes)) or len(p) != 2:
                raise ValueError
            x, y = float(p[0]), float(p[1])
        except (TypeError, ValueError, IndexError, OverflowError):
            raise RequestError(f"{name}: {role} is {p!r}, expected [x, y]") from None
        if not (np.isfinite(x) and np.isfinite(y)):
            raise RequestError(f"{name}: {role} is not finite: {p!r}")
        if not (0 <= x < w and 0 <= y < h):
            raise RequestError(f"{name}: {role} at (x={x:g}, y={y:g}) is outside the {w}×{h} image")
    mask = req.mask
    if mask is not None:
        try:
            mask = np.asarray(mask, dtype=np.float64)
        except (TypeError, ValueError):
            raise RequestError(f"{name}: mask must be a numeric (H, W) array") from None
        if mask.ndim == 3:
            mask = mask[..., 0]
        if mask.shape != (h, w):
            raise RequestError(f"{name}: mask shape {mask.shape} does not match the image ({h}, {w})")
        if not np.isfinite(mask).all():
            raise RequestError(f"{name}: mask has non-finite values")
        mask = mask > 0
    if not isinstance(req.prompt, str):
        raise RequestError(f"{name}: prompt must be a string, got {type(req.prompt).__name__}")
    if req.edit_prompt is not None and not isinstance(req.edit_prompt, str):
        raise RequestError(f"{name}: edit_prompt must be a string, got {type(req.edit_prompt).__name__}")
    if not isinstance(req.hypers, dict):
        raise RequestError(f"{name}: hypers must be a dict, got {type(req.hypers).__name__}")
    if isinstance(req.seed, bool) or not isinstance(req.seed, (int, np.integer)) or not 0 <= req.seed < 2 ** 32:
        raise RequestError(f"{name}: seed must be an integer in [0, 2^32), got {req.seed!r}")
    return EditRequest(image=img, points=[(float(p[0]), float(p[1])) for p in pts], prompt=req.prompt,
                       mask=mask, edit_prompt=req.edit_prompt, name=name, hypers=dict(req.hypers),
                       seed=int(req.seed), generation=req.generation, source=req.source)
