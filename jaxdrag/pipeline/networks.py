"""The SD-1.5 networks as pure functions over their parameters (``Pipeline``: the UNet, VAE, text
encoder and CLIP, the devices and the jit caches) and ``load_pipeline``. Its LoRA, sampling and
drag-network methods are thin doors into their rooms: ``lora``, ``sampling``, ``dragnets``."""

from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import weights
from ..drag import DragConfig, DragNetworks
from ..precision import Policy, policy_for
from ..schedule import DDIM
from ..tokenizer import Tokenizer

from . import dragnets, sampling
from . import lora as lora_room
from .lora import LoRASettings
from ..models.canvas import encoder_canvas
from .pixels import Array, clip_pixels, tree_bytes
from .stages import ProgressRelay, Stages


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
        self.jit_cache: dict = {}
        # jitted functions are made once even when stages are compiled from several threads
        # (``editing.compile_ahead``): a second maker of the same function would compile it again
        self.jit_lock = threading.RLock()
        # per-image LoRAs reused by later edits of the same image, prompt, seed and LoRA settings
        # (``enable_lora_cache``); None = off
        self.lora_cache: dict | None = None
        self.loras_trained = 0  # per-edit LoRAs trained so far (a cached one is not trained again)
        self.inversions_run = 0  # per-edit DDIM inversions run so far (likewise)
        self.progress_relay = ProgressRelay()
        self._device = jax.local_devices()[0]  # where the weights live (one device; None with a mesh)

    def use_devices(self, devices: Sequence | None = None) -> int:
        """Spread every batch over ``devices`` (default: all local devices): the base weights
        are replicated once, the edits split evenly (``edit_batch`` rounds its batches up to a
        multiple of the device count) and each device runs its own programs. One device (or
        ``devices=[]``) switches back to single-device runs. Returns the device count in use."""
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        devices = list(jax.local_devices() if devices is None else devices)
        if len(devices) <= 1 and self.stages.mesh is None and \
                (devices or jax.local_devices())[0] == self._device:
            return 1  # already there: the compiled programs stay
        self.release_compiled()
        if len(devices) <= 1:
            self.stages.mesh, place = None, (devices or jax.local_devices())[0]
            self._device = place
        else:
            self._device = None
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
        self.jit_cache.clear()

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
                   mid_use=None, remat: bool = False, canvas=None):
        """``canvas``: a ``models.canvas.unet_canvas`` of x's batch (edits of their own sizes)."""
        m = nnx.merge(self.sd.unet.graphdef, lora, params)
        return m(x, t, ctx, reference_attention=reference, mid_override=mid_override, mid_use=mid_use,
                 remat=remat, canvas=canvas)

    def unet_levels(self) -> int:
        """The UNet's stride-2 downsamplers (3 for SD-1.5): a latent canvas's sides are multiples of 2^this."""
        return len(self.sd.unet.cfg.block_out_channels) - 1

    def vae_levels(self) -> int:
        """The VAE's stride-2 stages (3 for SD: a factor 8 between pixels and latents)."""
        return len(self.sd.vae.cfg.block_out_channels) - 1

    def vae_encode_apply(self, params, images, canvas=None):
        return nnx.merge(self.sd.vae.graphdef, params).encode(images, canvas)

    def vae_decode_apply(self, params, latents, canvas=None):
        return nnx.merge(self.sd.vae.graphdef, params).decode(latents / self.scaling_factor, canvas)

    def text_apply(self, params, ids):
        return nnx.merge(self.sd.text_encoder.graphdef, params)(ids)[0]

    def clip_image_apply(self, params, images, double_unit_map: bool = False, valid_hw=None):
        """[-1, 1] images → ``clip_pixels`` → ViT → projection (unnormalised embeddings);
        ``valid_hw`` (B, 2): each image is its top-left region of that size (a masked canvas)."""
        m = nnx.merge(self.clip.graphdef, params)
        return m.image_embeds(clip_pixels(images, m.vision_cfg.image_size, double_unit_map, valid_hw))

    def clip_text_apply(self, params, ids):
        return nnx.merge(self.clip.graphdef, params).text_embeds(ids)

    def jitted(self, name, fn, **kw):
        """``jax.jit(fn, **kw)`` made once per ``name`` for this pipeline (thread-safe): the rooms'
        programs are cached on the pipeline, so a second call traces nothing new."""
        with self.jit_lock:
            if name not in self.jit_cache:
                self.jit_cache[name] = jax.jit(fn, **kw)
            return self.jit_cache[name]

    # -------------------------------------------------------------- public network methods
    def encode_prompt(self, prompts: Sequence[str]) -> Array:
        ids = jnp.asarray(self.tokenizer.ids(list(prompts)))
        return self.jitted("text", self.text_apply)(self.sd.text_encoder.params, ids)

    def unet(self, latents, t, text_emb, lora=None, *, reference: bool = False):
        lora = lora if lora is not None else jax.tree.map(
            lambda s: jnp.zeros(s.shape, jnp.float32), self.sd.unet.lora)
        fn = self.jitted(f"unet_ref{reference}",
                     lambda p, lo, x, t, c: self.unet_apply(p, lo, x, t, c, reference=reference)[0])
        t = jnp.broadcast_to(jnp.asarray(t), (latents.shape[0],))
        return fn(self.sd.unet.params, lora, jnp.asarray(latents, jnp.float32), t,
                  jnp.asarray(text_emb, jnp.float32))

    def vae_encode(self, images) -> Array:
        fn = self.jitted("vae_enc", lambda p, x: self.vae_encode_apply(p, x)[0] * self.scaling_factor)
        return fn(self.sd.vae.params, jnp.asarray(images, jnp.float32))

    def vae_decode(self, latents) -> Array:
        return self.jitted("vae_dec", self.vae_decode_apply)(self.sd.vae.params, jnp.asarray(latents, jnp.float32))

    def require_clip(self):
        """Raise unless a CLIP model is loaded (CLIPDrag's methods need it)."""
        if self.clip is None:
            raise ValueError("this pipeline has no CLIP model: pass clip=PATH to load_pipeline "
                             "(an HF CLIP ViT-B/16 folder) for CLIPDrag")

    def clip_image_embeds(self, images) -> Array:
        self.require_clip()
        return self.jitted("clip_img", self.clip_image_apply)(self.clip.params, jnp.asarray(images, jnp.float32))

    def clip_text_embeds(self, prompts: Sequence[str]) -> Array:
        self.require_clip()
        ids = jnp.asarray(self.clip_tokenizer.ids(list(prompts)))
        return self.stages("clip_text", self.jitted("clip_txt", self.clip_text_apply), self.clip.params, ids)

    # -------------------------------------------------------------- editing stages (batched)
    def lora_template(self):
        return self.sd.unet.lora

    def train_lora(self, images_lora: Array, ctx: Array, keys: Array, settings: LoRASettings,
                   on_chunk: Callable[[int], None] | None = None, sizes: Array | None = None):
        """Per-edit LoRA, vmapped over edits (``lora.train_lora``): (lora (B, …), losses (steps, B)).
        ``sizes`` (B, 2): each LoRA image's size inside the batch's canvas."""
        return lora_room.train_lora(self, images_lora, ctx, keys, settings, on_chunk, sizes)

    def invert(self, loras, z0: Array, ctx: Array, strength: float, sizes: Array | None = None) -> Array:
        """DDIM inversion z0 → z_{t*} per edit (``sampling.invert``; ``sizes``: latent sizes in a canvas)."""
        return sampling.invert(self, loras, z0, ctx, strength, sizes)

    def denoise(self, loras, z_src: Array, z_edit: Array, c_src: Array, c_edit: Array,
                strength: float, reference: bool = True, *, start: Array | None = None,
                mid: Array | None = None, mid_steps: int = 0, uncond: Array | None = None,
                scale: Array | None = None, sizes: Array | None = None) -> Array:
        """Denoise the pair [z*, ẑ] from t* to 0 with reference attention (``sampling.denoise``);
        the edited branch's final latent (B, h, w, 4). ``sizes``: latent sizes in a masked canvas."""
        return sampling.denoise(self, loras, z_src, z_edit, c_src, c_edit, strength, reference, start=start,
                                mid=mid, mid_steps=mid_steps, uncond=uncond, scale=scale, sizes=sizes)

    def generate(self, prompts: Sequence[str], *, seed: int | Sequence[int] = 0, guidance_scale: float = 7.5,
                 steps: int | None = None, negative_prompt: str = "",
                 hw: tuple[int, int] | None = None, stop_at: int | None = None):
        """Text-to-image DDIM sampling with classifier-free guidance (``sampling.generate``):
        (uint8 images (B, H, W, 3), final latents (B, h, w, 4)[, latents after ``stop_at`` steps])."""
        return sampling.generate(self, prompts, seed=seed, guidance_scale=guidance_scale, steps=steps,
                                 negative_prompt=negative_prompt, hw=hw, stop_at=stop_at)

    def decode_to_uint8(self, latents: Array, out_hw: tuple[int, int], sizes: Array | None = None,
                        out_sizes: Array | None = None) -> Array:
        """VAE decode → [0, 1] → bilinear resize to ``out_hw`` → uint8 (``sampling.decode_to_uint8``;
        ``sizes``, ``out_sizes``: latent and image sizes in a masked canvas)."""
        return sampling.decode_to_uint8(self, latents, out_hw, sizes, out_sizes)

    def encode_images(self, images: Array, sizes: Array | None = None) -> Array:
        """Posterior mean × scaling factor (the latent DragDiffusion inverts). ``sizes`` (B, 2):
        each image's size inside the batch's canvas (a masked canvas; latents ⌊h/8⌋ × ⌊w/8⌋ valid)."""
        if sizes is None:
            fn = self.jitted("vae_enc", lambda p, x: self.vae_encode_apply(p, x)[0] * self.scaling_factor)
            return self.stages("encode", fn, self.sd.vae.params, images)
        fn = self.jitted("vae_enc_masked", lambda p, x, hw: self.vae_encode_apply(
            p, x, encoder_canvas(hw, x.shape[1:3], self.vae_levels()))[0] * self.scaling_factor)
        return self.stages("encode", fn, self.sd.vae.params, images, jnp.asarray(sizes, jnp.int32))

    def encode_text_ids(self, ids) -> Array:
        return self.stages("text", self.jitted("text", self.text_apply), self.sd.text_encoder.params,
                           jnp.asarray(ids))

    def drag_networks(self, clip_double_unit_map: bool = False, remat: str = "off", text_block: int | None = None,
                      guided: bool = False) -> DragNetworks:
        """The engine's network functions over this pipeline, cached (``dragnets.drag_networks``)."""
        return dragnets.drag_networks(self, clip_double_unit_map, remat, text_block, guided)

    def drag_runner(self, cfg: DragConfig, clip_double_unit_map: bool = False, progress: bool = False,
                    remat: str = "off", guided: bool = False):
        """(prep, loop) for ``cfg``, cached (``dragnets.drag_runner``)."""
        return dragnets.drag_runner(self, cfg, clip_double_unit_map, progress, remat, guided)

    def shared_params(self, use_clip: bool, guide: dict | None = None):
        """The broadcast parameters of the drag step (``dragnets.shared_params``)."""
        return dragnets.shared_params(self, use_clip, guide)

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


