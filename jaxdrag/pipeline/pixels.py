"""Pixel-space helpers of the pipeline: CLIP preprocessing (adaptive average pooling to the CLIP
input, normalisation), bilinear resizing, uint8 conversion, pytree sizes."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from ..models.canvas import bilinear_matrix



Array = jax.Array

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


# ----------------------------------------------------------------------------------------------
# small pure helpers


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree (arrays or shape/dtype structs)."""
    return int(sum(np.prod(np.shape(x)) * jnp.result_type(x).itemsize for x in jax.tree.leaves(tree)))


def _pool_weights(xp, n_in, n_out: int, length_in: int):
    """PyTorch's ``AdaptiveAvgPool`` rule in array module ``xp`` (numpy or jax.numpy): for input
    sizes ``n_in`` (B,) int, (B, n_out, length_in) float32 whose row i averages the inputs
    [⌊i·n_in/n_out⌋, ⌈(i+1)·n_in/n_out⌉), zero beyond each n_in."""
    n_in = xp.asarray(n_in, xp.int32)[:, None, None]
    i = xp.arange(n_out, dtype=xp.int32)[None, :, None]
    j = xp.arange(length_in, dtype=xp.int32)[None, None, :]
    a = (i * n_in) // n_out
    b = -((-(i + 1) * n_in) // n_out)
    return xp.where((j >= a) & (j < b), xp.float32(1.0) / (b - a).astype(xp.float32), xp.float32(0.0))


def pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 averaging matrix of PyTorch's ``AdaptiveAvgPool`` along one axis
    (static sizes)."""
    return _pool_weights(np, [n_in], n_out, n_in)[0]


def pool_matrices(n_in: Array, n_out: int, length_in: int) -> Array:
    """``pool_matrix`` for per-edit input sizes ``n_in`` (B,) (traced: a masked canvas) inside
    ``length_in`` samples: (B, n_out, length_in), zero beyond each edit's n_in."""
    return _pool_weights(jnp, n_in, n_out, length_in)


def adaptive_avg_pool(images: Array, size: int, valid_hw: Array | None = None) -> Array:
    """(B, H, W, C) → (B, size, size, C), exactly ``nn.AdaptiveAvgPool2d(size)``; ``valid_hw``
    (B, 2): each image is its top-left (h, w) region (a masked canvas)."""
    hi = jax.lax.Precision.HIGHEST
    if valid_hw is not None:
        ph = pool_matrices(valid_hw[:, 0], size, images.shape[1])
        pw = pool_matrices(valid_hw[:, 1], size, images.shape[2])
        return jnp.einsum("boh,bhwc,bpw->bopc", ph, images.astype(jnp.float32), pw, precision=hi)
    ph = jnp.asarray(pool_matrix(images.shape[1], size))
    pw = jnp.asarray(pool_matrix(images.shape[2], size))
    return jnp.einsum("oh,bhwc,pw->bopc", ph, images.astype(jnp.float32), pw, precision=hi)


def clip_pixels(images: Array, size: int, double_unit_map: bool = False, valid_hw: Array | None = None) -> Array:
    """CLIPDrag's differentiable CLIP preprocessing: [-1, 1] images (B, H, W, 3) →
    clamp((x+1)/2, 0, 1) → AdaptiveAvgPool to (size, size) → CLIP normalisation.
    ``double_unit_map`` reproduces the reference's second (x+1)/2 mapping of the already-[0, 1]
    image (QUIRK, ALGORITHMS.md §4.4). ``valid_hw`` (B, 2): see ``adaptive_avg_pool``."""
    x = jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    x = adaptive_avg_pool(x, size, valid_hw)
    if double_unit_map:
        x = (x + 1.0) / 2.0
    return (x - CLIP_MEAN) / CLIP_STD


def bilinear_resize(images: Array, hw: tuple[int, int]) -> Array:
    """(B, H, W, C) → (B, h, w, C), PyTorch ``F.interpolate(mode="bilinear",
    align_corners=False)`` without antialiasing (used on the decoded image)."""
    b, _, _, c = images.shape
    if images.shape[1:3] == tuple(hw):
        return images
    return jax.image.resize(images, (b, hw[0], hw[1], c), method="linear", antialias=False)


def bilinear_resize_each(images: Array, in_hw: Array, out_hw: Array, shape: tuple[int, int]) -> Array:
    """``bilinear_resize`` of each image of a masked canvas: image b's top-left ``in_hw[b]``
    region of ``images`` (B, H, W, C) resized to ``out_hw[b]`` at the top left of (B, *shape, C),
    zeros beyond (per-edit weight matrices: the sizes are traced)."""
    ry = jax.vmap(lambda a, b: bilinear_matrix(a, b, images.shape[1], shape[0]))(in_hw[:, 0], out_hw[:, 0])
    rx = jax.vmap(lambda a, b: bilinear_matrix(a, b, images.shape[2], shape[1]))(in_hw[:, 1], out_hw[:, 1])
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("bsh,bhwc->bswc", ry, images.astype(jnp.float32), precision=hi)
    return jnp.einsum("btw,bswc->bstc", rx, x, precision=hi)


def to_uint8(images: Array) -> Array:
    """[-1, 1] → uint8 as the reference: clamp((x+1)/2, 0, 1)·255, truncated (not rounded)."""
    return (jnp.clip((images + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(jnp.uint8)


