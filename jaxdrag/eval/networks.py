"""The evaluation networks, loaded without torch through the project's config-driven models and
key tables (``jaxdrag.weights``):

- LPIPS (AlexNet trunk + lin heads) from one ``.safetensors`` file, in ``lpips.LPIPS``'s state-dict
  names (``net.slice1.0.weight`` …, ``lin0.model.1.weight`` …) or torchvision's
  (``features.0.weight`` …) + ``lin{k}.model.1.weight``. ``scripts/convert_lpips.py`` writes it
  from torchvision's and lpips' ``.pth`` files (torch is needed there only).
- DIFT's SD-2.1 (UNet with linear projections and 5/10/20/20 heads of 64, 1024-wide
  cross-attention; VAE; OpenCLIP-H text encoder in HF ``CLIPTextModel`` layout, 23 layers, gelu)
  from a diffusers folder, or from an LDM single ``.safetensors`` file whose text encoder is in
  OpenCLIP's layout (``cond_stage_model.model.transformer.resblocks.*``, converted here as
  diffusers' ``convert_open_clip_checkpoint`` does: fused q/k/v split, the 24th block dropped).
- CLIP ViT-B/32 through the HF CLIP loader (``openai/clip-vit-base-patch32`` folder layout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from .. import weights as W
from ..models.alexnet import CONVS, LPIPS
from ..schedule import DDIM
from ..tokenizer import BUNDLED, Tokenizer

LPIPS_SLICE = {idx: k + 1 for k, (idx, *_) in enumerate(CONVS)}  # features index → lpips slice


def lpips_name(key: str) -> str | None:
    """A key of an lpips / torchvision state dict → jaxdrag's LPIPS name (None: not a parameter)."""
    if key.startswith(("scaling_layer.", "lins.")):  # constants; ``lins.*`` repeats ``lin*``
        return None
    m = re.fullmatch(r"(?:net\.slice\d\.|features\.)(\d+)\.(weight|bias)", key)
    if m:
        return f"features.conv{m[1]}.{m[2]}"
    m = re.fullmatch(r"lin(\d)\.model\.1\.weight", key)
    if m:
        return f"lin{m[1]}.weight"
    return key  # unknown: reported as unexpected by ``assign``


def _local(path: str | Path, kind: str) -> Path:
    """``path`` if it exists, else a Hub id resolved through the Hugging Face cache; a name that
    is neither stays as it is, for the loader's own "not found" message."""
    from ..hub import parse, resolve

    p = Path(path)
    return p if p.exists() or parse(str(path)) is None else resolve(path, kind)


def load_lpips(path: str | Path, *, dtype=jnp.float32) -> W.Component:
    """LPIPS-AlexNet weights from a ``.safetensors`` file (or a Hub file id, see ``jaxdrag.hub``)."""
    path = _local(path, "vae")
    if not path.is_file():
        raise W.WeightsError(f"{path}: LPIPS weights not found (make them with "
                             f"scripts/convert_lpips.py from torchvision's and lpips' .pth files)")
    if path.suffix != ".safetensors":
        raise W.WeightsError(f"{path}: LPIPS weights must be .safetensors (convert .pth files with "
                             f"scripts/convert_lpips.py)")
    src = W.TensorSource([path])
    return W.load_component(lambda: LPIPS(dtype=dtype), src, cfg=None, rename=lpips_name)


# ----------------------------------------------------------------------------------------------
# SD-2.1 for DIFT


@dataclass
class DiftModel:
    """SD-2.1's UNet, VAE and text encoder for DIFT, with its tokenizer and noise schedule."""

    unet: W.Component
    vae: W.Component
    text_encoder: W.Component
    tokenizer: Tokenizer
    schedule: DDIM
    source: Path


def _schedule(folder: Path | None) -> DDIM:
    """The folder's scheduler config (only ``add_noise``'s ᾱ is used), SD-2.1's if absent."""
    if folder is None or not (folder / "scheduler" / "scheduler_config.json").exists():
        return DDIM()
    cfg = W.read_json(folder / "scheduler" / "scheduler_config.json")
    if cfg.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise W.WeightsError(f"{folder / 'scheduler'}: beta_schedule {cfg['beta_schedule']!r} is not "
                             f"supported (SD-2.1 uses scaled_linear)")
    return DDIM(num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                beta_start=cfg.get("beta_start", 0.00085), beta_end=cfg.get("beta_end", 0.012))


def load_dift(path: str | Path, *, dtype=jnp.float32, attn_impl: str = "auto") -> DiftModel:
    """SD-2.1 (or any SD-2.x/1.x-architecture model) for DIFT from a diffusers folder or an LDM
    single ``.safetensors`` file (or a Hub id of either, see ``jaxdrag.hub``)."""
    path = _local(path, "sd")
    if path.is_dir():
        missing = [c for c in ("unet", "vae", "text_encoder") if not (path / c).is_dir()]
        if missing:
            raise W.WeightsError(f"{path}: not a diffusers model folder (missing "
                                 f"{', '.join(m + '/' for m in missing)})")
        tok = path / "tokenizer"
        has_tok = (tok / "vocab.json").exists()  # else the bundled vocabulary, padded with "!"
        return DiftModel(
            unet=W.load_diffusers_unet(path / "unet", dtype=dtype, attn_impl=attn_impl, lora_rank=0),
            vae=W.load_diffusers_vae(path / "vae", dtype=dtype, attn_impl=attn_impl),
            text_encoder=W.load_hf_text_encoder(path / "text_encoder", dtype=dtype, attn_impl=attn_impl),
            tokenizer=Tokenizer(tok if has_tok else BUNDLED, pad_token=None if has_tok else "!"),
            schedule=_schedule(path), source=path)
    if path.is_file():
        unet, vae, text = load_sd2_single_file(path, dtype=dtype, attn_impl=attn_impl)
        return DiftModel(unet, vae, text, Tokenizer(BUNDLED, pad_token="!"), DDIM(), path)
    raise W.WeightsError(f"{path}: no such DIFT model folder or file (expected an SD-2.1 diffusers "
                         f"folder or .safetensors single file)")


OPENCLIP = "cond_stage_model.model."


def sd21_configs():
    """SD-2.1's UNet, VAE and text-encoder configs (the hub's config.json files)."""
    from ..models.clip import CLIPTextConfig
    from ..models.unet import UNetConfig
    from ..models.vae import SD15_VAE

    unet = UNetConfig(num_attention_heads=(5, 10, 20, 20), cross_attention_dim=1024,
                      use_linear_projection=True, sample_size=96)
    text = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                          num_attention_heads=16, hidden_act="gelu", projection_dim=512)
    return unet, SD15_VAE, text


def open_clip_to_hf(tensors: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """OpenCLIP text-tower names (after ``cond_stage_model.model.``) → HF ``CLIPTextModel`` names
    (with ``text_model.``). Blocks ≥ ``num_layers`` are dropped (SD-2.x uses the penultimate
    layer: 23 of 24); ``text_projection`` and ``logit_scale`` are not used."""
    out = {}
    pre = "text_model."
    simple = {"token_embedding.weight": "embeddings.token_embedding.weight",
              "positional_embedding": "embeddings.position_embedding.weight",
              "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1",
             "mlp.c_proj": "mlp.fc2", "attn.out_proj": "self_attn.out_proj"}
    for k, v in tensors.items():
        if k in ("text_projection", "logit_scale"):
            continue
        if k in simple:
            out[pre + simple[k]] = v
            continue
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", k)
        if not m:
            out[pre + k] = v  # unknown: reported by ``assign``
            continue
        i, rest = int(m[1]), m[2]
        if i >= num_layers:
            continue
        lp = f"{pre}encoder.layers.{i}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):  # nn.MultiheadAttention's fused q/k/v
            leaf = rest.rsplit("_", 1)[1]
            for n, a in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(v), 3, axis=0)):
                out[f"{lp}self_attn.{n}.{leaf}"] = a
            continue
        name, _, leaf = rest.rpartition(".")
        out[f"{lp}{block[name]}.{leaf}" if name in block else pre + k] = v
    return out


def load_sd2_single_file(path: Path, *, dtype, attn_impl="auto", configs=None):
    """An LDM single-file SD-2.x ``.safetensors`` → (unet, vae, text_encoder) Components, with
    SD-2.1's configs (or ``configs`` = (UNetConfig, VAEConfig, CLIPTextConfig))."""
    from ..models.clip import CLIPTextModel

    path = Path(path)
    if path.suffix != ".safetensors":
        raise W.WeightsError(f"{path}: single files must be .safetensors (PyTorch pickles are not read)")
    unet_cfg, vae_cfg, text_cfg = configs or sd21_configs()
    src = W.TensorSource([path])
    if not any(k.startswith(OPENCLIP) for k in src.keys()):
        raise W.WeightsError(f"{path}: not an SD-2.x single file (no OpenCLIP text encoder under "
                             f"{OPENCLIP!r})")
    unet, vae, _ = W.load_single_file(path, dtype=dtype, attn_impl=attn_impl, lora_rank=0,
                                      configs=(unet_cfg, vae_cfg, None), text=False)
    local = {k[len(OPENCLIP):]: k for k in src.keys() if k.startswith(OPENCLIP)}
    hf = open_clip_to_hf({n: src.get(k) for n, k in local.items()}, text_cfg.num_hidden_layers)
    text = W.load_component(lambda: CLIPTextModel(text_cfg, dtype=dtype, attn_impl=attn_impl),
                            W.DictSource(hf, f"{path} [text encoder, {OPENCLIP}*]"), cfg=text_cfg)
    return unet, vae, text


# ----------------------------------------------------------------------------------------------
# CLIP ViT-B/32


def load_clip_image(path: str | Path, *, dtype=jnp.float32, attn_impl: str = "auto") -> W.Component:
    """An HF ``CLIPModel`` folder (DragBench's similarity uses ViT-B/32); both towers are loaded,
    the image tower and projection are used. ``path`` may be a Hub id (``jaxdrag.hub``)."""
    return W.load_hf_clip(_local(path, "clip"), dtype=dtype, attn_impl=attn_impl)
