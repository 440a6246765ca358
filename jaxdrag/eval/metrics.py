"""DragBench's metrics as pure functions (ALGORITHMS.md §9.2, GoodDrag §5.3).

Coordinates: points are (x, y) in full-resolution pixels of the source image, as in
``meta_data.pkl`` / ``points.json``; feature maps are (h, w, C), images (H, W, 3).

- ``lpips_224``: LPIPS-AlexNet of two [-1, 1] images after resizing both to 224×224 (bilinear,
  align_corners False), as ``run_eval_similarity.py``.
- ``dift_features``: DIFT on SD-2.x (``run_eval_point_matching.py`` + ``dift_sd.py``): the image
  encoded once, E posterior samples × scaling factor, ``add_noise`` at t, the UNet with the
  sample's prompt embedding, the output of ``up_blocks[up_index]`` averaged over the E samples.
- ``match_distances``: each handle's feature (the source features upsampled to full resolution,
  read at the handle) against the upsampled dragged features by cosine similarity; the distance of
  the argmax (row, col) to the target.
- ``clip_cosine``: cosine of two CLIP image embeddings.
- ``dai``: GoodDrag's Drag Accuracy Index.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .image import bilinear_matrix, resize_bilinear

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
COS_EPS = 1e-8  # torch.nn.CosineSimilarity's eps


def lpips_224(lpips_fn, x0: Array, x1: Array) -> Array:
    """x0, x1: (B, H, W, 3) in [-1, 1] (any H, W; the two may differ) → (B,) LPIPS after both are
    resized to 224×224. ``lpips_fn(a, b)`` is ``models.alexnet.LPIPS``'s call."""
    return lpips_fn(resize_bilinear(x0, (224, 224)), resize_bilinear(x1, (224, 224)))


def dift_features(unet_fn, encode_fn, images: Array, context: Array, eps_posterior: Array,
                  eps_noise: Array, *, alpha_t: Array, t: int, scaling: float, up_index: int) -> Array:
    """DIFT features, averaged over an ensemble of E noise draws.

    images: (B, H, W, 3) in [-1, 1]; context: (B, S, D) prompt embeddings (no CFG);
    eps_posterior, eps_noise: (B, E, h, w, 4) standard normal (VAE posterior sample and
    ``add_noise``'s noise); alpha_t: ᾱ_t (float32 scalar); ``encode_fn(x) → (mean, logvar)``;
    ``unet_fn(z, t, ctx) → (B·E, h', w', C)`` the tapped up block → (B, h', w', C) float32.

    The reference repeats the image E times before the (deterministic) encoder; encoding it once
    and drawing E posterior samples is the same computation with 1/E of the VAE's work.
    """
    b, e = eps_noise.shape[:2]
    mean, logvar = encode_fn(images)
    std = jnp.exp(0.5 * logvar)
    z = (mean[:, None] + std[:, None] * eps_posterior) * scaling
    zt = jnp.sqrt(alpha_t) * z + jnp.sqrt(1.0 - alpha_t) * eps_noise
    ctx = jnp.repeat(context, e, axis=0)
    f = unet_fn(zt.reshape((b * e,) + zt.shape[2:]), jnp.full((b * e,), t, jnp.int32), ctx)
    f = f.astype(jnp.float32).reshape((b, e) + f.shape[1:])
    return jnp.mean(f, axis=1)


def _unit(v: Array) -> Array:
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), COS_EPS)


@functools.partial(jax.jit, static_argnames=("hw", "rows"))
def match_distances(f_src: Array, f_drag: Array, handles: Array, targets: Array, *,
                    hw: tuple[int, int], rows: int = 64) -> tuple[Array, Array]:
    """f_src, f_drag: (h, w, C) features of the source and dragged image; handles, targets: (P, 2)
    int (x, y) at full resolution ``hw`` = (H, W) → (distances (P,) in pixels, matched (P, 2)
    (x, y)).

    Both maps are upsampled bilinearly to (H, W) (align_corners False) as the reference does; the
    dragged map is processed ``rows`` full-resolution rows at a time, so the (H, W, C) map is
    never held whole. Ties in the argmax resolve to the first pixel in row-major order, as
    ``np.argmax``."""
    big_h, big_w = hw
    ah = jnp.asarray(bilinear_matrix(f_src.shape[0], big_h))
    aw = jnp.asarray(bilinear_matrix(f_src.shape[1], big_w))
    hx, hy = handles[:, 0], handles[:, 1]
    # source features at the handles only: (P, C)
    v = jnp.einsum("ph,hwc,pw->pc", ah[hy], f_src, aw[hx], precision=HIGHEST)
    v = _unit(v)

    n_chunks = -(-big_h // rows)
    pad = n_chunks * rows - big_h
    ah_d = jnp.pad(jnp.asarray(bilinear_matrix(f_drag.shape[0], big_h)), ((0, pad), (0, 0)))
    valid = jnp.arange(n_chunks * rows) < big_h

    def chunk(args):
        a, ok = args  # (rows, h), (rows,)
        g = jnp.einsum("rh,hwc->rwc", a, f_drag, precision=HIGHEST)
        up = jnp.einsum("xw,rwc->rxc", aw, g, precision=HIGHEST)
        cos = jnp.einsum("rxc,pc->prx", _unit(up), v, precision=HIGHEST)
        cos = jnp.where(ok[None, :, None], cos, -jnp.inf).reshape(v.shape[0], -1)
        return jnp.max(cos, axis=1), jnp.argmax(cos, axis=1)

    best, idx = jax.lax.map(chunk, (ah_d.reshape(n_chunks, rows, -1), valid.reshape(n_chunks, rows)))
    c = jnp.argmax(best, axis=0)  # first chunk holding the maximum (P,)
    flat = c * rows * big_w + jnp.take_along_axis(idx, c[None], axis=0)[0]
    row, col = flat // big_w, flat % big_w
    d = jnp.sqrt((targets[:, 1] - row).astype(jnp.float32) ** 2
                 + (targets[:, 0] - col).astype(jnp.float32) ** 2)
    return d, jnp.stack([col, row], axis=-1)


def clip_cosine(e0: Array, e1: Array) -> Array:
    """(B, D), (B, D) image embeddings → (B,) cosine similarity (each normalised first)."""
    n0 = e0 / jnp.linalg.norm(e0, axis=-1, keepdims=True)
    n1 = e1 / jnp.linalg.norm(e1, axis=-1, keepdims=True)
    return jnp.sum(n0 * n1, axis=-1)


def _patch(img: np.ndarray, x: int, y: int, r: int) -> np.ndarray:
    """(2r+1, 2r+1, 3) patch centred at (x, y); pixels outside the image repeat the nearest edge
    pixel. (The reference slices ``img[y−r:y+r+1, x−r:x+r+1]``, which is the same inside the image
    and truncated, wrapped or crashing at the border.)"""
    h, w = img.shape[:2]
    ys = np.clip(np.arange(y - r, y + r + 1), 0, h - 1)
    xs = np.clip(np.arange(x - r, x + r + 1), 0, w - 1)
    return img[ys][:, xs]


def dai(original: np.ndarray, result: np.ndarray, handles: np.ndarray, targets: np.ndarray,
        gamma: int, *, double_n: bool = False) -> float:
    """GoodDrag's Drag Accuracy Index of one image. original, result: (H, W, 3) in [0, 1]
    (``ToTensor``); handles, targets: (N, 2) int (x, y).

    DAI_γ = (1/N) Σ_i ‖P_orig(h_i, γ) − P_result(t_i, γ)‖²₂ / (2γ+1)², P the (2γ+1)² RGB patch.
    ``double_n``: the reference code's quirk, dividing by N twice (what GoodDrag's reported
    figures used); the default follows the paper's formula (one mean over the N pairs)."""
    n = len(handles)
    total = 0.0
    for (hx, hy), (tx, ty) in zip(np.asarray(handles), np.asarray(targets)):
        diff = _patch(original, int(hx), int(hy), gamma) - _patch(result, int(tx), int(ty), gamma)
        total += float(np.sum(np.square(diff, dtype=np.float64)))
    value = total / n / (2 * gamma + 1) ** 2
    return value / n if double_n else value
