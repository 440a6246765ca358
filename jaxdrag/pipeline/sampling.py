"""Sampling with the networks (ALGORITHMS.md §1.3, §1.5): DDIM inversion, the reference-attention
denoising of the edited pair, text-to-image generation, decoding to uint8. Each is one jitted,
vmapped stage over a batch of edits; ``Pipeline``'s methods of the same names call these."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..models.lora import zeros_lora
from ..schedule import ddim_step, inversion_step
from ..models.canvas import decoder_canvas, edit_canvas
from .pixels import Array, bilinear_resize, bilinear_resize_each, to_uint8

if TYPE_CHECKING:
    from .networks import Pipeline


def invert(pipe: "Pipeline", loras, z0: Array, ctx: Array, strength: float, sizes: Array | None = None) -> Array:
    """DDIM inversion z0 → z_{t*} (K = round(strength·50) steps, no CFG), per edit. ``sizes``
    (B, 2) int: each edit's latent size inside the batch's canvas (a masked canvas)."""
    ts = jnp.asarray(pipe.schedule.inversion_timesteps(strength), jnp.int32)
    masked = sizes is not None

    def one(params, lora, z, c, size):
        canvas = edit_canvas(size if masked else None, 1, z.shape[:2], pipe.unet_levels())

        def body(z, t):
            eps = pipe.unet_apply(params, lora, z[None], t, c[None], canvas=canvas)[0][0]
            return inversion_step(pipe.schedule, z, eps, t), None
        return jax.lax.scan(body, z, ts)[0]

    fn = pipe.jitted(("invert", strength, masked), jax.vmap(one, in_axes=(None, 0, 0, 0, 0)))
    sizes = jnp.zeros((z0.shape[0], 2), jnp.int32) if sizes is None else jnp.asarray(sizes, jnp.int32)
    return pipe.stages("invert", fn, pipe.sd.unet.params, loras, z0, ctx, sizes)


def denoise(pipe: "Pipeline", loras, z_src: Array, z_edit: Array, c_src: Array, c_edit: Array,
            strength: float, reference: bool = True, *, start: Array | None = None,
            mid: Array | None = None, mid_steps: int = 0, uncond: Array | None = None,
            scale: Array | None = None, sizes: Array | None = None) -> Array:
    """Denoise the pair [z*, ẑ] from t* to 0 (§1.5): the source branch on the original text
    embedding, the edited branch on the optimised one, both with the edit's LoRA; with
    ``reference`` the last six decoder pipe-attentions of both rows attend to the source
    row's keys/values. Returns the edited branch's final latent (B, h, w, 4).

    start (B,) int: per edit, the number of the K = round(50·strength) steps already taken
    (GoodDrag's drag phase denoises its first steps itself; the pair is then at t_start).
    mid (B, h', w', C): DragNoise's optimised bottleneck, replacing the mid-block output of
    both rows during the first ``mid_steps`` of the K steps.
    uncond (B, T, D), scale (B,): classifier-free guidance (drags on generated images): the
    pair runs once on [c_u, c_u] and once on [c, ĉ], each with its own mutual pipe-attention
    (MasaCtrl per half), ε = ε_u + s·(ε_c − ε_u).
    sizes (B, 2) int: each edit's latent size inside the batch's canvas (a masked canvas)."""
    ts = jnp.asarray(pipe.schedule.denoise_timesteps(strength), jnp.int32)
    masked = sizes is not None
    sizes = jnp.zeros((z_src.shape[0], 2), jnp.int32) if sizes is None else jnp.asarray(sizes, jnp.int32)
    n_steps = len(ts)
    b = z_src.shape[0]
    start = jnp.zeros((b,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    with_mid = mid is not None
    mid = jnp.zeros((b, 1), jnp.float32) if mid is None else mid
    guided = uncond is not None
    if not guided:
        uncond, scale = jnp.zeros((b, 1), jnp.float32), jnp.ones((b,), jnp.float32)

    def one(params, lora, zs, ze, cs, ce, s0, h, cu, g, size):
        ctx = jnp.stack([cs, ce])
        canvas = edit_canvas(size if masked else None, 2, zs.shape[:2], pipe.unet_levels())

        def body(z, k):
            t = ts[k]
            inject = dict(mid_override=jnp.stack([h, h]), mid_use=k < mid_steps) if with_mid else {}
            eps = pipe.unet_apply(params, lora, z, t, ctx, reference=reference, canvas=canvas, **inject)[0]
            if guided:
                e_u = pipe.unet_apply(params, lora, z, t, jnp.stack([cu, cu]).astype(ctx.dtype),
                                      reference=reference, canvas=canvas)[0]
                eps = e_u.astype(jnp.float32) + g * (eps.astype(jnp.float32) - e_u.astype(jnp.float32))
            return jnp.where(k >= s0, ddim_step(pipe.schedule, z, eps, t), z), None
        return jax.lax.scan(body, jnp.stack([zs, ze]), jnp.arange(n_steps))[0][1]

    fn = pipe.jitted(("denoise", strength, reference, with_mid, mid_steps, guided, masked),
                 jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
    return pipe.stages("denoise", fn, pipe.sd.unet.params, loras, z_src, z_edit, c_src, c_edit,
                       start, mid, uncond, jnp.asarray(scale, jnp.float32), sizes)


def generate(pipe: "Pipeline", prompts: Sequence[str], *, seed: int | Sequence[int] = 0, guidance_scale: float = 7.5,
             steps: int | None = None, negative_prompt: str = "",
             hw: tuple[int, int] | None = None, stop_at: int | None = None) -> tuple[Array, Array]:
    """Text-to-image sampling with DDIM (η = 0) and classifier-free guidance:
    ε = ε_u + s·(ε_c − ε_u), the unconditional branch on ``negative_prompt``.
    Returns (uint8 images (B, H, W, 3), final latents (B, h, w, 4)). ``hw`` defaults to the
    model's native size. The initial noise: with one ``seed``, prompt i draws from
    fold_in(seed, i); with a list, prompt i draws from fold_in(seed_i, 0) (so one prompt and
    seed draw the same noise in any batch). ``stop_at = k`` also returns the latents after the
    first k steps (the generation's latent at timestep ``timesteps[k]``, what a drag on the
    generated image starts from): then (images, final latents, latents at k)."""
    sched = pipe.schedule if steps is None else replace(pipe.schedule, num_inference_steps=steps)
    h, w = hw or (pipe.native_width, pipe.native_width)
    b = len(prompts)
    ids = pipe.tokenizer.ids(list(prompts) + [negative_prompt])
    ctx = pipe.encode_text_ids(ids)
    cond, uncond = ctx[:b], jnp.broadcast_to(ctx[b:], ctx[:b].shape)
    if isinstance(seed, (int, np.integer)):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(b))
    else:
        if len(seed) != b:
            raise ValueError(f"{len(seed)} seeds for {b} prompts")
        keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(int(s_)), 0) for s_ in seed])
    z = jax.vmap(lambda k: jax.random.normal(k, (h // 8, w // 8, pipe.sd.unet.cfg.in_channels)))(keys)
    ts = jnp.asarray(sched.timesteps, jnp.int32)
    zero = zeros_lora(pipe.sd.unet.lora)
    k_stop = -1 if stop_at is None else int(stop_at)

    def run(params, z, cond, uncond, g):
        def body(carry, i):
            z, z_k = carry
            z_k = jnp.where(i == k_stop, z, z_k)
            zz = jnp.concatenate([z, z])
            eps = pipe.unet_apply(params, zero, zz, ts[i], jnp.concatenate([uncond, cond]))[0]
            e_u, e_c = jnp.split(eps.astype(jnp.float32), 2)
            return (ddim_step(sched, z, e_u + g * (e_c - e_u), ts[i]), z_k), None
        z_end, z_k = jax.lax.scan(body, (z, z), jnp.arange(len(ts)))[0]
        return z_end, z_k

    fn = pipe.jitted(("generate", sched, k_stop), run)
    z, z_k = pipe.stages("generate", fn, pipe.sd.unet.params, z, cond, uncond, jnp.float32(guidance_scale))
    images = pipe.decode_to_uint8(z, (h, w))
    return (images, z) if stop_at is None else (images, z, z_k)


def decode_to_uint8(pipe: "Pipeline", latents: Array, out_hw: tuple[int, int], sizes: Array | None = None,
                    out_sizes: Array | None = None) -> Array:
    """VAE decode → clamp to [0, 1] → bilinear resize to ``out_hw`` → uint8 (truncated).
    A masked canvas: ``sizes`` (B, 2) each edit's latent size inside the latents' canvas and
    ``out_sizes`` (B, 2) its image size inside ``out_hw`` (each image at the top left of its
    canvas, zeros beyond; crop it with ``models.canvas.crop``)."""
    if sizes is None:
        def fn(params, z):
            return to_uint8(bilinear_resize(pipe.vae_decode_apply(params, z), out_hw))
        return pipe.stages("decode", pipe.jitted(("decode", out_hw), fn), pipe.sd.vae.params, latents)

    def fn_masked(params, z, lat, out):
        canvas = decoder_canvas(lat, z.shape[1:3], pipe.vae_levels())
        x = pipe.vae_decode_apply(params, z, canvas)
        k = x.shape[1] // z.shape[1]
        return to_uint8(bilinear_resize_each(x, lat * k, out, out_hw))
    return pipe.stages("decode", pipe.jitted(("decode_masked", out_hw), fn_masked), pipe.sd.vae.params, latents,
                       jnp.asarray(sizes, jnp.int32), jnp.asarray(out_sizes, jnp.int32))
