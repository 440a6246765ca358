"""The SD-1.5 networks as pure functions, and the editing pipeline (ALGORITHMS.md §1):

  per-edit LoRA identity finetune → DDIM inversion to t* → drag loop (``jaxdrag.drag``) →
  denoising of [z*, ẑ] from t* with reference (mutual self-) attention → VAE decode → uint8

Every stage is one jitted function over a batch of edits that share an image shape: the base
weights are shared, each edit carries its own LoRA, latents, text embedding, points and
hyperparameters on a leading axis (``jax.vmap``). Stages are compiled ahead of time once per shape
(``_Stages``) so per-stage timings separate compile time from run time.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from . import weights
from .drag import DragConfig, DragHypers, DragNetworks, make_runner
from .drag.loop import reached as drag_reached
from .drag.loop import update_budget
from .drag.losses import STOP_DISTANCE
from .models.lora import init_lora, zeros_lora
from .precision import Policy, policy_for
from .schedule import DDIM, add_noise, ddim_step, inversion_step
from .tokenizer import Tokenizer

Array = jax.Array

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


# ----------------------------------------------------------------------------------------------
# small pure helpers


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree (arrays or shape/dtype structs)."""
    return int(sum(np.prod(np.shape(x)) * jnp.result_type(x).itemsize for x in jax.tree.leaves(tree)))


def pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix of PyTorch's ``AdaptiveAvgPool`` along one axis:
    row i averages inputs [⌊i·n_in/n_out⌋, ⌈(i+1)·n_in/n_out⌉)."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        a = (i * n_in) // n_out
        b = -((-(i + 1) * n_in) // n_out)
        m[i, a:b] = 1.0 / (b - a)
    return m


def adaptive_avg_pool(images: Array, size: int) -> Array:
    """(B, H, W, C) → (B, size, size, C), exactly ``nn.AdaptiveAvgPool2d(size)``."""
    ph = jnp.asarray(pool_matrix(images.shape[1], size))
    pw = jnp.asarray(pool_matrix(images.shape[2], size))
    return jnp.einsum("oh,bhwc,pw->bopc", ph, images.astype(jnp.float32), pw,
                      precision=jax.lax.Precision.HIGHEST)


def clip_pixels(images: Array, size: int, double_unit_map: bool = False) -> Array:
    """CLIPDrag's differentiable CLIP preprocessing: [-1, 1] images (B, H, W, 3) →
    clamp((x+1)/2, 0, 1) → AdaptiveAvgPool to (size, size) → CLIP normalisation.
    ``double_unit_map`` reproduces the reference's second (x+1)/2 mapping of the already-[0, 1]
    image (QUIRK, ALGORITHMS.md §4.4)."""
    x = jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    x = adaptive_avg_pool(x, size)
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


def to_uint8(images: Array) -> Array:
    """[-1, 1] → uint8 as the reference: clamp((x+1)/2, 0, 1)·255, truncated (not rounded)."""
    return (jnp.clip((images + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(jnp.uint8)


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
        from .errors import check_number

        if self.steps is not None:
            object.__setattr__(self, "steps", check_number("lora_steps", self.steps, nonnegative=True,
                                                           integer=True))
        if self.lr is not None:
            object.__setattr__(self, "lr", check_number("lora_lr", self.lr, positive=True))
        object.__setattr__(self, "batch", check_number("lora_batch", self.batch, positive=True, integer=True))
        object.__setattr__(self, "weight_decay", check_number("lora_weight_decay", self.weight_decay,
                                                              nonnegative=True))
        object.__setattr__(self, "chunk", check_number("lora_chunk", self.chunk, positive=True, integer=True))
        object.__setattr__(self, "remat", _check_remat("lora_remat", self.remat))


def _check_remat(name: str, value) -> str:
    from .errors import SettingsError
    from .models.unet import REMAT_POLICIES, remat_policy

    try:
        return remat_policy(value)
    except ValueError:
        raise SettingsError(f"setting {name} = {value!r}: must be one of {', '.join(REMAT_POLICIES)}") from None


_CUDNN_TARGETS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", "__cudnn$fmhaScaleBiasSoftmax",
                  "__cudnn$fmhaScaleBiasSoftmaxBackward", "__cudnn$fmhaSoftmaxDropout",
                  "__cudnn$fmhaSoftmaxDropoutBackward", "__cudnn$fmhaScaleBiasSoftmaxDropout",
                  "__cudnn$fmhaScaleBiasSoftmaxDropoutBackward", "__cudnn$fmhaSoftmaxF8",
                  "__cudnn$fmhaSoftmaxBackwardF8")


class _ProgressRelay:
    """The one host callback compiled into drag loops: forwards ``(it, done)`` to whatever
    listener the current run set (``target``), so a cached loop never calls a stale one."""

    def __init__(self):
        self.target: Callable | None = None

    def __call__(self, it, done):
        if self.target is not None:
            self.target(it, done)


class _Bar:
    """One stage's progress for ``edit_batch(progress=…)``: a tqdm bar (True), a callback
    ``progress(stage, done, total)`` (a callable, e.g. a UI's), or nothing (False/None)."""

    def __init__(self, progress, stage: str, total: int, desc: str):
        self.stage, self.total, self.n = stage, int(total), 0
        self.fn = progress if callable(progress) else None
        self.tqdm = None
        if progress is True:
            from tqdm import tqdm
            self.tqdm = tqdm(total=self.total, desc=desc, leave=False)
        self._emit()

    def _emit(self):
        if self.fn is not None:
            self.fn(self.stage, self.n, self.total)

    def set(self, n: int) -> None:
        self.n = min(int(n), self.total)
        if self.tqdm is not None:
            self.tqdm.n = self.n
            self.tqdm.refresh()
        self._emit()

    def update(self, n: int) -> None:
        self.set(self.n + n)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


class _Stages:
    """Ahead-of-time compiled stage functions, cached per (jitted function, input shapes/dtypes).

    The function object is part of the key: stage functions bake static settings in (the drag
    config, max_iters, the output size), so equal input shapes do not imply the same program."""

    def __init__(self):
        self._cache: dict = {}
        self.last_compile_s: dict[str, float] = {}
        # totals since the pipeline was made: programs compiled per stage, and their seconds
        self.compiles: dict[str, int] = {}
        self.compile_s: dict[str, float] = {}
        # export mode: build every stage for another platform with ``jax.export`` instead of
        # running it (outputs are zeros of the right shapes, so a whole edit can be walked through)
        self.export_platform: str | None = None
        self.exported: dict[str, list] = {}
        # several devices: stages run under ``shard_map`` over the edit axis (``use_devices``)
        self.mesh: jax.sharding.Mesh | None = None
        self._sharded: dict = {}
        # measure mode (``plan_batch``): compile, record each stage's memory, return zeros
        self.measured: dict[str, dict] | None = None

    def export_for(self, platform: str | None) -> None:
        """``platform`` ("cuda", "tpu", …): from now on export stages for it instead of running
        them (``self.exported[stage]`` collects the ``jax.export.Exported`` objects); None: run.
        JAX's in-memory trace caches are cleared on every switch: a jitted function traced for
        one platform (say with cuDNN attention) must not be reused for another."""
        if platform != self.export_platform:
            jax.clear_caches()
            self._cache.clear()
        self.export_platform = platform
        self.exported = {}

    @staticmethod
    def _key(name: str, fn, args) -> tuple:
        leaves, tree = jax.tree.flatten(args)
        return (name, fn, tree, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))

    def _export(self, key: tuple, name: str, fn, *args):
        """Build (or reuse, e.g. the LoRA program for another method) the stage's program for
        ``export_platform``; returns zeros of its output shapes."""
        from .precision import target_platform

        exp = self._cache.get(key)
        if exp is None:
            # cuDNN's fused attention has no serialization guarantee; the program is for
            # inspection and building, not for storing, so allow it
            checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _CUDNN_TARGETS]
            with target_platform(self.export_platform):
                exp = jax.export.export(fn, platforms=[self.export_platform], disabled_checks=checks)(*args)
            self._cache[key] = exp
            self.exported.setdefault(name, []).append(exp)
        return jax.tree.unflatten(exp.out_tree, [jnp.zeros(a.shape, a.dtype) for a in exp.out_avals])

    def _over_devices(self, fn, args):
        """``fn`` under ``shard_map`` over the mesh's edit axis: the first argument (the shared
        weights) replicated, every other argument and every output split along its leading edit
        axis. Each device runs its own program — its own drag ``while_loop``, so a slow edit on
        one device does not hold the others. None when the batch does not split evenly."""
        from jax.sharding import PartitionSpec as P

        n = self.mesh.size
        if any(np.ndim(x) == 0 or np.shape(x)[0] % n for x in jax.tree.leaves(args[1:])):
            return None
        wrapped = self._sharded.get(fn)
        if wrapped is None:
            spec = (P(),) + (P("edits"),) * (len(args) - 1)
            wrapped = jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=spec, out_specs=P("edits"),
                                            check_vma=False))
            self._sharded[fn] = wrapped
        return wrapped

    def __call__(self, name: str, fn, *args):
        if self.mesh is not None and self.export_platform is None:
            sharded = self._over_devices(fn, args)
            if sharded is not None:
                fn = sharded
        key = self._key(name, fn, args)
        if self.export_platform is not None:
            return self._export(("export", self.export_platform) + key, name, fn, *args)
        exe = self._cache.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = fn.lower(*args).compile()
            dt = time.perf_counter() - t0
            self.last_compile_s[name] = self.last_compile_s.get(name, 0.0) + dt
            self.compiles[name] = self.compiles.get(name, 0) + 1
            self.compile_s[name] = self.compile_s.get(name, 0.0) + dt
            self._cache[key] = exe
        if self.measured is not None:  # plan_batch: kept, it serves a planned batch of 1
            return self._measure(name, exe, args)
        return exe(*args)

    def _measure(self, name, exe, args):
        """Record the stage's memory (bytes): ``shared`` = its first argument (the weights,
        one copy whatever the batch), ``edit`` = everything else it needs at this batch
        (other arguments, outputs, temporaries). Returns zeros of its outputs."""
        m = exe.memory_analysis()
        shared = tree_bytes(args[0])
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        prev = self.measured.get(name, {"shared": 0, "edit": 0})
        self.measured[name] = {"shared": max(prev["shared"], int(shared)),
                               "edit": max(prev["edit"], int(total - shared))}
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), exe.out_info)

    @property
    def live(self) -> int:
        """Compiled programs currently held."""
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()
        self._sharded.clear()


# ----------------------------------------------------------------------------------------------
# the pipeline object


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
        self.stages = _Stages()
        self._jit: dict = {}
        # per-image LoRAs reused by later edits of the same image, prompt, seed and LoRA settings
        # (``enable_lora_cache``); None = off
        self.lora_cache: dict | None = None
        self.progress_relay = _ProgressRelay()

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

    def enable_lora_cache(self, enabled: bool = True) -> None:
        """Keep every trained LoRA (in memory) and reuse it when the same image is edited again
        with the same prompt, seed and LoRA settings (e.g. by several methods, or in a UI)."""
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
        if key not in self._jit:
            fb = self.feature_block
            n_up = len(self.sd.unet.cfg.block_out_channels)
            if text_block is not None and not 0 <= text_block < n_up:
                from .errors import SettingsError
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
    from . import hub, xla_cache

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


# ----------------------------------------------------------------------------------------------
# editing: requests in, results out


@dataclass(frozen=True)
class EditSettings:
    """Pipeline-level settings of an edit (the drag loop's are the method preset + overrides).

    width: working width (None: the model's native width, 512 for SD-1.5 — the reference UI's
    resize; 0: keep the input size). inversion_strength: None = the method's (0.7 → 35 DDIM
    steps, t* = 681; GoodDrag 0.75 → t* = 741). ``lora`` fields left None are the method's too.
    reference_attention: mutual self-attention in the final denoise (MasaCtrl, on by default;
    DragNoise never uses it).
    clip_double_unit_map: reproduce CLIPDrag's double [0, 1] mapping of the CLIP input (QUIRK).
    remat: the drag step's rematerialisation policy ("off" | "blocks" | "dots"; LoRA training
    has its own, ``lora.remat``). batch_size: edits per vmapped batch, or "auto": the largest
    batch whose every stage fits ``memory_fraction`` of a device's memory (``plan_batch``).
    interpolation: DragText §6's α values (e.g. (0, 0.25, 0.5, 0.75, 1, 1.25, 1.5)): each result
    also holds the images of (z*, c) → (ẑ, ĉ) interpolated linearly (``EditResult.interpolation``),
    denoised like the edit in batches of its size.
    """

    method: str = "dragtext"
    width: int | None = None
    inversion_strength: float | None = None
    lora: LoRASettings = LoRASettings()
    reference_attention: bool = True
    clip_double_unit_map: bool = False
    batch_size: int | str = 8
    remat: str = "off"
    memory_fraction: float = 0.85  # of each device's memory that ``batch_size="auto"`` plans to use
    interpolation: tuple[float, ...] = ()

    def __post_init__(self):
        from .errors import SettingsError, check_number

        if isinstance(self.interpolation, (str, bytes)) or not hasattr(self.interpolation, "__iter__"):
            raise SettingsError(f"setting interpolation = {self.interpolation!r}: must be a list of α values")
        object.__setattr__(self, "interpolation", tuple(check_number("interpolation", a) for a in self.interpolation))

        object.__setattr__(self, "remat", _check_remat("remat", self.remat))

        if self.inversion_strength is not None:
            s = check_number("inversion_strength", self.inversion_strength, low=0.0, high=1.0, low_open=True)
            if round(s * 50) < 1:
                raise SettingsError(f"setting inversion_strength = {s!r}: must give at least one of the 50 "
                                    f"DDIM steps (≥ 0.01)")
            object.__setattr__(self, "inversion_strength", s)
        if self.width is not None:
            w = check_number("width", self.width, nonnegative=True, integer=True)
            if 0 < w < 16:
                raise SettingsError(f"setting width = {w}: must be 0 (keep the input size) or ≥ 16")
            object.__setattr__(self, "width", w)
        object.__setattr__(self, "memory_fraction", check_number("memory_fraction", self.memory_fraction,
                                                                 low=0.0, high=1.0, low_open=True))
        if self.batch_size != "auto":
            object.__setattr__(self, "batch_size", check_number("batch_size", self.batch_size, positive=True,
                                                                integer=True))

    def for_method(self, method: str) -> "EditSettings":
        """These settings with every field left None filled from ``method``'s defaults."""
        from .drag.methods import pipeline_defaults

        d = pipeline_defaults(method)
        lora = replace(self.lora, steps=d["lora_steps"] if self.lora.steps is None else self.lora.steps,
                       lr=d["lora_lr"] if self.lora.lr is None else self.lora.lr)
        inv = d["inversion_strength"] if self.inversion_strength is None else self.inversion_strength
        return replace(self, method=method, lora=lora, inversion_strength=inv)


def _pad_points(arrs: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(arrs), n, 2), np.float32)
    mask = np.zeros((len(arrs), n), bool)
    for i, a in enumerate(arrs):
        out[i, :len(a)] = a
        mask[i, :len(a)] = True
    return out, mask


def _lora_key(p, lora: LoRASettings) -> tuple:
    """What determines an edit's LoRA: its training image, prompt, seed and the LoRA settings."""
    import hashlib

    digest = hashlib.sha1(np.ascontiguousarray(p.lora_image).tobytes()).hexdigest()
    return (digest, p.lora_image.shape, p.request.prompt, int(p.request.seed), lora)


def pow2_bucket(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1): batch and handle-slot buckets."""
    return 1 << max(0, int(n) - 1).bit_length()


def _dummy(p):
    """A padding edit: the image of ``p`` with no handles (done before its first update)."""
    none = np.zeros((0, 2), np.float32)
    return replace(p, handles=none, targets=none)


def _edit_loras(pipe: Pipeline, group: list, settings: EditSettings, reqs: list, c0, b: int, n_real: int,
                progress, timed, timings: dict):
    """The batch's per-edit LoRAs (B, …) and training losses (steps, B): from the cache when
    every edit's LoRA is there, else trained (and cached)."""
    bar = _Bar(progress, "lora", settings.lora.steps, f"LoRA ×{b}")
    keys = jnp.stack([jax.random.PRNGKey(r.seed) for r in reqs])
    lora_imgs = jnp.asarray(np.stack([p.lora_image for p in group]))
    cache_keys = [_lora_key(p, settings.lora) for p in group[:n_real]]
    cache_keys += cache_keys[:1] * (b - n_real)  # a dummy is a copy of the first edit
    cache = pipe.lora_cache if pipe.stages.measured is None else None  # plan_batch measures LoRA too
    if cache is not None and all(k in cache for k in cache_keys):
        loras = jax.tree.map(lambda *xs: jnp.stack(xs), *[cache[k][0] for k in cache_keys])
        lora_losses = jnp.stack([cache[k][1] for k in cache_keys], axis=1)
        timings["lora"] = 0.0
        bar.set(settings.lora.steps)
    else:
        loras, lora_losses = timed("lora", pipe.train_lora, lora_imgs, c0, keys, settings.lora, bar.update)
        if cache is not None:
            for i, k in enumerate(cache_keys[:n_real]):
                cache[k] = (jax.tree.map(lambda x: x[i], loras), lora_losses[:, i])
    bar.close()
    return loras, lora_losses


def _run_group(pipe: Pipeline, group: list, settings: EditSettings, cfg: DragConfig,
               hypers: list[dict], progress, batch: int | None = None,
               n_pairs: int | None = None) -> list:
    """Run one batch of prepared edits of a common working shape through every stage.

    Shapes are fixed so one program per stage serves a whole shape group: the batch is padded
    to ``batch`` with handle-less copies of the first edit (they finish before their first
    update; their results are dropped) and the handle slots to ``n_pairs`` (masked)."""
    from . import data as io

    n_real = len(group)
    batch = max(batch or n_real, n_real)
    group = list(group) + [_dummy(group[0])] * (batch - n_real)
    hypers = list(hypers) + [hypers[0]] * (batch - n_real)
    b = batch
    timings: dict[str, float] = {}
    pipe.stages.last_compile_s = {}

    def timed(name, fn, *a, **k):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*a, **k))
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    reqs = [p.request for p in group]
    sup_hw = group[0].sup_hw
    cfg = replace(cfg, sup_hw=sup_hw)

    ids = pipe.tokenizer.ids([r.prompt for r in reqs])
    c0 = timed("text", pipe.encode_text_ids, ids)
    token_mask = (np.arange(ids.shape[1])[None] < pipe.tokenizer.prompt_lengths([r.prompt for r in reqs])[:, None])
    if cfg.use_clip:
        et = timed("clip_text", pipe.clip_text_embeds, [r.edit_prompt or r.prompt for r in reqs])
    else:
        et = jnp.zeros((b, 1), jnp.float32)
    generated = group[0].z_start is not None
    guide = None
    if generated:  # DragDiffusion's generated-image mode: no LoRA, no inversion (§2.4)
        loras = jax.tree.map(lambda x: jnp.broadcast_to(x, (b,) + x.shape), zeros_lora(pipe.sd.unet.lora))
        lora_losses = np.zeros((0, b), np.float32)
        zt = jnp.asarray(np.stack([p.z_start for p in group]))
        gen = reqs[0].generation
        if gen.guidance_scale != 1:
            if cfg.host == "dragnoise":
                from .errors import SettingsError
                raise SettingsError("drags on generated images with guidance_scale ≠ 1 are not available for "
                                    "DragNoise (its bottleneck is one UNet row); use guidance_scale 1")
            uncond = timed("text", pipe.encode_text_ids, pipe.tokenizer.ids([gen.negative_prompt]))[0]
            guide = {"uncond": uncond, "scale": jnp.float32(gen.guidance_scale)}
    else:
        z0 = timed("encode", pipe.encode_images, jnp.asarray(np.stack([p.image for p in group])))
        loras, lora_losses = _edit_loras(pipe, group, settings, reqs, c0, b, n_real, progress, timed, timings)
        zt = timed("invert", pipe.invert, loras, z0, c0, settings.inversion_strength)

    n = max([len(p.handles) for p in group] + [n_pairs or 1])
    h0, mask = _pad_points([p.handles for p in group], n)
    tg, _ = _pad_points([p.targets for p in group], n)
    # no mask drawn: keep is all zeros (no background term); GoodDrag and DragNoise
    # (background "always") keep the whole image instead
    keep = np.stack([np.ones_like(p.keep) if cfg.background == "always" and not p.masked else p.keep
                     for p in group])
    t_star = int(pipe.schedule.timesteps[pipe.schedule.start_index(settings.inversion_strength)])
    hyp = DragHypers(*(jnp.asarray([hp[k] for hp in hypers], jnp.float32) for k in DragHypers._fields))

    cb = None
    if progress:
        dbar = _Bar(progress, "drag", update_budget(cfg), f"drag ×{b}")

        def cb(it, done):
            dbar.set(int(np.max(np.asarray(it))))

    prep, loop = pipe.drag_runner(cfg, settings.clip_double_unit_map, progress=cb is not None,
                                  remat=settings.remat, guided=guide is not None)
    shared = pipe.shared_params(cfg.use_clip, guide)
    args = (shared, loras, zt, c0, jnp.asarray(h0), jnp.asarray(tg), jnp.asarray(mask),
            jnp.asarray(keep), jnp.asarray(token_mask, jnp.float32), et,
            jnp.full((b,), t_star, jnp.int32), hyp)
    inputs, state = timed("drag_prepare", pipe.stages, "drag_prepare", prep, *args)
    pipe.progress_relay.target = cb
    try:
        state = timed("drag", pipe.stages, "drag", loop, shared, loras, inputs, state)
    finally:
        pipe.progress_relay.target = None
    if cb is not None:
        dbar.close()
    denoising = _Bar(progress, "denoise", 1 + len(settings.interpolation) + len(cfg.snapshots), f"denoise ×{b}")
    plan = _denoise_plan(pipe, cfg, settings, zt, c0, inputs, state)
    if guide is not None:
        plan.update(uncond=jnp.broadcast_to(guide["uncond"], c0.shape), scale=jnp.full((b,), guide["scale"]))
    z_edit = timed("denoise", pipe.denoise, loras, **plan)
    work_hw = group[0].image.shape[:2]
    out = np.asarray(timed("decode", pipe.decode_to_uint8, z_edit, work_hw))
    denoising.update(1)
    extras = {}
    for kind, value, variant in _extra_denoise_plans(pipe, cfg, settings, plan, shared, loras, zt, c0, t_star,
                                                     state):
        z_x = timed("denoise_extra", pipe.denoise, loras, **variant)
        extras[(kind, value)] = np.asarray(timed("decode_extra", pipe.decode_to_uint8, z_x, work_hw)), \
            np.isfinite(np.asarray(z_x)).reshape(b, -1).all(axis=1)
        denoising.update(1)
    denoising.close()
    compile_s = dict(pipe.stages.last_compile_s)

    st = jax.tree.map(np.asarray, state)
    reached = np.asarray(drag_reached(cfg, state))
    results = []
    for i, p in enumerate(group[:n_real]):
        img = out[i]
        finite = bool(np.isfinite(np.asarray(z_edit[i])).all())
        if img.shape[:2] != p.in_hw and finite:
            img = np.asarray(Image.fromarray(img).resize((p.in_hw[1], p.in_hw[0]), Image.BILINEAR))
        k = len(p.handles)
        n_traj = int(st.it[i]) + int(st.done[i])
        config = {
            "method": settings.method, "drag": _cfg_dict(cfg), "hypers": hypers[i],
            "lora": {f: getattr(settings.lora, f) for f in settings.lora.__dataclass_fields__},
            "inversion_strength": settings.inversion_strength, "t_star": t_star,
            "reference_attention": settings.reference_attention and cfg.host != "dragnoise",
            "remat": settings.remat,
            "clip_double_unit_map": settings.clip_double_unit_map,
            "working_size": list(work_hw), "supervision_size": list(sup_hw), "input_size": list(p.in_hw),
            "prompt": p.request.prompt, "edit_prompt": p.request.edit_prompt or p.request.prompt,
            "seed": p.request.seed, "model": str(pipe.sd.source),
            "dtype": jnp.dtype(pipe.policy.compute).name, "batch_size": b, "batch_edits": n_real,
            "lora_final_loss": float(np.asarray(lora_losses)[-1, i]) if len(lora_losses) else None,
        }
        if p.request.source is not None:
            config["input"] = p.request.source  # e.g. the EXIF orientation applied on reading
        if generated:
            config["generation"] = dataclasses.asdict(p.request.generation)
            config["lora"] = None  # no LoRA on a generated image (as the reference UI)
        if settings.interpolation:
            config["interpolation"] = list(settings.interpolation)

        def final_image(kind, value):
            im, ok = extras[(kind, value)]
            im = im[i]
            if not ok[i]:
                return None
            if im.shape[:2] != p.in_hw:
                im = np.asarray(Image.fromarray(im).resize((p.in_hw[1], p.in_hw[0]), Image.BILINEAR))
            return im
        interp = [(float(a), final_image("alpha", a)) for a in settings.interpolation]
        interp = [] if any(im is None for _, im in interp) else interp
        snaps = [{"max_iters": cap, "iterations": int(st.snap_it[i, s]),
                  "reached": bool(np.all(np.linalg.norm(p.targets - st.snap_handles[i, s, :k], axis=-1) < STOP_DISTANCE)),
                  "handles": p.to_pixels(st.snap_handles[i, s, :k]), "image": final_image("iters", cap)}
                 for s, cap in enumerate(cfg.snapshots)]
        failure = None
        if bool(st.failed[i]):
            from .drag import FAILURES

            failure = {"diverged": {"iteration": int(st.fail_it[i]), "what": FAILURES[int(st.fail_what[i])]}}
            img = None
        elif not finite:
            failure = {"diverged": {"iteration": int(st.it[i]), "what": "denoise"}}
            img = None
        results.append(io.EditResult(
            name=p.request.name, image=img, failure=failure,
            handles=p.to_pixels(st.handles[i, :k]), targets=p.to_pixels(p.targets),
            initial_handles=p.to_pixels(p.handles), trajectory=p.to_pixels(st.traj[i, :max(n_traj, 1), :k]),
            iterations=int(st.it[i]), reached=bool(reached[i]),
            losses=[float(v) for v in st.losses[i, :int(st.it[i])]],
            timings={**timings, **{f"compile_{k_}": v for k_, v in compile_s.items()}},
            config=config, interpolation=interp if failure is None else [],
            snapshots=snaps if failure is None else []))
    return results


def _denoise_plan(pipe: Pipeline, cfg: DragConfig, settings: EditSettings, zt, c0, inputs, state) -> dict:
    """The keyword arguments of ``pipe.denoise`` (all but the LoRAs) for the denoising after the
    drag, per host: the pair [z*, ẑ] on [c, ĉ] with mutual self-attention (DragDiffusion,
    CLIPDrag, FreeDrag); GoodDrag from where its drag phase stopped, the source branch from the
    original trajectory there; DragNoise from [z*, z*] with the optimised bottleneck in both rows
    for the first K − end_step steps, without mutual self-attention (§7)."""
    strength = settings.inversion_strength
    if cfg.host == "gooddrag":
        _, pre = inputs
        z_src = jnp.take_along_axis(pre.zs, state.j[:, None, None, None, None], axis=1)[:, 0]
        return dict(z_src=z_src, z_edit=state.z, c_src=c0, c_edit=state.c_out, strength=strength,
                    reference=settings.reference_attention, start=state.j)
    if cfg.host == "dragnoise":
        k = round(strength * pipe.schedule.num_inference_steps)
        return dict(z_src=zt, z_edit=zt, c_src=c0, c_edit=state.c, strength=strength, reference=False,
                    mid=state.z, mid_steps=max(0, k - cfg.end_step))
    return dict(z_src=zt, z_edit=state.z, c_src=c0, c_edit=state.c, strength=strength,
                reference=settings.reference_attention)


def _lerp(a, b, alpha: float):
    """(1 − α)·a + α·b: exactly a at α = 0 and b at α = 1."""
    return (1.0 - alpha) * a + alpha * b


def _extra_denoise_plans(pipe: Pipeline, cfg: DragConfig, settings: EditSettings, plan: dict, shared, loras, zt,
                         c0, t_star: int, state):
    """(kind, value, denoise kwargs) of the extra images of the batch, each denoised like the
    edit (the same program: same batch, same static settings):

    ("alpha", α) — DragText §6: the optimised variable and the text embedding both interpolated
    linearly between their values before the drag (z* or GoodDrag's source latent at its stop
    step, DragNoise's bottleneck at (z*, c); c) and after it (ẑ, ĉ); α = 0 is the reconstruction
    (what a drag that moves nothing gives), α = 1 the edit, α > 1 extrapolates.
    ("iters", cap) — the snapshot of (z, ĉ) at an iteration cap (``cfg.snapshots``)."""
    if settings.interpolation:
        var, start = ("mid", None) if cfg.host == "dragnoise" else ("z_edit", plan["z_src"])
        if cfg.host == "dragnoise":  # the bottleneck before the drag: the mid-block output at (z*, c)
            nets = pipe.drag_networks(settings.clip_double_unit_map, settings.remat)
            fn = pipe._j("bottleneck", jax.vmap(nets.bottleneck, in_axes=(None, 0, 0, 0, None)))
            start = fn(shared, loras, zt, c0, jnp.int32(t_star))
        for a in settings.interpolation:
            yield "alpha", a, {**plan, var: _lerp(start, plan[var], a), "c_edit": _lerp(plan["c_src"], plan["c_edit"], a)}
    var = "mid" if cfg.host == "dragnoise" else "z_edit"
    for s, cap in enumerate(cfg.snapshots):
        yield "iters", cap, {**plan, var: state.snap_z[:, s], "c_edit": state.snap_c[:, s]}


def _cfg_dict(cfg: DragConfig) -> dict:
    return {f: (getattr(cfg, f) if f != "schedule" else vars(cfg.schedule))
            for f in cfg.__dataclass_fields__ if f != "schedule"} | {
        "num_inference_steps": cfg.schedule.num_inference_steps}


def plan_batch(pipe: Pipeline, p, settings: EditSettings, cfg: DragConfig, hypers: dict,
               n_pairs: int) -> tuple[int, dict]:
    """The largest batch of edits shaped like ``p`` that fits every stage in memory.

    Every stage is compiled at batch 1 (per device) and XLA's ``memory_analysis`` of it split
    into the shared weights and the per-edit rest (arguments, outputs, temporaries); then
    batch = ⌊(fraction · device memory − weights) / per-edit⌋ for the most demanding stage,
    assuming the per-edit part grows linearly with the batch (vmapped stages). Returns (batch
    per device ≥ 1, {stage: {"shared", "edit"} bytes})."""
    settings = settings.for_method(settings.method)  # fields left None: the method's defaults
    st = pipe.stages
    st.measured = {}
    mesh, st.mesh = st.mesh, None  # measure one device's program
    try:
        _run_group(pipe, [p], replace(settings, batch_size=1), cfg, [hypers], False, batch=1, n_pairs=n_pairs)
        measured = dict(st.measured)
    finally:
        st.measured, st.mesh = None, mesh
    budget = settings.memory_fraction * pipe.device_memory()
    weights = pipe.weight_bytes()  # resident once, whatever the batch
    per_edit = max(max(m["edit"] for m in measured.values()), 1)
    return max(1, int((budget - weights) // per_edit)), measured


def edit_batch(pipe: Pipeline, requests: Sequence, method: str = "dragtext", *,
               settings: EditSettings | None = None, progress: bool | Callable[[str, int, int], None] = False,
               on_result: Callable[[int, Any], None] | None = None,
               on_error: Callable[[list[int], Exception], None] | None = None, **overrides) -> list:
    """Run many edits: requests are grouped by working shape and each group runs as vmapped
    batches of one fixed size, b = min(``settings.batch_size``, the group's size rounded up to
    a power of two), the last one padded with dummy edits, and the handle slots padded to the
    group's largest count rounded up to a power of two — so each stage compiles at most once per
    working shape. Between groups, compiled programs are released once more than
    ``pipe.max_live_programs`` are held (a run of any length keeps bounded memory).

    ``progress``: True shows tqdm bars; a callable gets ``(stage, done, total)`` for the stages
    "lora", "drag" (latent updates) and "denoise" of each batch (a UI's progress bar).

    Returns ``EditResult``s in request order. ``on_result(i, result)`` is called as each batch
    finishes (write results as they come); with ``on_error(indices, exception)`` a batch that
    raises is reported there and the others still run (its results stay None). ``overrides``:
    drag settings (``methods.resolve`` names, e.g. ``max_iters=40``, ``latent_lr=0.02``); a
    request's own ``hypers`` override the continuous ones for that edit. Raises RequestError
    naming the first bad request."""
    from . import data as io
    from .drag.methods import HYPER_KEYS, check_hypers, resolve, valid_settings
    from .errors import SettingsError

    cfg, hyp = resolve(method, **overrides)
    settings = (settings or EditSettings()).for_method(method)
    if cfg.use_clip:
        pipe._need_clip()
    native = pipe.native_width
    width = native if settings.width is None else (settings.width or None)
    for i, r in enumerate(requests):  # every request's type and hyperparameters before any work
        if not isinstance(r, io.EditRequest):
            raise io.RequestError(f"request {i}: expected an EditRequest, got {type(r).__name__}")
        if not isinstance(r.hypers, dict):
            raise io.RequestError(f"{r.name}: hypers must be a dict of hyperparameters, got {type(r.hypers).__name__}")
        usable = [k for k in valid_settings(method) if k in HYPER_KEYS]
        bad = [k for k in r.hypers if k not in usable]
        if bad:
            raise io.RequestError(f"{r.name}: hyperparameter(s) {bad} not used by method {method!r}; "
                                  f"valid: {', '.join(usable)}")
        try:
            check_hypers(r.hypers)
        except SettingsError as e:
            raise io.RequestError(f"{r.name}: {e}") from None
    requests, latents = _generate_images(pipe, requests, settings)
    prepared = []
    for r, z_start in zip(requests, latents):
        if z_start is None:
            prepared.append(io.prepare(r, width, native))
        else:  # the generation's own size and latent at t*
            prepared.append(replace(io.prepare(r, None, native), z_start=z_start))
    groups: dict = {}
    for i, p in enumerate(prepared):
        g = p.request.generation
        gen_key = None if g is None else (g.guidance_scale, g.negative_prompt)
        groups.setdefault((io.bucket_key(p), gen_key), []).append(i)
    results: list = [None] * len(prepared)
    for key in sorted(groups, key=lambda k: (k[0], repr(k[1]))):
        idx = groups[key]
        n_pairs = pow2_bucket(max(len(prepared[i].handles) for i in idx))
        limit = settings.batch_size
        if limit == "auto":
            per_device, _ = plan_batch(pipe, prepared[idx[0]], settings, cfg, hyp, n_pairs)
            limit = per_device * pipe.n_devices
        b = min(limit, pow2_bucket(len(idx)))
        b = -(-b // pipe.n_devices) * pipe.n_devices  # an equal share for every device
        for s in range(0, len(idx), b):
            chunk = idx[s:s + b]
            hps = [{**hyp, **{k: float(v) for k, v in prepared[i].request.hypers.items()}} for i in chunk]
            try:
                outs = _run_group(pipe, [prepared[i] for i in chunk], settings, cfg, hps, progress,
                                  batch=b, n_pairs=n_pairs)
            except Exception as e:  # noqa: BLE001 - reported per batch when the caller asks
                if on_error is None:
                    raise
                on_error(chunk, e)
                continue
            for i, o in zip(chunk, outs):
                results[i] = o
                if on_result is not None:
                    on_result(i, o)
        if pipe.stages.live > pipe.max_live_programs:
            pipe.release_compiled()
    return results


def _generate_images(pipe: Pipeline, requests: Sequence, settings: EditSettings) -> tuple[list, list]:
    """Fill in the image of every request with a ``generation`` (its spec checked first): one
    batched DDIM sampling per (size, guidance, negative prompt). Returns (requests, the latent at
    t* of each generated request, None for the others)."""
    from . import data as io

    out, latents, todo = list(requests), [None] * len(requests), {}
    for i, r in enumerate(requests):
        if r.generation is None:
            continue
        name = r.name if isinstance(r.name, str) else repr(r.name)
        if not isinstance(r.generation, io.Generation):
            raise io.RequestError(f"{name}: generation must be a jaxdrag.Generation, got {type(r.generation).__name__}")
        g = r.generation.check(name)
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            raise io.RequestError(f"{name}: a generated image needs its prompt")
        todo.setdefault((g.size(pipe.native_width), g.guidance_scale, g.negative_prompt), []).append(i)
    k = pipe.schedule.start_index(settings.inversion_strength)  # the steps taken before t*
    for (hw, scale, negative), idx in todo.items():
        images, _, z_k = pipe.generate([requests[i].prompt for i in idx], seed=[requests[i].generation.seed for i in idx],
                                       guidance_scale=scale, negative_prompt=negative, hw=hw, stop_at=k)
        for j, i in enumerate(idx):
            out[i] = replace(requests[i], image=np.asarray(images[j]))
            latents[i] = np.asarray(z_k[j])
    return out, latents


def edit(pipe: Pipeline, image, points, prompt: str = "", mask=None, method: str = "dragtext", *,
         edit_prompt: str | None = None, seed: int = 0, settings: EditSettings | None = None,
         progress: bool = False, generation=None, **overrides):
    """Edit one image: ``points`` = [(x, y), …] pixels alternating handle, target (DragBench's
    convention); ``mask`` (H, W) nonzero = editable. Returns an ``EditResult`` with the edited
    image (H, W, 3) uint8, final handles, trajectory, iteration count and timings.
    ``generation`` (a ``Generation``; ``image`` None): drag on the image generated from ``prompt``."""
    from .data import EditRequest

    req = EditRequest(image=None if image is None else np.asarray(image), points=points, prompt=prompt, mask=mask,
                      edit_prompt=edit_prompt, seed=seed, generation=generation)
    return edit_batch(pipe, [req], method, settings=settings, progress=progress, **overrides)[0]
