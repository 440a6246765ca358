"""SD ``AutoencoderKL`` (encoder + decoder) in Flax NNX, NHWC, PyTorch-mirroring names.

- ``encode(images)`` → (mean, logvar), each (B, H/8, W/8, latent_channels), *unscaled*
  (multiply by ``scaling_factor`` = 0.18215 for SD-1.5). images: (B, H, W, 3) in [-1, 1].
  logvar is clamped to [-30, 20] as diffusers' ``DiagonalGaussianDistribution`` does.
- ``decode(z)`` → images (B, 8h, 8w, 3), unclamped, for unscaled latents z.

Odd sizes follow PyTorch exactly: the encoder's downsampler pads (0, 1) and convolves with
stride 2, so H=341 → 170 → 85 → 42 latent rows; the decoder returns 8× the latent size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import SpatialSelfAttention
from .layers import Conv2d, GroupNorm
from .unet import Downsample2D, ResnetBlock2D, Upsample2D

Array = jax.Array


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    sample_size: int = 512

    @classmethod
    def from_diffusers(cls, cfg: dict, source: str = "vae/config.json") -> "VAEConfig":
        for key, ok in (("act_fn", "silu"), ("force_upcast", None), ("shift_factor", None),
                        ("latents_mean", None), ("latents_std", None)):
            val = cfg.get(key, ok)
            if key == "force_upcast":
                continue  # a dtype hint only
            if val is not None and val != ok:
                raise ValueError(f"{source}: {key}={val!r} is not supported")
        for t in cfg.get("down_block_types", ["DownEncoderBlock2D"]):
            if t != "DownEncoderBlock2D":
                raise ValueError(f"{source}: down block type {t!r} is not supported")
        for t in cfg.get("up_block_types", ["UpDecoderBlock2D"]):
            if t != "UpDecoderBlock2D":
                raise ValueError(f"{source}: up block type {t!r} is not supported")
        return cls(
            in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 4),
            block_out_channels=tuple(cfg.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=cfg.get("layers_per_block", 2),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            scaling_factor=cfg.get("scaling_factor", 0.18215),
            mid_block_add_attention=cfg.get("mid_block_add_attention", True),
            use_quant_conv=cfg.get("use_quant_conv", True),
            use_post_quant_conv=cfg.get("use_post_quant_conv", True),
            sample_size=cfg.get("sample_size", 512))

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": self.in_channels,
                "out_channels": self.out_channels, "latent_channels": self.latent_channels,
                "block_out_channels": list(self.block_out_channels),
                "down_block_types": ["DownEncoderBlock2D"] * n,
                "up_block_types": ["UpDecoderBlock2D"] * n,
                "layers_per_block": self.layers_per_block, "norm_num_groups": self.norm_num_groups,
                "scaling_factor": self.scaling_factor, "sample_size": self.sample_size,
                "mid_block_add_attention": self.mid_block_add_attention,
                "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv}


SD15_VAE = VAEConfig()
_EPS = 1e-6  # every GroupNorm in the SD VAE


class VAEMidBlock(nnx.Module):
    """``UNetMidBlock2D``: resnet, (attention, resnet) with no time embedding."""

    def __init__(self, ch: int, groups: int, add_attention: bool, *, dtype, attn_impl):
        kw = dict(groups=groups, eps=_EPS, dtype=dtype)
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, None, **kw), ResnetBlock2D(ch, ch, None, **kw)])
        self.attentions = nnx.List([SpatialSelfAttention(ch, groups=groups, eps=_EPS, dtype=dtype,
                                                         attn_impl=attn_impl)]) \
            if add_attention else None

    def __call__(self, x, canvas=None):
        x = self.resnets[0](x, None, canvas)
        if self.attentions is not None:
            x = self.attentions[0](x, canvas)
        return self.resnets[1](x, None, canvas)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_ch, out_ch, layers, groups, add_downsample, *, dtype):
        self.resnets = nnx.List([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, groups=groups,
                                               eps=_EPS, dtype=dtype) for j in range(layers)])
        self.downsamplers = nnx.List([Downsample2D(out_ch, padding=0, dtype=dtype)]) \
            if add_downsample else None

    def __call__(self, x, canvas=None):
        for r in self.resnets:
            x = r(x, None, canvas)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, canvas)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_ch, out_ch, layers, groups, add_upsample, *, dtype):
        self.resnets = nnx.List([ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, groups=groups,
                                               eps=_EPS, dtype=dtype) for j in range(layers)])
        self.upsamplers = nnx.List([Upsample2D(out_ch, dtype=dtype)]) if add_upsample else None

    def __call__(self, x, canvas=None):
        for r in self.resnets:
            x = r(x, None, canvas)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, canvas=canvas)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, attn_impl):
        ch = cfg.block_out_channels
        g = cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1, dtype=dtype)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1,
                               dtype=dtype) for i in range(len(ch))])
        self.mid_block = VAEMidBlock(ch[-1], g, cfg.mid_block_add_attention, dtype=dtype,
                                     attn_impl=attn_impl)
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=_EPS, dtype=dtype)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1, dtype=jnp.float32)

    def __call__(self, x, canvas=None):
        x = self.conv_in(x, canvas)
        for b in self.down_blocks:
            x = b(x, canvas)
        x = self.mid_block(x, canvas)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x, canvas)), canvas)


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, attn_impl):
        rev = tuple(reversed(cfg.block_out_channels))
        g = cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, padding=1, dtype=dtype)
        self.mid_block = VAEMidBlock(rev[0], g, cfg.mid_block_add_attention, dtype=dtype,
                                     attn_impl=attn_impl)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, i < len(rev) - 1,
                             dtype=dtype) for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(g, rev[-1], eps=_EPS, dtype=dtype)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, padding=1, dtype=jnp.float32)

    def __call__(self, z, canvas=None):
        x = self.conv_in(z, canvas)
        x = self.mid_block(x, canvas)
        for b in self.up_blocks:
            x = b(x, canvas)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x, canvas)), canvas)


class AutoencoderKL(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, attn_impl: str = "auto"):
        self.cfg = cfg
        self.encoder = Encoder(cfg, dtype=dtype, attn_impl=attn_impl)
        self.decoder = Decoder(cfg, dtype=dtype, attn_impl=attn_impl)
        lc = cfg.latent_channels
        self.quant_conv = Conv2d(2 * lc, 2 * lc, 1, dtype=jnp.float32) \
            if cfg.use_quant_conv else None
        self.post_quant_conv = Conv2d(lc, lc, 1, dtype=dtype) \
            if cfg.use_post_quant_conv else None

    def encode(self, images: Array, canvas=None) -> tuple[Array, Array]:
        """images (B, H, W, 3) in [-1, 1] → (mean, logvar) (B, H/8, W/8, C). ``canvas``
        (``models.canvas.encoder_canvas``): images of their own sizes at the top left of the
        batch's canvas; inside each edit's ⌊h/8⌋ × ⌊w/8⌋ the unpadded encoder's numbers, zeros beyond."""
        moments = self.encoder(images, canvas)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        if canvas is not None:
            moments = canvas.clean(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array, canvas=None) -> Array:
        """z (B, h, w, C) → images (B, 8h, 8w, 3). ``canvas`` (``models.canvas.decoder_canvas``):
        latents of their own sizes in a latent canvas; inside each edit's 8h × 8w the unpadded
        decoder's image, zeros beyond."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        x = self.decoder(z, canvas)
        return (x if canvas is None else canvas.clean(x)).astype(jnp.float32)


def config_from_json(path) -> VAEConfig:
    with open(path) as f:
        return VAEConfig.from_diffusers(json.load(f), source=str(path))
