"""CLIP towers in Flax NNX with HF ``transformers`` parameter names.

- ``CLIPTextModel``: SD-1.5's text encoder (ViT-L/14 text tower). ``__call__(ids)`` returns
  (last_hidden_state (B, 77, D) *after* the final LayerNorm, pooled (B, D) at the EOS token).
  Causal mask, no padding mask (as Stable Diffusion pipelines call it).
- ``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection``: the two towers of a CLIP
  model (CLIPDrag uses ViT-B/16) with their projections, returning the *unnormalised* projected
  embeddings (HF ``text_embeds`` / ``image_embeds``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import CLIPAttention
from .layers import Conv2d, Embed, LayerNorm, Linear, gelu_exact, quick_gelu

Array = jax.Array

_ACTS = {"quick_gelu": quick_gelu, "gelu": gelu_exact}

# transformers' defaults for keys a config.json may omit
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, projection_dim=512, eos_token_id=49407)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512)


def _from_hf(cfg: dict, defaults: dict, cls, source: str) -> dict:
    out = {k: cfg.get(k, v) for k, v in defaults.items()}
    if out["hidden_act"] not in _ACTS:
        raise ValueError(f"{source}: hidden_act={out['hidden_act']!r} is not supported "
                         f"(expected one of {sorted(_ACTS)})")
    if out["hidden_size"] % out["num_attention_heads"]:
        raise ValueError(f"{source}: hidden_size {out['hidden_size']} is not divisible by "
                         f"num_attention_heads {out['num_attention_heads']}")
    return out


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    eos_token_id: int = 2  # 2 = legacy configs: pool at argmax(ids) (EOS has the largest id)

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "text_encoder/config.json") -> "CLIPTextConfig":
        """Missing keys take transformers' ``CLIPTextConfig`` defaults (not SD-1.5's)."""
        return cls(**_from_hf(cfg, _HF_TEXT_DEFAULTS, cls, source))

    def to_hf(self) -> dict:
        d = dict(self.__dict__)
        d.update({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                  "bos_token_id": 0, "pad_token_id": 1, "attention_dropout": 0.0,
                  "initializer_factor": 1.0, "initializer_range": 0.02})
        return d


@dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "CLIPVisionConfig":
        """Missing keys take transformers' ``CLIPVisionConfig`` defaults."""
        return cls(**_from_hf(cfg, _HF_VISION_DEFAULTS, cls, source))

    def to_hf(self) -> dict:
        d = dict(self.__dict__)
        d.update({"model_type": "clip_vision_model", "attention_dropout": 0.0,
                  "initializer_factor": 1.0, "initializer_range": 0.02})
        return d


SD15_TEXT = CLIPTextConfig()
VIT_B16_TEXT = CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                              projection_dim=512)
VIT_B16_VISION = CLIPVisionConfig()


class CLIPMLP(nnx.Module):
    def __init__(self, dim, inner, act, *, dtype):
        self.fc1 = Linear(dim, inner, dtype=dtype)
        self.fc2 = Linear(inner, dim, dtype=dtype)
        self.act = act

    def __call__(self, x):
        return self.fc2(_ACTS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, dim, heads, inner, act, eps, *, dtype, attn_impl):
        self.layer_norm1 = LayerNorm(dim, eps=eps, dtype=dtype)
        self.self_attn = CLIPAttention(dim, heads, dtype=dtype, attn_impl=attn_impl)
        self.layer_norm2 = LayerNorm(dim, eps=eps, dtype=dtype)
        self.mlp = CLIPMLP(dim, inner, act, dtype=dtype)

    def __call__(self, x, causal):
        x = x + self.self_attn(self.layer_norm1(x), causal=causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg, *, dtype, attn_impl):
        self.layers = nnx.List([
            CLIPEncoderLayer(cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
                             cfg.hidden_act, cfg.layer_norm_eps, dtype=dtype, attn_impl=attn_impl) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, causal):
        for layer in self.layers:
            x = layer(x, causal)
        return x


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype):
        self.token_embedding = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.position_embedding = Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype)

    def __call__(self, ids):
        pos = jnp.arange(ids.shape[-1])
        return self.token_embedding(ids) + self.position_embedding(pos)[None]


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, dtype, attn_impl):
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, attn_impl=attn_impl)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=jnp.float32)

    def __call__(self, ids: Array) -> tuple[Array, Array]:
        x = self.encoder(self.embeddings(ids), causal=True)
        last = self.final_layer_norm(x)
        if self.cfg.eos_token_id == 2:
            eos = jnp.argmax(ids, axis=-1)
        else:
            eos = jnp.argmax((ids == self.cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return last, pooled


class CLIPTextModel(nnx.Module):
    """ids (B, T) int → (last_hidden_state (B, T, D) float32, pooled (B, D))."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, attn_impl: str = "auto"):
        self.text_model = CLIPTextTransformer(cfg, dtype=dtype, attn_impl=attn_impl)

    def __call__(self, ids: Array):
        return self.text_model(ids)


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype):
        self.patch_embedding = Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                      stride=cfg.patch_size, use_bias=False, dtype=dtype)
        self.class_embedding = nnx.Param(jnp.zeros((cfg.hidden_size,), jnp.float32))
        n = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.position_embedding = Embed(n, cfg.hidden_size, dtype=dtype)
        self.dtype = dtype

    def __call__(self, pixels):
        b = pixels.shape[0]
        x = self.patch_embedding(pixels)
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1]))[None]


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, dtype, attn_impl):
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype=dtype)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.encoder = CLIPEncoder(cfg, dtype=dtype, attn_impl=attn_impl)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=jnp.float32)

    def __call__(self, pixels):
        x = self.pre_layrnorm(self.embeddings(pixels))
        x = self.encoder(x, causal=False)
        return self.post_layernorm(x[:, 0])


class CLIPVisionModelWithProjection(nnx.Module):
    """pixels (B, S, S, 3), CLIP-normalised → image_embeds (B, projection_dim), unnormalised."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype=jnp.float32, attn_impl: str = "auto"):
        self.cfg = cfg
        self.vision_model = CLIPVisionTransformer(cfg, dtype=dtype, attn_impl=attn_impl)
        self.visual_projection = Linear(cfg.hidden_size, cfg.projection_dim, use_bias=False,
                                        dtype=jnp.float32)

    def __call__(self, pixels):
        return self.visual_projection(self.vision_model(pixels))


class CLIPTextModelWithProjection(nnx.Module):
    """ids (B, T) → text_embeds (B, projection_dim), unnormalised."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype=jnp.float32, attn_impl: str = "auto"):
        self.text_model = CLIPTextTransformer(cfg, dtype=dtype, attn_impl=attn_impl)
        self.text_projection = Linear(cfg.hidden_size, cfg.projection_dim, use_bias=False,
                                      dtype=jnp.float32)

    def __call__(self, ids):
        return self.text_projection(self.text_model(ids)[1])


class CLIPModel(nnx.Module):
    """Both towers of an HF ``CLIPModel`` checkpoint (``text_model.*``, ``vision_model.*``,
    ``text_projection``, ``visual_projection``); ``logit_scale`` is not needed and not loaded."""

    def __init__(self, text_cfg: CLIPTextConfig, vision_cfg: CLIPVisionConfig, projection_dim: int, *,
                 dtype=jnp.float32, attn_impl: str = "auto"):
        self.text_cfg = text_cfg
        self.vision_cfg = vision_cfg
        self.text_model = CLIPTextTransformer(text_cfg, dtype=dtype, attn_impl=attn_impl)
        self.vision_model = CLIPVisionTransformer(vision_cfg, dtype=dtype, attn_impl=attn_impl)
        self.text_projection = Linear(text_cfg.hidden_size, projection_dim, use_bias=False,
                                      dtype=jnp.float32)
        self.visual_projection = Linear(vision_cfg.hidden_size, projection_dim, use_bias=False,
                                        dtype=jnp.float32)

    def image_embeds(self, pixels: Array) -> Array:
        return self.visual_projection(self.vision_model(pixels))

    def text_embeds(self, ids: Array) -> Array:
        return self.text_projection(self.text_model(ids)[1])


def clip_configs_from_json(path) -> tuple[CLIPTextConfig, CLIPVisionConfig, int]:
    """Read an HF CLIP folder's config.json (``CLIPModel``): (text cfg, vision cfg, projection_dim)."""
    with open(path) as f:
        cfg = json.load(f)
    if "text_config" not in cfg or "vision_config" not in cfg:
        raise ValueError(f"{path}: not a CLIPModel config (needs text_config and vision_config)")
    proj = cfg.get("projection_dim", 512)
    tc = dict(cfg["text_config"])
    vc = dict(cfg["vision_config"])
    tc.setdefault("projection_dim", proj)
    vc.setdefault("projection_dim", proj)
    return (CLIPTextConfig.from_hf(tc, f"{path} text_config"),
            CLIPVisionConfig.from_hf(vc, f"{path} vision_config"), proj)
