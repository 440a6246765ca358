"""Image handling of the evaluation scripts, reproduced exactly: bilinear resizes as torch's
``F.interpolate(..., mode='bilinear', align_corners=False)`` (as interpolation matrices, so a batch
of images or feature maps is two matmuls), PIL's bilinear resize of the dragged image to the
source size, and OpenAI CLIP's preprocessing (PIL bicubic resize of the short side, centre crop,
normalisation)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

Array = jax.Array

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EvalInputError(ValueError):
    """A sample cannot be evaluated (missing or unreadable file, size mismatch, bad point); the
    message names the file or the point. The runner reports it and goes on with the next sample."""


def read_rgb(path: Path) -> Image.Image:
    """The image at ``path`` as an RGB PIL image (alpha dropped, EXIF orientation applied)."""
    from ..images import read

    return Image.fromarray(read(path, "RGB", error=EvalInputError)[0])


def to_signed(img: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) → float32 in [-1, 1] as the similarity script: ``x / 127.5 − 1``."""
    return np.asarray(img, np.float32) / np.float32(127.5) - np.float32(1.0)


def to_signed_dift(img: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) → float32 in [-1, 1] as the mean-distance script: ``(x / 255 − ½) · 2``
    (differs from ``to_signed`` by at most one float32 ulp)."""
    return (np.asarray(img, np.float32) / np.float32(255.0) - np.float32(0.5)) * np.float32(2.0)


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's 1-D bilinear resize (align_corners=False, no antialias) as two taps per output:
    (i0, i1, w1) with out[i] = (1 − w1[i])·x[i0[i]] + w1[i]·x[i1[i]]. Source coordinate
    s = (i + ½)·n_in/n_out − ½ clamped below at 0, i0 = ⌊s⌋, i1 = min(i0+1, n_in−1), w1 = s − i0 —
    in float32 with s rounded once (a fused multiply-add, as torch's CPU kernel is compiled), so
    the weights agree with torch's bit for bit (checked against torch for up- and downsampling)."""
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    s = (np.float64(scale) * (np.arange(n_out) + 0.5) - 0.5).astype(f32)
    s = np.maximum(s, f32(0.0))
    i0 = np.minimum(s.astype(np.int64), n_in - 1)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, (s - i0.astype(f32)).astype(f32)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix A with A @ x = ``bilinear_taps``' resize of x (for maps that
    are read at a few points or in row chunks, as the mean-distance matching does)."""
    i0, i1, w1 = bilinear_taps(n_in, n_out)
    a = np.zeros((n_out, n_in), np.float32)
    np.add.at(a, (np.arange(n_out), i0), np.float32(1.0) - w1)
    np.add.at(a, (np.arange(n_out), i1), w1)
    return a


def _resize_axis(x: Array, n_out: int, axis: int) -> Array:
    i0, i1, w1 = bilinear_taps(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w1 = jnp.asarray(w1).reshape(shape)
    return (1.0 - w1) * jnp.take(x, jnp.asarray(i0), axis=axis) + w1 * jnp.take(x, jnp.asarray(i1), axis=axis)


def resize_bilinear(x: Array, hw: tuple[int, int]) -> Array:
    """(B, H, W, C) → (B, h, w, C), torch ``F.interpolate`` bilinear, align_corners=False (two taps
    per axis: as cheap as torch's kernel, no dense matrices)."""
    return _resize_axis(_resize_axis(x, hw[0], 1), hw[1], 2)


def pil_resize_to(img: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
    """``img.resize(size, PIL.Image.BILINEAR)``: the MD script's resize of the dragged image to the
    source's (width, height) before feature extraction."""
    return img if img.size == tuple(size_wh) else img.resize(tuple(size_wh), Image.BILINEAR)


def clip_preprocess(img: Image.Image, size: int = 224) -> np.ndarray:
    """OpenAI CLIP's ``preprocess``: short side to ``size`` (bicubic, long side truncated as
    torchvision's ``Resize``), centre crop (offsets rounded as torchvision's ``CenterCrop``),
    [0, 1], normalised with CLIP's mean/std → (size, size, 3) float32."""
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    top = int(round((nh - size) / 2.0))
    left = int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, np.float32) / 255.0
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
