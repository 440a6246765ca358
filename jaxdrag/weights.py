"""Torch-free weight loading and saving for SD-1.5 and CLIP.

Formats read:
  (a) diffusers folders: ``unet/``, ``vae/``, ``text_encoder/`` (each ``config.json`` and
      ``*.safetensors``, plain, ``.fp16`` variant or sharded with an index), ``tokenizer/``;
      both VAE attention namings (``to_q``… and the older ``query``/``key``/``value``/``proj_attn``);
  (b) LDM single-file ``.safetensors`` (``model.diffusion_model.``, ``first_stage_model.``,
      ``cond_stage_model.transformer.``); EMA copies and scheduler buffers are ignored;
  (c) HF CLIP folders (``openai/clip-vit-base-patch16`` layout: ``config.json`` + ``model.safetensors``).

Loading is a table lookup. The table is derived from the network's own parameter tree: an NNX path
``down_blocks/0/attentions/0/.../to_q/kernel`` is the diffusers key
``down_blocks.0.attentions.0....to_q.weight`` with a fixed transform per leaf kind
(``kernel`` 4-D: OIHW→HWIO; ``kernel`` 2-D: transpose; ``scale``/``embedding``: copy of ``weight``;
``bias``: copy). LDM names are produced from diffusers names by ``ldm_*_key`` (the same rules as
diffusers' ``convert_ldm_*_checkpoint``). Every expected key must be present with the expected
shape, and unknown keys inside a model's namespace are errors; messages name the file, the key
and the expected shape. fp16, bf16 and fp32 files all load (converted to float32).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PathT = tuple  # an NNX state path, e.g. ('down_blocks', 0, 'resnets', 0, 'conv1', 'kernel')


class WeightsError(ValueError):
    """A weight file or folder that does not match the expected architecture or format."""


# ----------------------------------------------------------------------------------------------
# reading safetensors without torch


def _open(path: Path):
    from safetensors import safe_open

    if not path.exists():
        raise WeightsError(f"{path}: file not found")
    try:
        return safe_open(str(path), framework="np")
    except Exception as e:  # safetensors raises SafetensorError / OSError with terse texts
        raise WeightsError(f"{path}: cannot read as safetensors ({e}); the file may be truncated, "
                           f"corrupt, or in another format") from None


class TensorSource:
    """Lazy view of one or more safetensors files: ``keys()``, ``shape(k)``, ``get(k)`` (float32)."""

    def __init__(self, files: Iterable[Path], label: str | None = None):
        self.files = [Path(f) for f in files]
        self.label = label or ", ".join(str(f) for f in self.files)
        self._where: dict[str, Any] = {}
        self._handles = []
        for f in self.files:
            h = _open(f)
            self._handles.append(h)
            for k in h.keys():
                self._where[k] = (h, f)

    def keys(self):
        return self._where.keys()

    def file_of(self, key: str) -> Path:
        return self._where[key][1]

    def shape(self, key: str) -> tuple:
        h, _ = self._where[key]
        return tuple(h.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        h, f = self._where[key]
        try:
            arr = h.get_tensor(key)
        except Exception as e:
            raise WeightsError(f"{f}: cannot read tensor {key!r} ({e}); the file may be truncated") from None
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        return arr


class DictSource:
    """In-memory tensors (e.g. a PyTorch ``state_dict`` converted to numpy) with the
    ``TensorSource`` interface, for converting models without writing files."""

    def __init__(self, tensors: Mapping[str, Any], label: str = "<state dict>"):
        self.tensors, self.label = dict(tensors), label

    def keys(self):
        return self.tensors.keys()

    def file_of(self, key: str) -> str:
        return self.label

    def shape(self, key: str) -> tuple:
        return tuple(np.shape(self.tensors[key]))

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self.tensors[key], np.float32)


def _model_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of a diffusers/transformers component folder."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [folder / s for s in shards]
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bf16.safetensors"):
        if (folder / name).exists():
            return [folder / name]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
    if pickles:
        raise WeightsError(f"{folder}: only PyTorch pickle weights ({', '.join(pickles)}) found; jaxdrag "
                           f"reads .safetensors only (pickles need torch to load and can run code). "
                           f"Convert them once with safetensors' torch API, then retry.")
    raise WeightsError(f"{folder}: no {stem}.safetensors (or .fp16/.bf16 variant, or sharded index) found")


# ----------------------------------------------------------------------------------------------
# NNX state ↔ PyTorch names


_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(path: PathT) -> str:
    """NNX path → diffusers/transformers key (leaf renamed, list indices kept)."""
    *mods, leaf = path
    return ".".join([str(m) for m in mods] + [_LEAF.get(leaf, leaf)])


def to_flax(leaf: str, arr: np.ndarray) -> np.ndarray:
    """PyTorch tensor → Flax layout for a leaf of kind ``leaf`` (a strided view: the copy to the
    device makes it contiguous, faster than a separate numpy copy)."""
    if leaf == "kernel":
        if arr.ndim == 4:
            return arr.transpose(2, 3, 1, 0)  # OIHW → HWIO
        if arr.ndim == 2:
            return arr.T
    return arr


def to_torch(leaf: str, arr: np.ndarray) -> np.ndarray:
    """Flax layout → PyTorch tensor layout (inverse of ``to_flax``)."""
    if leaf == "kernel":
        if arr.ndim == 4:
            return np.ascontiguousarray(arr.transpose(3, 2, 0, 1))  # HWIO → OIHW
        if arr.ndim == 2:
            return np.ascontiguousarray(arr.T)
    return arr


def torch_shape(leaf: str, flax_shape: tuple) -> tuple:
    if leaf == "kernel" and len(flax_shape) == 4:
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if leaf == "kernel" and len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def flat(state: nnx.State) -> dict[PathT, Any]:
    """Flatten an NNX state to {path: array}."""
    return {tuple(p): v.get_value() if hasattr(v, "get_value") else v
            for p, v in nnx.to_flat_state(state)}


def key_table(abstract_state: nnx.State) -> dict[str, tuple[PathT, tuple]]:
    """{torch key: (nnx path, expected torch shape)} for every parameter of a (base) state."""
    table = {}
    for path, v in flat(abstract_state).items():
        table[torch_key(path)] = (path, torch_shape(path[-1], tuple(v.shape)))
    return table


def assign(abstract_state: nnx.State, tensors: Mapping[str, Callable[[], np.ndarray]],
           shapes: Mapping[str, tuple], *, label: str, ignore: Callable[[str], bool] = lambda k: False,
           where: Callable[[str], str] | None = None) -> nnx.State:
    """Fill ``abstract_state`` from torch-named tensors; strict about keys and shapes.

    tensors: {torch key: zero-arg loader}; shapes: {torch key: shape} (read without loading).
    Raises WeightsError naming the file (``where(key)`` or ``label``), the key and the expected
    shape for missing keys, shape mismatches and unexpected keys (those not ``ignore``d).
    """
    where = where or (lambda k: label)
    table = key_table(abstract_state)
    missing = [k for k in table if k not in tensors]
    if missing:
        shown = "; ".join(f"{k} (expected shape {table[k][1]})" for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightsError(f"{label}: missing {len(missing)} key(s): {shown}{more}")
    unexpected = [k for k in tensors if k not in table and not ignore(k)]
    if unexpected:
        shown = "; ".join(f"{k} in {where(k)}" for k in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise WeightsError(f"{label}: {len(unexpected)} unexpected key(s) for this architecture: "
                           f"{shown}{more}")
    values = {}
    for k, (path, shape) in table.items():
        got = tuple(shapes[k])
        if got != shape:
            raise WeightsError(f"{where(k)}: key {k!r} has shape {got}, expected {shape}")
        values[path] = jnp.asarray(to_flax(path[-1], tensors[k]()))
    return from_flat(abstract_state, values)


def from_flat(abstract_state: nnx.State, values: dict[PathT, Any]) -> nnx.State:
    pure = nnx.to_pure_dict(abstract_state)

    def put(d, path, v):
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = v

    for path, v in values.items():
        put(pure, path, v)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, pure)
    return state


def export(state: nnx.State) -> dict[str, np.ndarray]:
    """NNX state → {torch key: float32 numpy array in PyTorch layout}."""
    return {torch_key(p): to_torch(p[-1], np.asarray(v, np.float32)) for p, v in flat(state).items()}


# ----------------------------------------------------------------------------------------------
# diffusers ↔ LDM single-file names (the rules of diffusers' convert_ldm_*_checkpoint)

LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_TEXT = "cond_stage_model.transformer."

_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet_rest(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_LDM[head]}.{tail}"


def ldm_unet_key(key: str, layers_per_block: int, up_has_attn: tuple[bool, ...]) -> str:
    """diffusers UNet key → LDM key (without the ``model.diffusion_model.`` prefix)."""
    L = layers_per_block
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for d, l in fixed.items():
        if key.startswith(d + "."):
            return l + key[len(d):]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + i * (L + 1) + j
        return f"input_blocks.{idx}.0.{_resnet_rest(rest)}" if kind == "resnets" \
            else f"input_blocks.{idx}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if m:
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key)
    if m:
        return f"middle_block.{2 * int(m[1])}.{_resnet_rest(m[2])}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", key)
    if m:
        return f"middle_block.1.{m[1]}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = i * (L + 1) + j
        return f"output_blocks.{idx}.0.{_resnet_rest(rest)}" if kind == "resnets" \
            else f"output_blocks.{idx}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if m:
        i = int(m[1])
        return f"output_blocks.{i * (L + 1) + L}.{2 if up_has_attn[i] else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name rule for UNet key {key!r}")


def ldm_vae_key(key: str, n_blocks: int) -> str:
    """diffusers VAE key → LDM key (without ``first_stage_model.``)."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    part, _, rest = key.partition(".")
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest)
    if m:
        return f"{part}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", rest)
    if m:
        return f"{part}.mid.attn_1.{_VAE_ATTN_LDM[m[1]]}.{m[2]}"
    m = re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest)
    if m:
        i = int(m[2]) if m[1] == "down" else n_blocks - 1 - int(m[2])
        return f"{part}.{m[1]}.{i}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest)
    if m:
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest)
    if m:
        return f"{part}.up.{n_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    raise KeyError(f"no LDM name rule for VAE key {key!r}")


def _is_vae_attn_proj(key: str) -> bool:
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key))


# VAE attention names of diffusers folders written before diffusers 0.14
_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _new_vae_name(key: str) -> str:
    return re.sub(r"(mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.",
                  lambda m: m[1] + _OLD_VAE_ATTN[m[2]] + ".", key)


_BUFFER_SUFFIXES = ("position_ids",)
_LDM_IGNORED = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                "logvar", "model_ema.decay", "model_ema.num_updates"}


def is_buffer(key: str) -> bool:
    return key.endswith(_BUFFER_SUFFIXES)


# ----------------------------------------------------------------------------------------------
# component loaders


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
    from .models.unet import UNet2DConditionModel, UNetConfig

    cfg = _cfg(UNetConfig.from_diffusers, read_json(folder / "config.json"), str(folder / "config.json"))
    src = TensorSource(_model_files(folder, "diffusion_pytorch_model"))
    return load_component(lambda: UNet2DConditionModel(cfg, lora_rank=lora_rank, dtype=dtype,
                                                       attn_impl=attn_impl), src, cfg=cfg)


def load_diffusers_vae(folder: Path, *, dtype, attn_impl="auto") -> Component:
    from .models.vae import AutoencoderKL, VAEConfig

    cfg = _cfg(VAEConfig.from_diffusers, read_json(folder / "config.json"), str(folder / "config.json"))
    src = TensorSource(_model_files(folder, "diffusion_pytorch_model"))
    return load_component(lambda: AutoencoderKL(cfg, dtype=dtype, attn_impl=attn_impl),
                          src, cfg=cfg, rename=_new_vae_name)


def text_model_name(key: str) -> str:
    """``CLIPTextModel`` keys with the ``text_model.`` prefix: the hub's SD-1.5 files have it,
    transformers ≥ 5 writes them without it, and both are accepted."""
    return key if key.startswith("text_model.") else "text_model." + key


def load_hf_text_encoder(folder: Path, *, dtype, attn_impl="auto") -> Component:
    from .models.clip import CLIPTextConfig, CLIPTextModel

    cfg = _cfg(CLIPTextConfig.from_hf, read_json(folder / "config.json"), str(folder / "config.json"))
    src = TensorSource(_model_files(folder, "model"))
    return load_component(lambda: CLIPTextModel(cfg, dtype=dtype, attn_impl=attn_impl),
                          src, cfg=cfg, rename=text_model_name)


def load_hf_clip(folder: Path, *, dtype, attn_impl="auto") -> Component:
    """An HF ``CLIPModel`` folder (e.g. openai/clip-vit-base-patch16): both towers + projections."""
    from .models.clip import CLIPModel, clip_configs_from_json

    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder (expected an HF CLIP folder with config.json and "
                           f"model.safetensors)")
    if not (folder / "config.json").exists():
        raise WeightsError(f"{folder / 'config.json'}: not found")
    tc, vc, proj = _cfg(clip_configs_from_json, folder / "config.json")
    src = TensorSource(_model_files(folder, "model"))
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
    from .models.clip import SD15_TEXT, CLIPTextModel
    from .models.unet import SD15_UNET, UNet2DConditionModel
    from .models.vae import SD15_VAE, AutoencoderKL

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
                 and not k.startswith("model_ema.") and k not in _LDM_IGNORED]
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
            if _is_vae_attn_proj(d) and a.ndim == 4:
                a = a[:, :, 0, 0]
            return a
        return {d: (lambda d=d, k=k: load(d, k)) for d, k in self.names.items()}

    def shapes(self):
        out = {}
        for d, k in self.names.items():
            s = self.src.shape(k)
            if _is_vae_attn_proj(d) and len(s) == 4:
                s = s[:2]
            out[d] = s
        return out


def _fill(abs_parts, cfg, view: _PrefixView, ignore=is_buffer) -> Component:
    graphdef, lora, base = abs_parts
    params = assign(base, view.tensors(), view.shapes(), label=view.label, ignore=ignore,
                    where=lambda d: f"{view.src.file_of(view.names[d])} (key {view.names[d]!r})")
    return Component(cfg, graphdef, store_in_compute_dtype(graphdef, lora, params), lora)


# ----------------------------------------------------------------------------------------------
# writing (tiny models, tests, conversion)


def save_safetensors(tensors: Mapping[str, np.ndarray], path: Path, dtype=np.float32) -> None:
    """Write {key: array} to ``path`` atomically, cast to ``dtype`` (float32/float16/bfloat16)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype == "bfloat16":
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
    # np.require keeps 0-d arrays 0-d (ascontiguousarray would make them (1,))
    arrays = {k: np.require(np.asarray(v).astype(dtype), requirements="C") for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp))
    os.replace(tmp, path)


def to_ldm_single_file(unet: Mapping[str, np.ndarray], vae: Mapping[str, np.ndarray],
                       text: Mapping[str, np.ndarray], unet_cfg, vae_cfg) -> dict[str, np.ndarray]:
    """diffusers-named SD-1.x state dicts → one LDM-named dict (VAE attention as 1×1 convs)."""
    up_attn = tuple(t == "CrossAttnUpBlock2D" for t in unet_cfg.up_block_types)
    out = {}
    for k, v in unet.items():
        out[LDM_UNET + ldm_unet_key(k, unet_cfg.layers_per_block, up_attn)] = v
    for k, v in vae.items():
        out[LDM_VAE + ldm_vae_key(k, len(vae_cfg.block_out_channels))] = \
            v[:, :, None, None] if _is_vae_attn_proj(k) else v
    for k, v in text.items():
        out[LDM_TEXT + k] = v
    return out


# ----------------------------------------------------------------------------------------------
# whole models


def load_vae(path: str | Path, *, dtype, attn_impl="auto", like=None) -> Component:
    """A separate VAE (GoodDrag's ``stabilityai/sd-vae-ft-mse``): a diffusers AutoencoderKL folder
    (``config.json`` + weights), or a ``.safetensors`` file in LDM names (``encoder.down.0…``,
    optionally under ``first_stage_model.``, as ``vae-ft-mse-840000-ema-pruned.safetensors``) or
    diffusers names, read with ``like``'s config (the model's own VAE config; SD-1.5's if None)."""
    from .models.vae import SD15_VAE, AutoencoderKL

    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise WeightsError(f"{path}: not a diffusers VAE folder (no config.json)")
        return load_diffusers_vae(path, dtype=dtype, attn_impl=attn_impl)
    if not path.is_file():
        raise WeightsError(f"{path}: no such VAE folder or file")
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: a VAE file must be .safetensors (PyTorch pickles are not read)")
    cfg = like or SD15_VAE
    src = TensorSource([path])
    keys = set(src.keys())
    vae_abs = abstract(lambda: AutoencoderKL(cfg, dtype=dtype, attn_impl=attn_impl))
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return load_component(lambda: AutoencoderKL(cfg, dtype=dtype, attn_impl=attn_impl), src, cfg=cfg,
                              rename=_new_vae_name)
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
    raise WeightsError(f"{path}: no such model folder or file (expected a diffusers folder or an SD-1.x "
                       f".safetensors single file)")
