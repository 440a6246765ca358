"""Per-edit LoRA identity fine-tuning (ALGORITHMS.md §1.4): its settings and the vmapped training
program. ``Pipeline.train_lora`` calls ``train_lora`` here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..models.canvas import encoder_canvas
from ..models.lora import init_lora
from ..schedule import add_noise
from .pixels import Array

if TYPE_CHECKING:
    from .networks import Pipeline


@dataclass(frozen=True)
class LoRASettings:
    """DragDiffusion's defaults (§1.4): rank 16 (fixed when the model is loaded), 80 steps of
    AdamW (β (0.9, 0.999), weight decay 1e-2, ε 1e-8) at lr 5e-4, batch 4, constant lr.
    ``steps`` and ``lr`` left None take the method's (GoodDrag 70; FreeDrag, DragNoise 200 at
    2e-4; ``methods.pipeline_defaults``) when an edit runs."""

    steps: int | None = None
    lr: float | None = None
    batch: int = 4
    weight_decay: float = 1e-2
    chunk: int = 10  # steps per compiled call (progress granularity)
    # rematerialisation in the backward (memory for many edits at once): "off" | "blocks" |
    # "dots" (keep matmul/conv/attention outputs; ``models.unet._remat``); True means "blocks"
    remat: str = "off"

    def __post_init__(self):
        from ..errors import check_number

        if self.steps is not None:
            object.__setattr__(self, "steps", check_number("lora_steps", self.steps, nonnegative=True,
                                                           integer=True))
        if self.lr is not None:
            object.__setattr__(self, "lr", check_number("lora_lr", self.lr, positive=True))
        object.__setattr__(self, "batch", check_number("lora_batch", self.batch, positive=True, integer=True))
        object.__setattr__(self, "weight_decay", check_number("lora_weight_decay", self.weight_decay,
                                                              nonnegative=True))
        object.__setattr__(self, "chunk", check_number("lora_chunk", self.chunk, positive=True, integer=True))
        object.__setattr__(self, "remat", check_remat("lora_remat", self.remat))


def check_remat(name: str, value) -> str:
    from ..errors import SettingsError
    from ..models.unet import REMAT_POLICIES, remat_policy

    try:
        return remat_policy(value)
    except ValueError:
        raise SettingsError(f"setting {name} = {value!r}: must be one of {', '.join(REMAT_POLICIES)}") from None


def lora_chunk_fn(pipe: "Pipeline", settings: LoRASettings, n: int, crop: tuple[int, int]):
    """jit: n LoRA steps for a batch of edits (vmapped), returning (lora, opt, key, losses).
    The learning rate and weight decay are traced per edit ((B,) arrays), so LoRAs with other
    rates share the program; the batch, remat policy, n and crop are compiled in."""
    adam = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
    sched = pipe.schedule

    def one_step(params, lora, opt, key, mean, std, ctx, lr, wd, lat_hw):
        k_crop, k_lat, k_t, k_noise = jax.random.split(key, 4)
        bs = settings.batch
        hh, ww = (mean.shape[0], mean.shape[1]) if lat_hw is None else (lat_hw[0], lat_hw[1])
        ch, cw = crop
        oy = jax.random.randint(k_crop, (bs,), 0, hh - ch + 1)
        ox = jax.random.randint(jax.random.fold_in(k_crop, 1), (bs,), 0, ww - cw + 1)
        stat = jnp.concatenate([mean, std], axis=-1)
        crops = jax.vmap(lambda y, x: jax.lax.dynamic_slice(stat, (y, x, 0), (ch, cw, stat.shape[-1])))(oy, ox)
        m_c, s_c = jnp.split(crops, 2, axis=-1)
        z = (m_c + s_c * jax.random.normal(k_lat, m_c.shape)) * pipe.scaling_factor
        t = jax.random.randint(k_t, (bs,), 0, sched.num_train_timesteps)
        noise = jax.random.normal(k_noise, z.shape)
        zt = add_noise(sched, z, noise, t)
        ctx_b = jnp.broadcast_to(ctx, (bs,) + ctx.shape)

        def loss_fn(lo):
            eps = pipe.unet_apply(params, lo, zt, t, ctx_b, remat=settings.remat)[0]
            return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise))

        loss, g = jax.value_and_grad(loss_fn)(lora)
        upd, opt = adam.update(g, opt)
        lora = jax.tree.map(lambda p, u: p - lr * (u + wd * p), lora, upd)
        return lora, opt, loss

    def chunk(params, loras, opts, keys, means, stds, ctxs, lrs, wds, lat_hws=None):
        def body(carry, _):
            lo, op, ke = carry
            ke, sub = jax.vmap(lambda k: tuple(jax.random.split(k)))(ke)
            lo, op, loss = jax.vmap(one_step, in_axes=(None, 0, 0, 0, 0, 0, 0, 0, 0, 0))(
                params, lo, op, sub, means, stds, ctxs, lrs, wds, lat_hws)
            return (lo, op, ke), loss

        (loras, opts, keys), losses = jax.lax.scan(body, (loras, opts, keys), None, length=n)
        return loras, opts, keys, losses.T  # (B, n): every output leads with the edit axis

    return jax.jit(chunk, donate_argnums=(1, 2, 3))


def train_lora(pipe: "Pipeline", images_lora: Array, ctx: Array, keys: Array, settings: LoRASettings,
               on_chunk: Callable[[int], None] | None = None, sizes: Array | None = None):
    """Per-edit LoRA identity finetune (§1.4), vmapped over edits.

    images_lora: (B, H', W', 3) in [-1, 1], the image resized so its shorter side is the
    model's native size; the latent posterior is encoded once (DragDiffusion issue #43) and
    each step draws a fresh posterior sample, a random native-size crop in latent space (the
    reference's RandomCrop; the identity for square images), timesteps and noise.
    Returns (lora (B, …), losses (steps, B, )).

    ``sizes`` (B, 2) int (a masked canvas): each LoRA image's size inside ``images_lora``; the
    posterior is encoded on the canvas and the crops are drawn inside each edit's latent — the
    same crops, samples and noise as for the image alone (the crop has the native size either way).
    """
    if sizes is None:
        enc = pipe.jitted("vae_enc_post", lambda p, x: pipe.vae_encode_apply(p, x))
        mean, logvar = pipe.stages("lora_encode", enc, pipe.sd.vae.params, images_lora)
        lat_hws = None
    else:
        enc = pipe.jitted("vae_enc_post_masked", lambda p, x, hw: pipe.vae_encode_apply(
            p, x, encoder_canvas(hw, x.shape[1:3], pipe.vae_levels())))
        sizes = jnp.asarray(sizes, jnp.int32)
        mean, logvar = pipe.stages("lora_encode", enc, pipe.sd.vae.params, images_lora, sizes)
        lat_hws = sizes // 8
    std = jnp.exp(0.5 * logvar)
    n_lat = pipe.native_width // 8
    crop = (min(n_lat, mean.shape[1]), min(n_lat, mean.shape[2]))
    if sizes is not None:
        lat = np.asarray(lat_hws)
        if (lat < n_lat).any():  # the unpadded crop would be smaller than native: not on a canvas
            raise ValueError(f"LoRA images on a canvas need both latent sides ≥ {n_lat}, got {lat.tolist()}")
    b = images_lora.shape[0]
    init = jax.vmap(lambda k: init_lora(pipe.sd.unet.lora, k))
    k_init, k_steps = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
    loras = init(k_init)
    adam = optax.scale_by_adam()
    opts = jax.vmap(adam.init)(loras)
    losses = []
    done = 0
    lrs = jnp.full((b,), settings.lr, jnp.float32)
    wds = jnp.full((b,), settings.weight_decay, jnp.float32)
    while done < settings.steps:
        n = min(settings.chunk, settings.steps - done)
        key = ("lora", settings.batch, settings.remat, n, crop, lat_hws is not None)  # lr, weight decay traced
        with pipe.jit_lock:
            if key not in pipe.jit_cache:
                pipe.jit_cache[key] = lora_chunk_fn(pipe, settings, n, crop)
        loras, opts, k_steps, l = pipe.stages("lora", pipe.jit_cache[key], pipe.sd.unet.params, loras, opts,
                                              k_steps, mean, std, ctx, lrs, wds, lat_hws)
        losses.append(l)
        done += n
        if on_chunk is not None:
            jax.block_until_ready(l)
            on_chunk(n)
    return loras, jnp.concatenate(losses, axis=1).T if losses else jnp.zeros((0, b))
