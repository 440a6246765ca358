"""Component loaders: a network built abstractly and filled from a tensor source
(``Component``), diffusers UNet/VAE folders, HF text encoders and CLIP, LDM single files, and
whole models (``load_sd``: a diffusers pipeline folder or an LDM single file; ``load_vae``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from .files import TensorSource, WeightsError, model_files
from .keymap import assign, key_table
from .ldm import (LDM_IGNORED, LDM_TEXT, LDM_UNET, LDM_VAE, is_buffer, is_vae_attn_proj, ldm_unet_key, ldm_vae_key,
                  new_vae_name)


@dataclass
class Component:
    """A network split for functional use: ``graphdef`` + ``params`` (base weights: float32, matmul
    and conv kernels in their layer's compute dtype, see ``store_in_compute_dtype``) and a
    ``lora`` template state (abstract shapes; empty when the network has no LoRA)."""

    cfg: Any
    graphdef: Any
    params: nnx.State
    lora: nnx.State

    def module(self, lora: nnx.State | None = None, params: nnx.State | None = None):
        states = [params if params is not None else self.params]
        if jax.tree.leaves(self.lora):
            states.insert(0, lora if lora is not None else _zeros_like(self.lora))
        return nnx.merge(self.graphdef, *states)


def store_in_compute_dtype(graphdef, lora, params):
    """Base weights cast once to the dtype their layer computes in: every module with a ``dtype``
    and a ``kernel`` (Linear, Conv) gets its kernel in that dtype, so on accelerators the frozen
    bfloat16 weights are read as they are instead of being converted at every use inside the
    scan/while bodies. Layers that compute in float32 (the final projections) keep float32
    kernels; biases, norm scales and embeddings stay float32. A no-op in float32."""
    model = nnx.merge(graphdef, *([_zeros_like(lora)] if jax.tree.leaves(lora) else []), params)
    changed = False
    for _, node in nnx.iter_graph(model):
        kernel = getattr(node, "kernel", None)
        dtype = getattr(node, "dtype", None)
        if isinstance(kernel, nnx.Param) and dtype is not None and kernel[...].dtype != jnp.dtype(dtype):
            kernel.value = kernel[...].astype(dtype)
            changed = True
    if not changed:
        return params
    return nnx.split(model, nnx.LoRAParam, nnx.Param)[2]


def _zeros_like(state):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)


def abstract(build: Callable[[], nnx.Module]):
    """(graphdef, lora template, base template) of a network, without allocating weights."""
    model = nnx.eval_shape(build)
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, nnx.Param)
    return graphdef, lora, base


def load_component(build: Callable[[], nnx.Module], source: TensorSource, *, cfg: Any,
                   rename: Callable[[str], str] = lambda k: k,
                   ignore: Callable[[str], bool] = is_buffer) -> Component:
    """Build the network abstractly and fill its base parameters from ``source`` (torch names,
    after ``rename``)."""
    graphdef, lora, base = abstract(build)
    names = {}
    for k in source.keys():
        new = rename(k)
        if new is None:
            continue
        if new in names:
            raise WeightsError(f"{source.label}: keys {names[new]!r} and {k!r} both map to {new!r}")
        names[new] = k
    tensors = {n: (lambda k=k: source.get(k)) for n, k in names.items()}
    shapes = {n: source.shape(k) for n, k in names.items()}
    params = assign(base, tensors, shapes, label=source.label, ignore=ignore,
                    where=lambda n: f"{source.file_of(names[n])} (key {names[n]!r})")
    return Component(cfg, graphdef, store_in_compute_dtype(graphdef, lora, params), lora)


def read_json(path: Path) -> dict:
    if not path.exists():
        raise WeightsError(f"{path}: not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: invalid JSON ({e})") from None


def _cfg(fn, *args):
    try:
        return fn(*args)
    except ValueError as e:
        raise WeightsError(str(e)) from None


def load_diffusers_unet(folder: Path, *, dtype, attn_impl="auto", lora_rank: int = 16) -> Component:
    from ..models.unet import UNet2DConditionModel, UNetConfig

    cfg = _cfg(UNetConfig.from_diffusers, read_json(folder / "config.json"), str(folder / "config.json"))
    src = TensorSource(model_files(folder, "diffusion_pytorch_model"))
    return load_component(lambda: UNet2DConditionModel(cfg, lora_rank=lora_rank, dtype=dtype,
                                                       attn_impl=attn_impl), src, cfg=cfg)


def load_diffusers_vae(folder: Path, *, dtype, attn_impl="auto") -> Component:
    from ..models.vae import AutoencoderKL, VAEConfig

    cfg = _cfg(VAEConfig.from_diffusers, read_json(folder / "config.json"), str(folder / "config.json"))
    src = TensorSource(model_files(folder, "diffusion_pytorch_model"))
    return load_component(lambda: AutoencoderKL(cfg, dtype=dtype, attn_impl=attn_impl),
                          src, cfg=cfg, rename=new_vae_name)


def text_model_name(key: str) -> str:
    """``CLIPTextModel`` keys with the ``text_model.`` prefix: the hub's SD-1.5 files have it,
    transformers ≥ 5 writes them without it, and both are accepted."""
    return key if key.startswith("text_model.") else "text_model." + key


def load_hf_text_encoder(folder: Path, *, dtype, attn_impl="auto") -> Component:
    from ..models.clip import CLIPTextConfig, CLIPTextModel

    cfg = _cfg(CLIPTextConfig.from_hf, read_json(folder / "config.json"), str(folder / "config.json"))
    src = TensorSource(model_files(folder, "model"))
    return load_component(lambda: CLIPTextModel(cfg, dtype=dtype, attn_impl=attn_impl),
                          src, cfg=cfg, rename=text_model_name)


def load_hf_clip(folder: Path, *, dtype, attn_impl="auto") -> Component:
    """An HF ``CLIPModel`` folder (e.g. openai/clip-vit-base-patch16): both towers + projections."""
    from ..models.clip import CLIPModel, clip_configs_from_json

    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder (expected an HF CLIP folder with config.json and "
                           f"model.safetensors)")
    if not (folder / "config.json").exists():
        raise WeightsError(f"{folder / 'config.json'}: not found")
    tc, vc, proj = _cfg(clip_configs_from_json, folder / "config.json")
    src = TensorSource(model_files(folder, "model"))
    return load_component(
        lambda: CLIPModel(tc, vc, proj, dtype=dtype, attn_impl=attn_impl), src,
        cfg=(tc, vc, proj), ignore=lambda k: is_buffer(k) or k == "logit_scale")


def load_single_file(path: Path, *, dtype, attn_impl="auto", lora_rank: int = 16, configs=None,
                     text: bool = True):
    """An LDM single-file SD-1.x ``.safetensors`` → (unet, vae, text_encoder) Components.

    Single files carry no config: the SD-1.5 configs are used (or ``configs`` = (UNetConfig,
    VAEConfig, CLIPTextConfig)) after checking the architecture from tensor shapes (files whose
    cross-attention width differs from the config's, e.g. SD-2.x for SD-1.5, are rejected by name).
    ``text=False`` loads only the UNet and VAE (text_encoder None) and leaves every
    ``cond_stage_model.`` key to the caller (SD-2.x's OpenCLIP tower, ``eval.networks``)."""
    from ..models.clip import SD15_TEXT, CLIPTextModel
    from ..models.unet import SD15_UNET, UNet2DConditionModel
    from ..models.vae import SD15_VAE, AutoencoderKL

    if configs is not None:
        SD15_UNET, SD15_VAE, SD15_TEXT = configs  # noqa: N806 (same names, caller's configs)

    path = Path(path)
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise WeightsError(f"{path}: PyTorch pickle checkpoints are not read (they need torch and can "
                           f"run code); convert to .safetensors first")
    src = TensorSource([path])
    probe = LDM_UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if probe not in src.keys():
        raise WeightsError(f"{path}: not an SD-1.x LDM single file (no key {probe!r}); expected "
                           f"prefixes {LDM_UNET!r}, {LDM_VAE!r}, {LDM_TEXT!r}")
    ctx_dim = src.shape(probe)[1]
    if ctx_dim != SD15_UNET.cross_attention_dim:
        raise WeightsError(f"{path}: cross-attention width {ctx_dim} (key {probe!r}); expected "
                           f"{SD15_UNET.cross_attention_dim} (SD-1.x: 768; SD-2.x files are read "
                           f"by the DIFT loader of `jaxdrag eval`)")

    def part(prefix: str, to_diffusers: dict[str, str], label: str):
        return _PrefixView(src, prefix, to_diffusers, label)

    unet_abs = abstract(lambda: UNet2DConditionModel(SD15_UNET, lora_rank=lora_rank, dtype=dtype,
                                                     attn_impl=attn_impl))
    vae_abs = abstract(lambda: AutoencoderKL(SD15_VAE, dtype=dtype, attn_impl=attn_impl))
    up_attn = tuple(t == "CrossAttnUpBlock2D" for t in SD15_UNET.up_block_types)
    unet_map = {ldm_unet_key(k, SD15_UNET.layers_per_block, up_attn): k for k in key_table(unet_abs[2])}
    nvae = len(SD15_VAE.block_out_channels)
    vae_map = {ldm_vae_key(k, nvae): k for k in key_table(vae_abs[2])}

    unet = _fill(unet_abs, SD15_UNET, part(LDM_UNET, unet_map, f"{path} [UNet, {LDM_UNET}*]"))
    vae = _fill(vae_abs, SD15_VAE, part(LDM_VAE, vae_map, f"{path} [VAE, {LDM_VAE}*]"))
    text_enc = None
    if text:
        text_abs = abstract(lambda: CLIPTextModel(SD15_TEXT, dtype=dtype, attn_impl=attn_impl))
        text_map = {k: k for k in key_table(text_abs[2])}  # HF names after the prefix
        text_enc = _fill(text_abs, SD15_TEXT,
                         part(LDM_TEXT, text_map, f"{path} [text encoder, {LDM_TEXT}*]"), ignore=is_buffer)
    text_ns = LDM_TEXT if text else "cond_stage_model."
    leftovers = [k for k in src.keys() if not k.startswith((LDM_UNET, LDM_VAE, text_ns))
                 and not k.startswith("model_ema.") and k not in LDM_IGNORED]
    if leftovers:
        raise WeightsError(f"{path}: {len(leftovers)} key(s) outside the UNet/VAE/text-encoder "
                           f"namespaces: {', '.join(leftovers[:5])}")
    return unet, vae, text_enc


class _PrefixView:
    """Keys of ``src`` under ``prefix``, renamed to diffusers names through ``to_diffusers``
    (LDM name → diffusers name); VAE attention 1×1 convs are squeezed to linear weights."""

    def __init__(self, src: TensorSource, prefix: str, to_diffusers: dict[str, str], label: str):
        self.src, self.label = src, label
        self.names = {}
        for k in src.keys():
            if not k.startswith(prefix):
                continue
            local = k[len(prefix):]
            if prefix == LDM_TEXT:
                local = text_model_name(local)  # files written with transformers < 4.21 lack it
            # an unknown name stays as is and is reported as unexpected by ``assign``
            self.names[to_diffusers.get(local, local)] = k

    def tensors(self):
        def load(d, k):
            a = self.src.get(k)
            if is_vae_attn_proj(d) and a.ndim == 4:
                a = a[:, :, 0, 0]
            return a
        return {d: (lambda d=d, k=k: load(d, k)) for d, k in self.names.items()}

    def shapes(self):
        out = {}
        for d, k in self.names.items():
            s = self.src.shape(k)
            if is_vae_attn_proj(d) and len(s) == 4:
                s = s[:2]
            out[d] = s
        return out


def _fill(abs_parts, cfg, view: _PrefixView, ignore=is_buffer) -> Component:
    graphdef, lora, base = abs_parts
    params = assign(base, view.tensors(), view.shapes(), label=view.label, ignore=ignore,
                    where=lambda d: f"{view.src.file_of(view.names[d])} (key {view.names[d]!r})")
    return Component(cfg, graphdef, store_in_compute_dtype(graphdef, lora, params), lora)


def load_vae(path: str | Path, *, dtype, attn_impl="auto", like=None) -> Component:
    """A separate VAE (GoodDrag's ``stabilityai/sd-vae-ft-mse``): a diffusers AutoencoderKL folder
    (``config.json`` + weights), or a ``.safetensors`` file in LDM names (``encoder.down.0…``,
    optionally under ``first_stage_model.``, as ``vae-ft-mse-840000-ema-pruned.safetensors``) or
    diffusers names, read with ``like``'s config (the model's own VAE config; SD-1.5's if None)."""
    from ..models.vae import SD15_VAE, AutoencoderKL

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise WeightsError(f"{path}: not a diffusers VAE folder (no config.json)")
        return load_diffusers_vae(path, dtype=dtype, attn_impl=attn_impl)
    if not path.is_file():
        raise WeightsError(f"{path}: no such VAE folder or file (or Hub id org/name[@revision][/subfolder])")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: a VAE file must be .safetensors (PyTorch pickles are not read)")
    cfg = like or SD15_VAE
    src = TensorSource([path])
    keys = set(src.keys())
    vae_abs = abstract(lambda: AutoencoderKL(cfg, dtype=dtype, attn_impl=attn_impl))
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return load_component(lambda: AutoencoderKL(cfg, dtype=dtype, attn_impl=attn_impl), src, cfg=cfg,
                              rename=new_vae_name)
    prefix = LDM_VAE if any(k.startswith(LDM_VAE) for k in keys) else ""
    vae_map = {ldm_vae_key(k, len(cfg.block_out_channels)): k for k in key_table(vae_abs[2])}
    view = _PrefixView(src, prefix, vae_map, f"{path} [VAE]")
    return _fill(vae_abs, cfg, view)


@dataclass
class SDComponents:
    unet: Component
    vae: Component
    text_encoder: Component
    tokenizer_dir: Path | None  # None: use the bundled SD-1.5 tokenizer
    source: Path


def load_sd(path: str | Path, *, dtype, attn_impl: str = "auto", lora_rank: int = 16) -> SDComponents:
    """An SD-1.x model from a diffusers folder or an LDM single ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir():
        missing = [c for c in ("unet", "vae", "text_encoder") if not (path / c).is_dir()]
        if missing:
            raise WeightsError(f"{path}: not a diffusers model folder (missing "
                               f"{', '.join(m + '/' for m in missing)})")
        tok = path / "tokenizer"
        return SDComponents(
            unet=load_diffusers_unet(path / "unet", dtype=dtype, attn_impl=attn_impl, lora_rank=lora_rank),
            vae=load_diffusers_vae(path / "vae", dtype=dtype, attn_impl=attn_impl),
            text_encoder=load_hf_text_encoder(path / "text_encoder", dtype=dtype, attn_impl=attn_impl),
            tokenizer_dir=tok if (tok / "vocab.json").exists() else None, source=path)
    if path.is_file():
        unet, vae, text = load_single_file(path, dtype=dtype, attn_impl=attn_impl, lora_rank=lora_rank)
        return SDComponents(unet, vae, text, None, path)
    raise WeightsError(f"{path}: no such model folder or file (expected a diffusers folder, an SD-1.x "
                       f".safetensors single file or a Hub id org/name[@revision])")
