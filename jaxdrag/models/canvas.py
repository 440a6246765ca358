"""Masked canvases: edits of different sizes computed exactly inside one larger array shape.

An edit whose feature map is (h, w) is laid out at the top left of a canvas (H, W) ≥ (h, w); the
cells beyond (h, w) hold anything. A network run on the canvas gives, inside (h, w), the numbers of
the same network run on the (h, w) array alone when every operation that mixes cells sees only the
valid ones:

- a convolution with a kernel larger than 1×1 reads zeros beyond the valid region (what the
  unpadded convolution's zero padding reads) — its input is multiplied by the mask;
- group-norm statistics count valid cells only (``layers.GroupNorm``);
- self-attention gives padded keys no weight (``attention.attention``'s ``key_mask``);
- the UNet's upsamplers, which diffusers drives with the skip connection's size (PyTorch's nearest
  rule ⌊i·n_in/n_out⌋ for odd sizes), gather with per-edit indices instead of a static ×2.

A ``Canvas`` holds, for every spatial shape (H_l, W_l) a network meets, the per-edit valid mask,
and for each UNet upsampler's target shape the per-edit source rows and columns. It is a pytree:
the shapes are static (they pick the level from a feature map's shape), the masks and indices
are traced data, so one compiled program serves every combination of sizes that fits the canvas.
Level shapes must be distinct (true for a canvas whose sides are multiples of 2^levels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@jax.tree_util.register_pytree_node_class
class Canvas:
    """Per-edit valid regions of the feature maps of one batch. ``masks[(H_l, W_l)]``: (B, H_l,
    W_l, 1) float32, 1 inside the edit's valid region; ``ups[(H_l, W_l)]``: ((B, H_l) rows,
    (B, W_l) cols) int32 source indices of the upsampler that produces that shape."""

    def __init__(self, masks: dict, ups: dict | None = None):
        self.masks = dict(masks)
        self.ups = dict(ups or {})

    def tree_flatten(self):
        mk, uk = tuple(self.masks), tuple(self.ups)
        return (tuple(self.masks[k] for k in mk), tuple(self.ups[k] for k in uk)), (mk, uk)

    @classmethod
    def tree_unflatten(cls, aux, children):
        mk, uk = aux
        masks, ups = children
        return cls(dict(zip(mk, masks)), dict(zip(uk, ups)))

    def level(self, hw) -> tuple[int, int]:
        hw = tuple(int(s) for s in hw)
        if hw not in self.masks:
            raise ValueError(f"the canvas has no level of shape {hw} (levels: {sorted(self.masks)})")
        return hw

    def mask(self, x: Array) -> Array:
        """The (B, H, W, 1) mask of the level of NHWC ``x``, in ``x``'s dtype."""
        return self.masks[self.level(x.shape[1:3])].astype(x.dtype)

    def clean(self, x: Array) -> Array:
        """``x`` (B, H, W, C) with zeros beyond each edit's valid region."""
        return x * self.mask(x)

    def key_mask(self, hw) -> Array:
        """(B, H·W) bool: which tokens of the flattened level ``hw`` (row-major) are valid."""
        m = self.masks[self.level(hw)]
        return m.reshape(m.shape[0], -1) > 0

    def upsample(self, x: Array, out_hw) -> Array:
        """Nearest upsampling of NHWC ``x`` to the level ``out_hw`` with each edit's own indices
        (PyTorch's rule for its valid sizes); cells beyond the valid region get some valid value."""
        rows, cols = self.ups[self.level(out_hw)]
        x = jnp.take_along_axis(x, rows[:, :, None, None], axis=1)
        return jnp.take_along_axis(x, cols[:, None, :, None], axis=2)


def _masks(sizes: list[Array], shapes: list[tuple[int, int]]) -> dict:
    out = {}
    for hw, (H, W) in zip(sizes, shapes):
        rows = jnp.arange(H)[None, :] < hw[:, :1]
        cols = jnp.arange(W)[None, :] < hw[:, 1:]
        out[(H, W)] = (rows[:, :, None] & cols[:, None, :]).astype(jnp.float32)[..., None]
    return out


def _check(hw: Array, canvas_hw, levels: int, what: str) -> Array:
    H, W = (int(s) for s in canvas_hw)
    if H % (1 << levels) or W % (1 << levels):
        raise ValueError(f"{what} canvas {H}×{W}: both sides must be multiples of {1 << levels}")
    hw = jnp.asarray(hw, jnp.int32)
    if hw.ndim != 2 or hw.shape[1] != 2:
        raise ValueError(f"{what} sizes: expected (B, 2) (h, w) per edit, got shape {hw.shape}")
    if not isinstance(hw, jax.core.Tracer):
        a = np.asarray(hw)
        if (a < 1).any() or (a[:, 0] > H).any() or (a[:, 1] > W).any():
            raise ValueError(f"{what} sizes {a.tolist()} do not fit the canvas {H}×{W}")
    return hw


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """PyTorch ``F.interpolate(mode="nearest")`` source indices for static sizes: (n_out,) int64
    min(⌊i·(n_in/n_out)⌋, n_in − 1), the scale computed in float32 as PyTorch does. The one
    statement of the rule for fixed shapes (``layers.nearest_resize``, ``data.geometry``);
    ``nearest_sources`` is the same rule for per-edit (traced) sizes."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def nearest_sources(n_in: Array, n_out: Array, length: int) -> Array:
    """PyTorch's nearest source indices min(⌊i·(n_in/n_out)⌋, n_in − 1) in float32, for i < length
    and per-edit sizes n_in, n_out (B,) → (B, length) int32 (i ≥ n_out: clamped, unused)."""
    scale = n_in.astype(jnp.float32) / n_out.astype(jnp.float32)
    src = jnp.floor(jnp.arange(length, dtype=jnp.float32)[None, :] * scale[:, None]).astype(jnp.int32)
    return jnp.minimum(src, n_in[:, None] - 1)


def unet_canvas(latent_hw, canvas_hw, levels: int = 3) -> Canvas:
    """The canvas of a UNet with ``levels`` stride-2 downsamplers (3 for SD-1.5): per-edit latent
    sizes ``latent_hw`` (B, 2) int in a canvas ``canvas_hw`` (sides multiples of 2^levels). A
    3×3/stride-2/padding-1 downsampler maps h to ⌈h/2⌉; each upsampler goes back to the skip's size."""
    hw = _check(latent_hw, canvas_hw, levels, "latent")
    H, W = (int(s) for s in canvas_hw)
    sizes, shapes = [hw], [(H, W)]
    for _ in range(levels):
        sizes.append((sizes[-1] + 1) // 2)
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    ups = {}
    for lo in range(levels):  # level lo+1 → level lo
        (Hl, Wl), small, big = shapes[lo], sizes[lo + 1], sizes[lo]
        ups[(Hl, Wl)] = (nearest_sources(small[:, 0], big[:, 0], Hl), nearest_sources(small[:, 1], big[:, 1], Wl))
    return Canvas(_masks(sizes, shapes), ups)


def edit_canvas(size, rows: int, canvas_hw, levels: int = 3) -> Canvas | None:
    """The UNet canvas of ``rows`` batch rows that all hold one edit whose latent is ``size``
    ((2,) or longer: the first two entries are (h, w)); None without a size (no canvas)."""
    if size is None:
        return None
    return unet_canvas(jnp.broadcast_to(size[:2], (rows, 2)), canvas_hw, levels)


def encoder_canvas(image_hw, canvas_hw, levels: int = 3) -> Canvas:
    """The canvas of the VAE encoder: image sizes (B, 2) in pixels in an image canvas whose sides
    are multiples of 2^levels; each (0, 1)-padded stride-2 downsampler maps h to ⌊h/2⌋."""
    hw = _check(image_hw, canvas_hw, levels, "image")
    H, W = (int(s) for s in canvas_hw)
    sizes, shapes = [hw], [(H, W)]
    for _ in range(levels):
        sizes.append(sizes[-1] // 2)
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    return Canvas(_masks(sizes, shapes))


def decoder_canvas(latent_hw, canvas_hw, levels: int = 3) -> Canvas:
    """The canvas of the VAE decoder: latent sizes (B, 2) in a latent canvas; each ×2 nearest
    upsampler doubles the valid region (the decoded image is 2^levels × the latent)."""
    hw = _check(latent_hw, canvas_hw, 0, "latent")
    H, W = (int(s) for s in canvas_hw)
    sizes, shapes = [hw], [(H, W)]
    for _ in range(levels):
        sizes.append(sizes[-1] * 2)
        shapes.append((shapes[-1][0] * 2, shapes[-1][1] * 2))
    return Canvas(_masks(sizes, shapes))


def bilinear_matrix(n_in, n_out, length_in: int, length_out: int) -> Array:
    """(length_out, length_in) float32 weights of PyTorch's bilinear resize along one axis
    (``align_corners=False``, no antialiasing) from ``n_in`` to ``n_out`` samples, which may be
    traced (a masked canvas's per-edit sizes): source s = max((i + ½)·n_in/n_out − ½, 0), weights
    1 − frac(s) at ⌊s⌋ and frac(s) at min(⌊s⌋ + 1, n_in − 1). Rows i ≥ n_out are zero."""
    n_in = jnp.asarray(n_in, jnp.int32)
    n_out = jnp.asarray(n_out, jnp.int32)
    scale = n_in.astype(jnp.float32) / n_out.astype(jnp.float32)
    i = jnp.arange(length_out, dtype=jnp.float32)
    src = jnp.maximum((i + 0.5) * scale - 0.5, 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), n_in - 1)
    i1 = jnp.minimum(i0 + 1, n_in - 1)
    l1 = src - i0.astype(jnp.float32)
    cols = jnp.arange(length_in, dtype=jnp.int32)[None, :]
    m = ((1.0 - l1)[:, None] * (cols == i0[:, None]) + l1[:, None] * (cols == i1[:, None]))
    return jnp.where((jnp.arange(length_out) < n_out)[:, None], m, 0.0).astype(jnp.float32)


def crop(x: Array | np.ndarray, hw) -> np.ndarray:
    """The valid (h, w) top-left region of one edit's NHWC-less (H, W, …) array."""
    return np.asarray(x)[: int(hw[0]), : int(hw[1])]
