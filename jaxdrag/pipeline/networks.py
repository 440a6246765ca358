"""The SD-1.5 networks as pure functions over their parameters (``Pipeline``): the UNet, VAE,
text encoder and CLIP, per-edit LoRA training, DDIM inversion, reference-attention denoising,
text-to-image generation; ``load_pipeline``."""

from __future__ import annotations

import copy
import threading

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .. import weights
from ..drag import DragConfig, DragNetworks, make_runner
from ..models.lora import init_lora, zeros_lora
from ..precision import Policy, policy_for
from ..schedule import DDIM, add_noise, ddim_step, inversion_step
from ..tokenizer import Tokenizer

from .pixels import Array, bilinear_resize, clip_pixels, to_uint8, tree_bytes
from .stages import ProgressRelay, Stages


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




@dataclass(eq=False)
class Pipeline:
    """SD-1.5 networks (UNet with per-edit LoRA, VAE, CLIP text encoder; optional CLIP ViT) as
    pure functions over explicit parameters, plus the jitted editing stages.

    Public network methods (batch first; latents NHWC (B, H/8, W/8, 4) scaled by the VAE's
    scaling factor; images (B, H, W, 3) float in [-1, 1]):
      encode_prompt(prompts) → (B, 77, D); unet(latents, t, text_emb, lora=None) → ε;
      vae_encode(images) → latents (posterior mean); vae_decode(latents) → images;
      clip_image_embeds(images) → (B, P); clip_text_embeds(prompts) → (B, P).
    """

    sd: weights.SDComponents
    tokenizer: Tokenizer
    policy: Policy
    clip: weights.Component | None = None
    clip_tokenizer: Tokenizer | None = None
    schedule: DDIM = field(default_factory=DDIM)
    feature_block: int = 2  # DragDiffusion's unet_feature_idx 3 = up_blocks[2] output
    # compiled programs kept before ``edit_batch`` releases them between shape groups (each CPU
    # executable holds ~140 memory mappings of a 65530 limit; GPU executables hold device memory)
    max_live_programs: int = 40

    def __post_init__(self):
        self.stages = Stages()
        self._jit: dict = {}
        # jitted functions are made once even when stages are compiled from several threads
        # (``editing.compile_ahead``): a second maker of the same function would compile it again
        self._jit_lock = threading.RLock()
        # per-image LoRAs reused by later edits of the same image, prompt, seed and LoRA settings
        # (``enable_lora_cache``); None = off
        self.lora_cache: dict | None = None
        self.loras_trained = 0  # per-edit LoRAs trained so far (a cached one is not trained again)
        self.inversions_run = 0  # per-edit DDIM inversions run so far (likewise)
        self.progress_relay = ProgressRelay()

    def use_devices(self, devices: Sequence | None = None) -> int:
        """Spread every batch over ``devices`` (default: all local devices): the base weights
        are replicated once, the edits split evenly (``edit_batch`` rounds its batches up to a
        multiple of the device count) and each device runs its own programs. One device (or
        ``devices=[]``) switches back to single-device runs. Returns the device count in use."""
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        devices = list(jax.local_devices() if devices is None else devices)
        self.release_compiled()
        if len(devices) <= 1:
            self.stages.mesh, place = None, (devices or jax.local_devices())[0]
        else:
            self.stages.mesh = Mesh(np.array(devices), ("edits",))
            place = NamedSharding(self.stages.mesh, P())
        for comp in (self.sd.unet, self.sd.vae, self.sd.text_encoder, self.clip):
            if comp is not None:
                comp.params = jax.device_put(comp.params, place)
        return max(1, len(devices))

    def weight_bytes(self) -> int:
        """Bytes of every network's base weights (as stored: bf16 kernels on accelerators)."""
        comps = [self.sd.unet, self.sd.vae, self.sd.text_encoder] + ([self.clip] if self.clip else [])
        return sum(tree_bytes(c.params) for c in comps)

    def device_memory(self) -> int:
        """Bytes one device can hold: the accelerator's ``bytes_limit``; on CPU the memory the
        system has available (``MemAvailable``)."""
        stats = jax.local_devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"])
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2

    @property
    def n_devices(self) -> int:
        return 1 if self.stages.mesh is None else self.stages.mesh.size

    def release_compiled(self) -> None:
        """Drop every compiled program of this pipeline: the stage cache and the jitted
        functions (JAX keeps a function's executables alive as long as the function lives). A
        later edit compiles again (from the persistent compilation cache when it is on)."""
        self.stages.clear()
        self._jit.clear()

    def measuring(self, one_device: bool = True) -> "Pipeline":
        """A view of this pipeline whose stages compile and measure instead of running
        (``Stages.measuring``): memory planning (``plan_batch``, one device's programs) and
        compiling ahead (``compile_ahead``, this pipeline's programs). The same networks and
        compiled programs, no LoRA cache. This pipeline is not changed."""
        view = copy.copy(self)
        view.stages, view.lora_cache = self.stages.measuring(one_device), None
        return view

    def enable_lora_cache(self, enabled: bool = True) -> None:
        """Keep every trained LoRA and DDIM inversion (in memory) and reuse them when the same
        image is edited again with the same prompt, seed, LoRA settings (and, for the inversion,
        strength): by several methods, the grid points of a sweep, or in a UI."""
        self.lora_cache = {} if enabled else None

    # -------------------------------------------------------------- network functions (pure)
    @property
    def scaling_factor(self) -> float:
        return float(self.sd.vae.cfg.scaling_factor)

    @property
    def native_width(self) -> int:
        """The width the model was trained at (the VAE's ``sample_size``: 512 for SD-1.5); the
        reference resizes UI images to this width, keeping the aspect ratio."""
        return int(self.sd.vae.cfg.sample_size)

    def unet_apply(self, params, lora, x, t, ctx, *, reference: bool = False, mid_override=None,
                   mid_use=None, remat: bool = False):
        m = nnx.merge(self.sd.unet.graphdef, lora, params)
        return m(x, t, ctx, reference_attention=reference, mid_override=mid_override, mid_use=mid_use,
                 remat=remat)

    def vae_encode_apply(self, params, images):
        return nnx.merge(self.sd.vae.graphdef, params).encode(images)

    def vae_decode_apply(self, params, latents):
        return nnx.merge(self.sd.vae.graphdef, params).decode(latents / self.scaling_factor)

    def text_apply(self, params, ids):
        return nnx.merge(self.sd.text_encoder.graphdef, params)(ids)[0]

    def clip_image_apply(self, params, images, double_unit_map: bool = False):
        """[-1, 1] images → ``clip_pixels`` → ViT → projection (unnormalised embeddings)."""
        m = nnx.merge(self.clip.graphdef, params)
        return m.image_embeds(clip_pixels(images, m.vision_cfg.image_size, double_unit_map))

    def clip_text_apply(self, params, ids):
        return nnx.merge(self.clip.graphdef, params).text_embeds(ids)

    def _j(self, name, fn, **kw):
        with self._jit_lock:
            if name not in self._jit:
                self._jit[name] = jax.jit(fn, **kw)
            return self._jit[name]

    # -------------------------------------------------------------- public network methods
    def encode_prompt(self, prompts: Sequence[str]) -> Array:
        ids = jnp.asarray(self.tokenizer.ids(list(prompts)))
        return self._j("text", self.text_apply)(self.sd.text_encoder.params, ids)

    def unet(self, latents, t, text_emb, lora=None, *, reference: bool = False):
        lora = lora if lora is not None else jax.tree.map(
            lambda s: jnp.zeros(s.shape, jnp.float32), self.sd.unet.lora)
        fn = self._j(f"unet_ref{reference}",
                     lambda p, lo, x, t, c: self.unet_apply(p, lo, x, t, c, reference=reference)[0])
        t = jnp.broadcast_to(jnp.asarray(t), (latents.shape[0],))
        return fn(self.sd.unet.params, lora, jnp.asarray(latents, jnp.float32), t,
                  jnp.asarray(text_emb, jnp.float32))

    def vae_encode(self, images) -> Array:
        fn = self._j("vae_enc", lambda p, x: self.vae_encode_apply(p, x)[0] * self.scaling_factor)
        return fn(self.sd.vae.params, jnp.asarray(images, jnp.float32))

    def vae_decode(self, latents) -> Array:
        return self._j("vae_dec", self.vae_decode_apply)(self.sd.vae.params, jnp.asarray(latents, jnp.float32))

    def _need_clip(self):
        if self.clip is None:
            raise ValueError("this pipeline has no CLIP model: pass clip=PATH to load_pipeline "
                             "(an HF CLIP ViT-B/16 folder) for CLIPDrag")

    def clip_image_embeds(self, images) -> Array:
        self._need_clip()
        return self._j("clip_img", self.clip_image_apply)(self.clip.params, jnp.asarray(images, jnp.float32))

    def clip_text_embeds(self, prompts: Sequence[str]) -> Array:
        self._need_clip()
        ids = jnp.asarray(self.clip_tokenizer.ids(list(prompts)))
        return self.stages("clip_text", self._j("clip_txt", self.clip_text_apply), self.clip.params, ids)

    # -------------------------------------------------------------- editing stages (batched)
    def lora_template(self):
        return self.sd.unet.lora

    def _lora_chunk_fn(self, settings: LoRASettings, n: int, crop: tuple[int, int]):
        """jit: n LoRA steps for a batch of edits (vmapped), returning (lora, opt, key, losses).
        The learning rate and weight decay are traced per edit ((B,) arrays), so LoRAs with other
        rates share the program; the batch, remat policy, n and crop are compiled in."""
        adam = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
        sched = self.schedule

        def one_step(params, lora, opt, key, mean, std, ctx, lr, wd):
            k_crop, k_lat, k_t, k_noise = jax.random.split(key, 4)
            bs = settings.batch
            hh, ww = mean.shape[:2]
            ch, cw = crop
            oy = jax.random.randint(k_crop, (bs,), 0, hh - ch + 1)
            ox = jax.random.randint(jax.random.fold_in(k_crop, 1), (bs,), 0, ww - cw + 1)
            stat = jnp.concatenate([mean, std], axis=-1)
            crops = jax.vmap(lambda y, x: jax.lax.dynamic_slice(stat, (y, x, 0), (ch, cw, stat.shape[-1])))(oy, ox)
            m_c, s_c = jnp.split(crops, 2, axis=-1)
            z = (m_c + s_c * jax.random.normal(k_lat, m_c.shape)) * self.scaling_factor
            t = jax.random.randint(k_t, (bs,), 0, sched.num_train_timesteps)
            noise = jax.random.normal(k_noise, z.shape)
            zt = add_noise(sched, z, noise, t)
            ctx_b = jnp.broadcast_to(ctx, (bs,) + ctx.shape)

            def loss_fn(lo):
                eps = self.unet_apply(params, lo, zt, t, ctx_b, remat=settings.remat)[0]
                return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise))

            loss, g = jax.value_and_grad(loss_fn)(lora)
            upd, opt = adam.update(g, opt)
            lora = jax.tree.map(lambda p, u: p - lr * (u + wd * p), lora, upd)
            return lora, opt, loss

        def chunk(params, loras, opts, keys, means, stds, ctxs, lrs, wds):
            def body(carry, _):
                lo, op, ke = carry
                ke, sub = jax.vmap(lambda k: tuple(jax.random.split(k)))(ke)
                lo, op, loss = jax.vmap(one_step, in_axes=(None, 0, 0, 0, 0, 0, 0, 0, 0))(
                    params, lo, op, sub, means, stds, ctxs, lrs, wds)
                return (lo, op, ke), loss

            (loras, opts, keys), losses = jax.lax.scan(body, (loras, opts, keys), None, length=n)
            return loras, opts, keys, losses.T  # (B, n): every output leads with the edit axis

        return jax.jit(chunk, donate_argnums=(1, 2, 3))

    def train_lora(self, images_lora: Array, ctx: Array, keys: Array, settings: LoRASettings,
                   on_chunk: Callable[[int], None] | None = None):
        """Per-edit LoRA identity finetune (§1.4), vmapped over edits.

        images_lora: (B, H', W', 3) in [-1, 1], the image resized so its shorter side is the
        model's native size; the latent posterior is encoded once (DragDiffusion issue #43) and
        each step draws a fresh posterior sample, a random native-size crop in latent space (the
        reference's RandomCrop; the identity for square images), timesteps and noise.
        Returns (lora (B, …), losses (steps, B, )).
        """
        enc = self._j("vae_enc_post", lambda p, x: self.vae_encode_apply(p, x))
        mean, logvar = self.stages("lora_encode", enc, self.sd.vae.params, images_lora)
        std = jnp.exp(0.5 * logvar)
        n_lat = self.native_width // 8
        crop = (min(n_lat, mean.shape[1]), min(n_lat, mean.shape[2]))
        b = images_lora.shape[0]
        init = jax.vmap(lambda k: init_lora(self.sd.unet.lora, k))
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
            key = ("lora", settings.batch, settings.remat, n, crop)  # lr and weight decay are traced
            with self._jit_lock:
                if key not in self._jit:
                    self._jit[key] = self._lora_chunk_fn(settings, n, crop)
            loras, opts, k_steps, l = self.stages("lora", self._jit[key], self.sd.unet.params, loras, opts,
                                                  k_steps, mean, std, ctx, lrs, wds)
            losses.append(l)
            done += n
            if on_chunk is not None:
                jax.block_until_ready(l)
                on_chunk(n)
        return loras, jnp.concatenate(losses, axis=1).T if losses else jnp.zeros((0, b))

    def invert(self, loras, z0: Array, ctx: Array, strength: float) -> Array:
        """DDIM inversion z0 → z_{t*} (K = round(strength·50) steps, no CFG), per edit."""
        ts = jnp.asarray(self.schedule.inversion_timesteps(strength), jnp.int32)

        def one(params, lora, z, c):
            def body(z, t):
                eps = self.unet_apply(params, lora, z[None], t, c[None])[0][0]
                return inversion_step(self.schedule, z, eps, t), None
            return jax.lax.scan(body, z, ts)[0]

        fn = self._j(("invert", strength), jax.vmap(one, in_axes=(None, 0, 0, 0)))
        return self.stages("invert", fn, self.sd.unet.params, loras, z0, ctx)

    def denoise(self, loras, z_src: Array, z_edit: Array, c_src: Array, c_edit: Array,
                strength: float, reference: bool = True, *, start: Array | None = None,
                mid: Array | None = None, mid_steps: int = 0, uncond: Array | None = None,
                scale: Array | None = None) -> Array:
        """Denoise the pair [z*, ẑ] from t* to 0 (§1.5): the source branch on the original text
        embedding, the edited branch on the optimised one, both with the edit's LoRA; with
        ``reference`` the last six decoder self-attentions of both rows attend to the source
        row's keys/values. Returns the edited branch's final latent (B, h, w, 4).

        start (B,) int: per edit, the number of the K = round(50·strength) steps already taken
        (GoodDrag's drag phase denoises its first steps itself; the pair is then at t_start).
        mid (B, h', w', C): DragNoise's optimised bottleneck, replacing the mid-block output of
        both rows during the first ``mid_steps`` of the K steps.
        uncond (B, T, D), scale (B,): classifier-free guidance (drags on generated images): the
        pair runs once on [c_u, c_u] and once on [c, ĉ], each with its own mutual self-attention
        (MasaCtrl per half), ε = ε_u + s·(ε_c − ε_u)."""
        ts = jnp.asarray(self.schedule.denoise_timesteps(strength), jnp.int32)
        n_steps = len(ts)
        b = z_src.shape[0]
        start = jnp.zeros((b,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        with_mid = mid is not None
        mid = jnp.zeros((b, 1), jnp.float32) if mid is None else mid
        guided = uncond is not None
        if not guided:
            uncond, scale = jnp.zeros((b, 1), jnp.float32), jnp.ones((b,), jnp.float32)

        def one(params, lora, zs, ze, cs, ce, s0, h, cu, g):
            ctx = jnp.stack([cs, ce])

            def body(z, k):
                t = ts[k]
                inject = dict(mid_override=jnp.stack([h, h]), mid_use=k < mid_steps) if with_mid else {}
                eps = self.unet_apply(params, lora, z, t, ctx, reference=reference, **inject)[0]
                if guided:
                    e_u = self.unet_apply(params, lora, z, t, jnp.stack([cu, cu]).astype(ctx.dtype),
                                          reference=reference)[0]
                    eps = e_u.astype(jnp.float32) + g * (eps.astype(jnp.float32) - e_u.astype(jnp.float32))
                return jnp.where(k >= s0, ddim_step(self.schedule, z, eps, t), z), None
            return jax.lax.scan(body, jnp.stack([zs, ze]), jnp.arange(n_steps))[0][1]

        fn = self._j(("denoise", strength, reference, with_mid, mid_steps, guided),
                     jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
        return self.stages("denoise", fn, self.sd.unet.params, loras, z_src, z_edit, c_src, c_edit,
                           start, mid, uncond, jnp.asarray(scale, jnp.float32))

    def generate(self, prompts: Sequence[str], *, seed: int | Sequence[int] = 0, guidance_scale: float = 7.5,
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
        sched = self.schedule if steps is None else replace(self.schedule, num_inference_steps=steps)
        h, w = hw or (self.native_width, self.native_width)
        b = len(prompts)
        ids = self.tokenizer.ids(list(prompts) + [negative_prompt])
        ctx = self.encode_text_ids(ids)
        cond, uncond = ctx[:b], jnp.broadcast_to(ctx[b:], ctx[:b].shape)
        if isinstance(seed, (int, np.integer)):
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(b))
        else:
            if len(seed) != b:
                raise ValueError(f"{len(seed)} seeds for {b} prompts")
            keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(int(s_)), 0) for s_ in seed])
        z = jax.vmap(lambda k: jax.random.normal(k, (h // 8, w // 8, self.sd.unet.cfg.in_channels)))(keys)
        ts = jnp.asarray(sched.timesteps, jnp.int32)
        zero = zeros_lora(self.sd.unet.lora)
        k_stop = -1 if stop_at is None else int(stop_at)

        def run(params, z, cond, uncond, g):
            def body(carry, i):
                z, z_k = carry
                z_k = jnp.where(i == k_stop, z, z_k)
                zz = jnp.concatenate([z, z])
                eps = self.unet_apply(params, zero, zz, ts[i], jnp.concatenate([uncond, cond]))[0]
                e_u, e_c = jnp.split(eps.astype(jnp.float32), 2)
                return (ddim_step(sched, z, e_u + g * (e_c - e_u), ts[i]), z_k), None
            z_end, z_k = jax.lax.scan(body, (z, z), jnp.arange(len(ts)))[0]
            return z_end, z_k

        fn = self._j(("generate", sched, k_stop), run)
        z, z_k = self.stages("generate", fn, self.sd.unet.params, z, cond, uncond, jnp.float32(guidance_scale))
        images = self.decode_to_uint8(z, (h, w))
        return (images, z) if stop_at is None else (images, z, z_k)

    def decode_to_uint8(self, latents: Array, out_hw: tuple[int, int]) -> Array:
        """VAE decode → clamp to [0, 1] → bilinear resize to ``out_hw`` → uint8 (truncated)."""
        def fn(params, z):
            return to_uint8(bilinear_resize(self.vae_decode_apply(params, z), out_hw))
        return self.stages("decode", self._j(("decode", out_hw), fn), self.sd.vae.params, latents)

    def encode_images(self, images: Array) -> Array:
        """Posterior mean × scaling factor (the latent DragDiffusion inverts)."""
        fn = self._j("vae_enc", lambda p, x: self.vae_encode_apply(p, x)[0] * self.scaling_factor)
        return self.stages("encode", fn, self.sd.vae.params, images)

    def encode_text_ids(self, ids) -> Array:
        return self.stages("text", self._j("text", self.text_apply), self.sd.text_encoder.params,
                           jnp.asarray(ids))

    def drag_networks(self, clip_double_unit_map: bool = False, remat: str = "off", text_block: int | None = None,
                      guided: bool = False) -> DragNetworks:
        """The engine's network functions over this pipeline (cached: one object per setting).
        ``remat``: the UNet's rematerialisation policy in the drag step's backward.
        ``text_block`` (an up_blocks index): ``features`` also returns that block's map, the
        text embedding's motion features (DragText App. H). ``guided`` (drags on generated
        images, ALGORITHMS.md §2.4): every forward runs the UNet on [z, z] with [c_u, ĉ]
        (``shared["guide"]`` = {"uncond": (T, D), "scale": ()}); ε = ε_u + s·(ε_c − ε_u) and
        the features are [(1 − κ)·F_u, κ·F_c] along channels, κ = s/(2s − 1)."""
        key = ("nets", clip_double_unit_map, remat, text_block, guided)
        with self._jit_lock:
            if key not in self._jit:
                fb = self.feature_block
                n_up = len(self.sd.unet.cfg.block_out_channels)
                if text_block is not None and not 0 <= text_block < n_up:
                    from ..errors import SettingsError
                    raise SettingsError(f"setting text_feature_block = {text_block}: this UNet has up blocks "
                                        f"0..{n_up - 1}")
                blocks = (fb,) if text_block is None else (fb, text_block)

                def outputs(shared, eps, taps):
                    eps = eps.astype(jnp.float32)
                    feats = [taps["up"][b].astype(jnp.float32) for b in blocks]
                    if not guided:
                        return (eps[0], *(f[0] for f in feats))
                    g = shared["guide"]["scale"]
                    k = g / (2.0 * g - 1.0)
                    return (eps[0] + g * (eps[1] - eps[0]),
                            *(jnp.concatenate([(1.0 - k) * f[0], k * f[1]], axis=-1) for f in feats))

                def rows(shared, z, c):
                    if not guided:
                        return z[None], c[None]
                    return jnp.stack([z, z]), jnp.stack([shared["guide"]["uncond"].astype(c.dtype), c])

                def features(shared, edit, z, c, t):
                    x, ctx = rows(shared, z, c)
                    eps, taps = self.unet_apply(shared["unet"], edit, x, t, ctx, remat=remat)
                    return outputs(shared, eps, taps)

                def clip_image(shared, x0):
                    img = self.vae_decode_apply(shared["vae"], x0[None])
                    return self.clip_image_apply(shared["clip"], img, clip_double_unit_map)[0]

                def features_mid(shared, edit, z, c, t, h):
                    eps, taps = self.unet_apply(shared["unet"], edit, z[None], t, c[None], mid_override=h[None],
                                                remat=remat)
                    return outputs(shared, eps, taps)

                def bottleneck(shared, edit, z, c, t):
                    _, taps = self.unet_apply(shared["unet"], edit, z[None], t, c[None])
                    return taps["mid"][0].astype(jnp.float32)

                mid = (features_mid, bottleneck) if not guided else (None, None)
                self._jit[key] = DragNetworks(features, clip_image if self.clip is not None else None, *mid)
            return self._jit[key]

    def drag_runner(self, cfg: DragConfig, clip_double_unit_map: bool = False, progress: bool = False,
                    remat: str = "off", guided: bool = False):
        """(prep, loop) for ``cfg``, cached. With ``progress`` the loop reports every iteration
        to ``self.progress_relay.target`` (set it before the call). ``guided``: see
        ``drag_networks`` (then ``shared_params`` must be given the guidance)."""
        key = ("runner", cfg, clip_double_unit_map, bool(progress), remat, guided)
        with self._jit_lock:
            if key not in self._jit:
                nets = self.drag_networks(clip_double_unit_map, remat, cfg.text_feature_block, guided)
                self._jit[key] = make_runner(nets, cfg, self.progress_relay if progress else None)
            return self._jit[key]

    def shared_params(self, use_clip: bool, guide: dict | None = None):
        """The broadcast parameters of the drag step; ``guide`` = {"uncond": (T, D), "scale": ()}
        for guided networks."""
        shared = {"unet": self.sd.unet.params}
        if guide is not None:
            shared["guide"] = guide
        if use_clip:
            self._need_clip()
            shared["vae"] = self.sd.vae.params
            shared["clip"] = self.clip.params
        return shared


def load_pipeline(path: str | Path, clip: str | Path | None = None, dtype: Any = "auto", *,
                  attention: str = "auto", lora_rank: int = 16, vae: str | Path | None = None) -> Pipeline:
    """Load SD-1.x from a diffusers folder or an LDM single ``.safetensors`` file, and optionally
    a CLIP model (HF folder, e.g. openai/clip-vit-base-patch16) for CLIPDrag. Each may also be a
    Hugging Face Hub id (``org/name[@revision][/subfolder]``, read through the user's cache;
    ``jaxdrag.hub``); a local path that exists wins.

    dtype: compute dtype ("auto": bfloat16 on GPU/TPU, float32 on CPU); matmul/conv kernels are
    stored in it, every other parameter stays float32. Turns on the persistent compilation cache
    (``xla_cache``; ``JAXDRAG_COMPILE_CACHE=0`` turns it off).
    lora_rank: rank of the per-edit LoRA (DragDiffusion: 16). vae: a separate VAE replacing the
    model's for encoding, LoRA training and decoding (GoodDrag uses ``sd-vae-ft-mse``;
    ``weights.load_vae``)."""
    from .. import hub, xla_cache

    # a local path, or a Hub id read through huggingface_hub's cache (hub.py)
    path = hub.resolve(path, "sd")
    clip = None if clip is None else hub.resolve(clip, "clip")
    vae = None if vae is None else hub.resolve(vae, "vae")
    xla_cache.enable()
    policy = policy_for(dtype, attention)
    sd = weights.load_sd(path, dtype=policy.compute, attn_impl=policy.attention, lora_rank=lora_rank)
    if vae is not None:
        sd.vae = weights.load_vae(vae, dtype=policy.compute, attn_impl=policy.attention, like=sd.vae.cfg)
    tok = Tokenizer(sd.tokenizer_dir)
    clip_comp = clip_tok = None
    if clip is not None:
        clip_comp = weights.load_hf_clip(Path(clip), dtype=policy.compute, attn_impl=policy.attention)
        clip_dir = Path(clip)
        clip_tok = Tokenizer(clip_dir if (clip_dir / "vocab.json").exists() else None)
    return Pipeline(sd=sd, tokenizer=tok, policy=policy, clip=clip_comp, clip_tokenizer=clip_tok)


