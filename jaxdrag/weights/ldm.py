"""LDM single-file checkpoints' names: the diffusers ↔ LDM rules (those of diffusers'
``convert_ldm_*_checkpoint``), old VAE attention names, buffers to ignore, and the single-file
writer (tests, conversion)."""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np



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


def is_vae_attn_proj(key: str) -> bool:
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", key))


# VAE attention names of diffusers folders written before diffusers 0.14
_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def new_vae_name(key: str) -> str:
    return re.sub(r"(mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.",
                  lambda m: m[1] + _OLD_VAE_ATTN[m[2]] + ".", key)


_BUFFER_SUFFIXES = ("position_ids",)
LDM_IGNORED = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                "logvar", "model_ema.decay", "model_ema.num_updates"}


def is_buffer(key: str) -> bool:
    return key.endswith(_BUFFER_SUFFIXES)


def to_ldm_single_file(unet: Mapping[str, np.ndarray], vae: Mapping[str, np.ndarray],
                       text: Mapping[str, np.ndarray], unet_cfg, vae_cfg) -> dict[str, np.ndarray]:
    """diffusers-named SD-1.x state dicts → one LDM-named dict (VAE attention as 1×1 convs)."""
    up_attn = tuple(t == "CrossAttnUpBlock2D" for t in unet_cfg.up_block_types)
    out = {}
    for k, v in unet.items():
        out[LDM_UNET + ldm_unet_key(k, unet_cfg.layers_per_block, up_attn)] = v
    for k, v in vae.items():
        out[LDM_VAE + ldm_vae_key(k, len(vae_cfg.block_out_channels))] = \
            v[:, :, None, None] if is_vae_attn_proj(k) else v
    for k, v in text.items():
        out[LDM_TEXT + k] = v
    return out
