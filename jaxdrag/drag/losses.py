"""Pure loss functions of the drag engine (ALGORITHMS.md §2.2, §3.3, §4.3–4.4), for one edit.

Conventions (one edit; the loop ``vmap``s over edits):
  F        (h_s, w_s, C) feature map at supervision resolution ("F(z)" in the papers)
  points   (N, 2) float32 (row, col) in supervision pixels, integer-valued for handles
  mask     (N,) bool: which of the N (padded) point slots hold a real pair
  z, eps   (h, w, 4) latent and the UNet's ε for it
Static shapes throughout: a patch of radius r is always (2r+1)², with a validity mask instead of
PyTorch's clipped slices.

Border behaviour (the reference crashes when a shifted patch leaves the map, and clips the
unshifted patch): a patch pixel counts iff its reference position is inside the map and its
(sub-pixel) sample position lies inside [0, h_s−1]×[0, w_s−1]. The loss of a pair is
``weight · mean over counted pixels and channels of |A − B|``; in the interior every pixel counts
and this is exactly the reference's ``(2r+1)²·mean|A − B|``. Pixels that do not count receive no
gradient. A handle is always inside the map and moves towards an in-map target, so its centre
pixel always counts.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..models.canvas import bilinear_matrix

Array = jax.Array

STOP_DISTANCE = 2.0  # pairs closer than this are skipped; all closer → the edit is done


@jax.custom_jvp
def l1(x: Array) -> Array:
    """|x| with PyTorch's subgradient sign(x) (0 at 0). ``jnp.abs`` differentiates to 1 at 0, which
    matters here: at the first iteration Φ(z) − Φ(z*) and ĉ − c are exactly 0, and a gradient of
    ±1 there would push every background latent and every regularised text entry by a full step."""
    return jnp.abs(x)


@l1.defjvp
def _l1_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.abs(x), jnp.sign(x) * t


def upsample_features(f_lat: Array, sup_hw: tuple[int, int], sizes: Array | None = None) -> Array:
    """Bilinear resize (h, w, C) → (h_s, w_s, C) with half-pixel centres, i.e. PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)`` for upsampling.

    ``sizes`` (4,) int (a masked canvas): the edit's valid feature size and supervision size
    (h_f, w_f, h_s', w_s') inside the canvas shapes ``f_lat.shape[:2]`` and ``sup_hw``; the result
    holds the edit's resize at the top left and zeros beyond."""
    if sizes is not None:
        ry = bilinear_matrix(sizes[0], sizes[2], f_lat.shape[0], sup_hw[0])
        rx = bilinear_matrix(sizes[1], sizes[3], f_lat.shape[1], sup_hw[1])
        hi = jax.lax.Precision.HIGHEST
        f = jnp.einsum("sh,hwc->swc", ry, f_lat.astype(jnp.float32), precision=hi)
        return jnp.einsum("tw,swc->stc", rx, f, precision=hi).astype(f_lat.dtype)
    if f_lat.shape[:2] == tuple(sup_hw):
        return f_lat
    return jax.image.resize(f_lat, (sup_hw[0], sup_hw[1], f_lat.shape[-1]), method="linear",
                            antialias=False)


def map_sizes(sizes: Array | None, f_shape, z_shape) -> Array | None:
    """The ``upsample_features`` sizes (h_f, w_f, h_s, w_s) of a feature map of canvas shape
    ``f_shape`` (H/k, W/k, C) taken from a latent canvas ``z_shape`` (H, W, 4), for an edit of
    ``sizes`` = (h, w, h_s, w_s): the UNet's level k = H/H_f holds ⌈h/k⌉ valid rows (each
    stride-2 downsampler rounds up). None stays None (no canvas)."""
    if sizes is None:
        return None
    kh, kw = z_shape[0] // f_shape[0], z_shape[1] // f_shape[1]
    if kh * f_shape[0] != z_shape[0] or kw * f_shape[1] != z_shape[1]:
        raise ValueError(f"a feature map of {f_shape[:2]} is not a UNet level of the latent canvas {z_shape[:2]}")
    return jnp.stack([-(-sizes[0] // kh), -(-sizes[1] // kw), sizes[2], sizes[3]])


def pad_map(f: Array, pad: int) -> Array:
    """Zero-pad a (h, w, C) map by ``pad`` on each spatial side (padded values are never counted)."""
    return jnp.pad(f, ((pad, pad), (pad, pad), (0, 0)))


def _window(fp: Array, top: Array, left: Array, size: int, pad: int) -> Array:
    """(size, size, C) window of a padded map whose top-left is at unpadded (top, left)."""
    return jax.lax.dynamic_slice(fp, (top + pad, left + pad, 0), (size, size, fp.shape[-1]))


def _in_range(coord: Array, n: int) -> Array:
    return (coord >= 0) & (coord <= n - 1)


def patch_positions(center: Array, r: int) -> tuple[Array, Array]:
    """Rows (2r+1,) and cols (2r+1,) of the integer patch Ω(center, r) (center floored)."""
    c = jnp.floor(center).astype(jnp.int32)
    off = jnp.arange(-r, r + 1, dtype=jnp.int32)
    return c[0] + off, c[1] + off


def gather_patch(fp: Array, center: Array, r: int, pad: int) -> Array:
    """F[Ω(center, r)] as (2r+1, 2r+1, C) from the padded map ``fp``."""
    c = jnp.floor(center).astype(jnp.int32)
    return _window(fp, c[0] - r, c[1] - r, 2 * r + 1, pad)


def shifted_patch(fp: Array, center: Array, d: Array, r: int, pad: int) -> Array:
    """F sampled bilinearly at Ω(center, r) + d, with one set of four weights for the whole patch
    (d is shared by all patch pixels), from the padded map ``fp``. Returns (2r+1, 2r+1, C).

    Weights come from frac(d) (floor-based, so negative shifts work), as the reference computes
    them from the fractional part of (patch origin + d) with an integer origin."""
    c = jnp.floor(center).astype(jnp.int32)
    fl = jnp.floor(d)
    base = c - r + fl.astype(jnp.int32)
    fy, fx = (d - fl)[0], (d - fl)[1]
    w = _window(fp, base[0], base[1], 2 * r + 2, pad)
    return ((1 - fy) * (1 - fx) * w[:-1, :-1] + (1 - fy) * fx * w[:-1, 1:]
            + fy * (1 - fx) * w[1:, :-1] + fy * fx * w[1:, 1:])


def step_vectors(handles: Array, targets: Array, max_step) -> tuple[Array, Array]:
    """d_i = unit(t_i − p_i) · min(max_step, ‖t_i − p_i‖) and the distances ‖t_i − p_i‖.

    max_step = 1 gives DragDiffusion's unit step (pairs closer than 2 are skipped anyway);
    max_step = 4 gives the clipped step of CLIPDrag/GoodDrag."""
    diff = targets - handles
    dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
    unit = diff / jnp.maximum(dist, 1e-12)[:, None]
    return unit * jnp.minimum(max_step, dist)[:, None], dist


def reference_patches(f0: Array, points: Array, r: int) -> Array:
    """F0[Ω(p0_i, r)] for every point: (N, 2r+1, 2r+1, C), the fixed targets of the
    information-preserving motion supervision (computed once per edit)."""
    fp = pad_map(f0, r)
    return jax.vmap(lambda p: gather_patch(fp, p, r, r))(points)


def motion_supervision(f: Array, handles: Array, targets: Array, mask: Array, *, r: int,
                       max_step: float, weight: float | None = None,
                       ref_patches: Array | None = None, ref_points: Array | None = None,
                       hw: Array | None = None) -> Array:
    """Σ_i over active pairs of weight · mean_{counted Ω, c} |A_i − B_i|  (scalar).

    B_i = f sampled at Ω(handles_i, r) + d_i (gradient flows through B only).
      DragDiffusion (``ref_patches=None``): A_i = stopgrad(f[Ω(handles_i, r)]), the current
        features at the current handle; max_step = 1 (a unit step).
      CLIPDrag / GoodDrag ("information-preserving"): A_i = ``ref_patches[i]`` = F0[Ω(p0_i, r)],
        the original latent's features at the initial handle ``ref_points[i]``; max_step = 4.
    Active: mask_i and ‖t_i − p_i‖ ≥ 2. weight defaults to (2r+1)² (GoodDrag uses (2r)²).
    ``hw`` (2,) int (a masked canvas): the edit's map is f[:h, :w]; the border rules use it.
    """
    h, w = f.shape[:2] if hw is None else (hw[0], hw[1])
    weight = float((2 * r + 1) ** 2) if weight is None else weight
    pad = r + math.ceil(max_step) + 2
    fp = pad_map(f, pad)
    d, dist = step_vectors(handles, targets, max_step)
    active = mask & (dist >= STOP_DISTANCE)
    if ref_patches is None:
        ref_patches = jax.vmap(lambda p: gather_patch(fp, p, r, pad))(handles)
        ref_points = handles
    ref_patches = jax.lax.stop_gradient(ref_patches)

    def pair(p, q, di, a):
        b = shifted_patch(fp, p, di, r, pad)
        rows_q, cols_q = patch_positions(q, r)
        rows_p, cols_p = patch_positions(p, r)
        ok = ((_in_range(rows_q, h) & _in_range(rows_p.astype(d.dtype) + di[0], h))[:, None]
              & (_in_range(cols_q, w) & _in_range(cols_p.astype(d.dtype) + di[1], w))[None, :])
        dist = jnp.mean(l1(a - b), axis=-1)  # channel-mean L1, (2r+1, 2r+1)
        return weight * jnp.sum(jnp.where(ok, dist, 0.0)) / jnp.maximum(jnp.sum(ok), 1)

    per_pair = jax.vmap(pair)(handles, ref_points, d, ref_patches)
    return jnp.sum(jnp.where(active, per_pair, 0.0))


def background_loss(dphi: Array, keep: Array, lam) -> Array:
    """λ · Σ |Φ(z) − Φ(z*)| ⊙ keep over the whole latent (a sum, not a mean: λ is tuned to it).

    dphi = Φ(z) − Φ(z*). The DDIM step Φ is linear in (z, ε), so callers form it as
    Φ(z − z*, ε − ε*): exactly 0 wherever z and ε are unchanged (as in PyTorch, where the two Φ
    happen to be bit-identical), instead of rounding noise whose L1 subgradient would be ±1.
    keep: (h, w, 1) = 1 − mask at latent resolution where the user drew a mask, and all zeros
    when no mask was drawn (the reference then skips the term entirely)."""
    return lam * jnp.sum(l1(dphi) * keep)


def background_weight(cfg, lam, latent: Array, hw: Array | None = None):
    """λ for ``background_loss``: as given for the sum reduction (DragDiffusion, GoodDrag, DragNoise,
    CLIPDrag), λ / (number of latent entries) for FreeDrag's mean (``cfg.bg_reduction == "mean"``);
    ``hw`` (2,) int: the edit's valid latent size in a masked canvas (its entries are counted)."""
    if cfg.bg_reduction != "mean":
        return lam
    n = latent.size if hw is None else hw[0] * hw[1] * latent.shape[-1]
    return lam / n


def text_regularizer(c: Array, c0: Array, token_mask: Array, lam_text) -> Array:
    """DragText's λ_t · Σ_{j<P, d} |ĉ_jd − c_jd|: L1 sum over BOS + prompt tokens.
    token_mask: (77,) float, 1 for the first P positions."""
    return lam_text * jnp.sum(l1(c - c0) * token_mask[:, None])


def clip_loss(image_embed: Array, text_embed: Array, coef) -> Array:
    """CLIPDrag's global loss κ·(1 − cos(e_I, e_T)) (both embeddings any scale)."""
    ei = image_embed / jnp.linalg.norm(image_embed)
    et = text_embed / jnp.linalg.norm(text_embed)
    return coef * (1.0 - jnp.dot(ei, et))
