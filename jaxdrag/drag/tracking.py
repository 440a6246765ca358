"""Point tracking by masked nearest-neighbour search (ALGORITHMS.md §2.3, §4.6), for one edit.

The template of handle i is f0_i = F0[⌊p0_i⌋] (features of the original latent at the initial
handle; never updated). The search window is the (2r+1)² integer grid around ⌊p_i⌋; positions
outside the map are excluded (the reference clips the window to the map). The distance is the L1
norm over channels; the new handle is the first minimum in row-major window order (as
``torch.argmin``), in absolute coordinates.

``fast=True`` is CLIPDrag's fast point tracking as the paper states it (eq. 7): only positions
strictly closer to the target than the current handle are candidates. When none is (a handle
cornered at the border, or already on the target) the handle stays put — the reference instead
writes a squared *distance* into the feature-distance window (QUIRK, §4.6) and can jump to the
window's top-left corner when every entry is +∞. Hence fast tracking never increases any
handle-target distance.

Padded point slots (mask False) keep their positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .losses import gather_patch, pad_map, patch_positions

Array = jax.Array


def templates(f0: Array, handles0: Array) -> Array:
    """f0_i = F0[⌊p0_i⌋]: (N, C)."""
    idx = jnp.floor(handles0).astype(jnp.int32)
    return f0[idx[:, 0], idx[:, 1]]


def track(f: Array, tmpl: Array, handles: Array, targets: Array, mask: Array, *, r: int,
          fast: bool = False, hw: Array | None = None) -> Array:
    """New handles (N, 2) float32 from the current feature map f (h_s, w_s, C). ``hw`` (2,) int
    (a masked canvas): the edit's map is f[:h, :w]; the window is clipped to it."""
    h, w = f.shape[:2] if hw is None else (hw[0], hw[1])
    fp = pad_map(f, r)

    def one(p, t, f0, valid):
        win = gather_patch(fp, p, r, r)  # (2r+1, 2r+1, C)
        rows, cols = patch_positions(p, r)
        dist = jnp.sum(jnp.abs(win - f0), axis=-1)
        ok = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        if fast:
            d2 = (rows[:, None] - t[0]) ** 2 + (cols[None, :] - t[1]) ** 2
            cur = jnp.sum((jnp.floor(p) - t) ** 2)
            ok = ok & (d2 < cur)
        dist = jnp.where(ok, dist, jnp.inf)
        k = jnp.argmin(dist.reshape(-1))
        new = jnp.stack([rows[k // (2 * r + 1)], cols[k % (2 * r + 1)]]).astype(p.dtype)
        moved = jnp.any(ok) & valid
        return jnp.where(moved, new, p)

    return jax.vmap(one)(handles, targets, tmpl, mask)
