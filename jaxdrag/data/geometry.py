"""The reference's geometry: the working size an image is edited at, nearest and bilinear
resizing of images and masks, supervision coordinates, and the bucket key that groups edits
that can share a batch.

Internally a handle is (row, col) at the supervision resolution (h_s, w_s) = (⌊H'/2⌋, ⌊W'/2⌋)
of the working image (H', W'), as DragDiffusion does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..models.canvas import nearest_indices  # PyTorch's nearest rule, stated once
from .requests import EditRequest, validate


def working_size(h: int, w: int, width: int | None) -> tuple[int, int]:
    """The reference UI's resize: width → ``width``, height int(width·h/w) (not rounded to 8:
    the networks take any size, as in the reference). ``width=None`` keeps the size."""
    if width is None or width == w:
        return h, w
    return max(16, int(width * h / w)), int(width)


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
