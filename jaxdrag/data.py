"""Edits in and results out: requests and their validation, the reference's geometry (working size,
supervision coordinates, mask resizing), bucketing, the DragBench and Drag100 readers, and atomic
result writing (edited image, overlay, JSON report).

Coordinates: users give points as [x, y] pixels of *their* image, alternating handle, target
(DragBench's convention). Internally a handle is (row, col) at the supervision resolution
(h_s, w_s) = (⌊H'/2⌋, ⌊W'/2⌋) of the working image (H', W'), as DragDiffusion does.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw


class RequestError(ValueError):
    """An edit request that cannot be run, with a message naming the problem."""


# ----------------------------------------------------------------------------------------------
# requests and results


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


def working_size(h: int, w: int, width: int | None) -> tuple[int, int]:
    """The reference UI's resize: width → ``width``, height int(width·h/w) (not rounded to 8:
    the networks take any size, as in the reference). ``width=None`` keeps the size."""
    if width is None or width == w:
        return h, w
    return max(16, int(width * h / w)), int(width)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch ``F.interpolate(mode="nearest")`` source indices: ⌊i·n_in/n_out⌋ (float32)."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def resize_nearest(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return a[nearest_indices(a.shape[0], hw[0])][:, nearest_indices(a.shape[1], hw[1])]


@dataclass
class Prepared:
    """A validated request in the working geometry."""

    request: EditRequest
    image: np.ndarray       # (H', W', 3) float32 in [-1, 1]
    lora_image: np.ndarray  # shorter side = native size, float32 in [-1, 1] (LoRA training data)
    handles: np.ndarray     # (N, 2) (row, col) supervision px
    targets: np.ndarray     # (N, 2)
    keep: np.ndarray        # (h, w, 1) background weight (1 − mask at latent res; zeros if no mask)
    sup_hw: tuple[int, int]
    latent_hw: tuple[int, int]
    in_hw: tuple[int, int]
    z_start: np.ndarray | None = None  # generated images: the generation's latent at t* (no inversion)

    @property
    def masked(self) -> bool:
        """A mask was drawn (nonzero somewhere)."""
        return self.request.mask is not None and bool(np.any(self.request.mask))

    def to_pixels(self, rc: np.ndarray) -> np.ndarray:
        """(…, 2) (row, col) supervision px → (…, 2) [x, y] input pixels."""
        h, w = self.in_hw
        rc = np.asarray(rc, np.float64)
        return np.stack([rc[..., 1] * w / self.sup_hw[1], rc[..., 0] * h / self.sup_hw[0]], axis=-1)


def _resize_image(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == tuple(hw):
        return img
    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.BILINEAR))


def prepare(req: EditRequest, width: int | None, native: int) -> Prepared:
    """Validate and map a request to the working geometry (ALGORITHMS.md §1.1):
    resize to ``width`` (the model's native width by default), supervision resolution
    (⌊H'/2⌋, ⌊W'/2⌋), points p = round(y·h_s/H, x·w_s/W), the mask binarised and resized with
    nearest to (h_s, w_s) then to the latent size (H'//8, W'//8)."""
    req = validate(req)
    h, w = req.image.shape[:2]
    hh, ww = working_size(h, w, width)
    img = _resize_image(req.image, (hh, ww))
    sup = (hh // 2, ww // 2)
    lat = (hh // 8, ww // 8)
    pts = np.asarray(req.points, np.float64)
    rc = np.stack([np.round(pts[:, 1] * sup[0] / h), np.round(pts[:, 0] * sup[1] / w)], axis=-1)
    rc = np.clip(rc, 0, [sup[0] - 1, sup[1] - 1]).astype(np.float32)
    if req.mask is not None and np.any(req.mask):
        m = resize_nearest(req.mask.astype(np.float32), (hh, ww))
        m = resize_nearest(resize_nearest(m, sup), lat)
        keep = (1.0 - m)[..., None].astype(np.float32)
    else:
        keep = np.zeros(lat + (1,), np.float32)
    # LoRA data: torchvision Resize(native) on the shorter side (then random native crops)
    lora_hw = (native, int(native * ww / hh)) if hh <= ww else (int(native * hh / ww), native)
    lora_img = _resize_image(img, lora_hw)
    return Prepared(request=req, image=img.astype(np.float32) / 127.5 - 1.0,
                    lora_image=lora_img.astype(np.float32) / 127.5 - 1.0,
                    handles=rc[0::2], targets=rc[1::2], keep=keep, sup_hw=sup, latent_hw=lat, in_hw=(h, w))


def bucket_key(p: Prepared) -> tuple:
    """Edits with equal keys run in one batch: same working shape."""
    return (p.image.shape[:2],)


# ----------------------------------------------------------------------------------------------
# datasets


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle that references a global outside the allowed numpy/plain-type set."""


class SafeUnpickler(pickle.Unpickler):
    """Loads only plain Python types and numpy arrays: any other global (a class, a function —
    the way a pickle runs code) is refused with UnpicklingError naming it."""

    _NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._NUMPY:
            if name == "_reconstruct":
                from numpy._core.multiarray import _reconstruct
                return _reconstruct
            if name == "scalar":
                from numpy._core.multiarray import scalar
                return scalar
            return getattr(np, name)
        raise ForbiddenGlobal(f"global '{module}.{name}' is not allowed (only numpy arrays and plain "
                              f"types)")


def safe_load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f).load()
    except ForbiddenGlobal as e:
        raise RequestError(f"{path}: refused: {e}") from None
    except Exception as e:  # truncated / corrupt pickles raise many types
        raise RequestError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def read_image(path: Path, mode: str = "RGB") -> tuple[np.ndarray, dict]:
    """(pixels, what reading did) of an input image, EXIF orientation applied (``images.read``);
    a failure is a one-line ``RequestError`` naming the file."""
    from .images import read

    arr, info = read(path, mode, error=RequestError)
    return arr, info.to_json()


@dataclass
class Sample:
    """A dataset entry; ``load()`` reads and checks it (errors are per sample)."""

    name: str
    folder: Path
    kind: str

    def load(self) -> EditRequest:
        if self.kind == "dragbench":
            meta = safe_load_pickle(self.folder / "meta_data.pkl")
            if not isinstance(meta, dict) or not {"prompt", "points", "mask"} <= set(meta):
                raise RequestError(f"{self.folder / 'meta_data.pkl'}: expected a dict with prompt, "
                                   f"points and mask")
            img, src = read_image(self.folder / "original_image.png")
            if not isinstance(meta["prompt"], str):
                raise RequestError(f"{self.folder / 'meta_data.pkl'}: prompt must be a string, got "
                                   f"{type(meta['prompt']).__name__}")
            if not isinstance(meta["mask"], np.ndarray):
                raise RequestError(f"{self.folder / 'meta_data.pkl'}: mask must be an array, got "
                                   f"{type(meta['mask']).__name__}")
            return EditRequest(image=img, points=meta["points"], prompt=meta["prompt"], mask=meta["mask"],
                               name=self.name, source=src)
        if self.kind == "drag100":
            try:
                pts = json.loads((self.folder / "points.json").read_text())["points"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise RequestError(f"{self.folder / 'points.json'}: cannot read points ({e})") from None
            img, src = read_image(self.folder / "original.jpg")
            mask = None
            if (self.folder / "mask.png").exists():
                mask = read_image(self.folder / "mask.png", "L")[0]
            return EditRequest(image=img, points=pts, prompt="", mask=mask, name=self.name, source=src)
        raise RequestError(f"{self.folder}: unknown sample kind {self.kind!r}")


def find_samples(root: str | Path) -> list[Sample]:
    """DragBench (``<category>/<sample>/meta_data.pkl`` + ``original_image.png``) or Drag100
    (``<sample>/points.json`` + ``original.jpg``) layout, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise RequestError(f"{root}: not a folder")
    bench = sorted(p.parent for p in root.glob("*/*/meta_data.pkl"))
    if bench:
        return [Sample(str(p.relative_to(root)), p, "dragbench") for p in bench]
    d100 = sorted(p.parent for p in root.glob("*/points.json"))
    if d100:
        return [Sample(str(p.relative_to(root)), p, "drag100") for p in d100]
    raise RequestError(f"{root}: neither DragBench (*/*/meta_data.pkl) nor Drag100 (*/points.json) layout")


# ----------------------------------------------------------------------------------------------
# writing results


def _atomic_write(path: Path, data: bytes) -> None:
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


def _png(img: np.ndarray) -> bytes:
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
        _atomic_write(folder / "report.json", json.dumps(report(result), indent=1).encode())
        return
    _atomic_write(folder / "edited.png", _png(result.image))
    ov = overlay(result.image, result.initial_handles, result.handles, result.targets, result.trajectory)
    _atomic_write(folder / "overlay.png", _png(ov))
    if result.interpolation:
        _atomic_write(folder / "interpolation.png",
                      _png(strip([im for _, im in result.interpolation], [f"alpha {a:g}" for a, _ in result.interpolation])))
    for sn in result.snapshots:
        if sn["image"] is not None:
            _atomic_write(folder / "snapshots" / f"iters_{sn['max_iters']:04d}.png", _png(sn["image"]))
    _atomic_write(folder / "report.json", json.dumps(report(result), indent=1).encode())


def is_done(folder: Path) -> bool:
    try:
        json.loads((Path(folder) / "report.json").read_text())
        return (Path(folder) / "edited.png").exists()
    except (OSError, ValueError):
        return False


def write_json(path: Path, obj) -> None:
    _atomic_write(Path(path), json.dumps(obj, indent=1).encode())
