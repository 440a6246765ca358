"""SD-1.5 ``UNet2DConditionModel`` in Flax NNX, config-driven (tiny configs reuse the same code).

Call: ``unet(x, t, context, *, reference_attention=False, mid_override=None)`` with
  x:        (B, h, w, C_in) latents, NHWC (h, w = image size / 8)
  t:        (B,) or () timesteps
  context:  (B, S, cross_attention_dim) text embeddings
returns ``(eps, taps)``: eps (B, h, w, C_out) float32 and taps = {"mid": mid-block output,
"up": [output of up_blocks[i] after its upsampler, i = 0..n-1]}. DragDiffusion's motion
supervision uses ``taps["up"][2]`` (640 channels at latent resolution for SD-1.5).

``remat`` ("off" | "blocks" | "dots", ``_remat``) rematerialises the resnet and transformer blocks
in the backward pass.
``reference_attention=True`` makes the self-attention (attn1) of every transformer block of the
last ``reference_up_blocks`` (2) up blocks attend to batch row 0's keys/values (MasaCtrl,
ALGORITHMS.md §1.5: for SD-1.5 up_blocks[2] and up_blocks[3], its layers 10–15). ``mid_override`` replaces the mid-block
output (the mid block is still computed), as DragNoise does.

Parameter paths mirror diffusers' module names (``down_blocks.0.attentions.1.transformer_blocks.0
.attn1.to_q.kernel``), so the weight map is the leaf rename plus transposes (``weights.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import CrossAttention
from .layers import Conv2d, GroupNorm, Identity, LayerNorm, Linear, gelu_exact, nearest_resize, \
    timestep_embedding

Array = jax.Array


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"unet config: {name} has {len(value)} entries, expected {n}")
        return tuple(value)
    return (value,) * n


@dataclass(frozen=True)
class UNetConfig:
    """The subset of diffusers ``UNet2DConditionModel`` config that SD-1.x/2.x-style UNets use."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    use_linear_projection: bool = False
    mid_block_scale_factor: float = 1.0
    downsample_padding: int = 1
    sample_size: int = 64
    # reference (mutual self-) attention in the self-attentions of the last `reference_up_blocks`
    # up blocks: for SD-1.5/2.x up_blocks[2] and [3], i.e. MasaCtrl's layers 10..15 of 16 — the
    # decoder's two highest-resolution levels, also for narrower configs
    reference_up_blocks: int = 2

    _SUPPORTED_DEFAULTS = {
        "act_fn": "silu", "center_input_sample": False, "class_embed_type": None,
        "addition_embed_type": None, "time_embedding_type": "positional",
        "resnet_time_scale_shift": "default", "only_cross_attention": False,
        "dual_cross_attention": False, "conv_in_kernel": 3,
        "conv_out_kernel": 3, "time_cond_proj_dim": None, "encoder_hid_dim": None,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "num_class_embeds": None,
        "projection_class_embeddings_input_dim": None, "time_embedding_act_fn": None,
        "timestep_post_act": None, "class_embeddings_concat": False, "attention_type": "default",
        "reverse_transformer_layers_per_block": None, "addition_time_embed_dim": None,
        "mid_block_only_cross_attention": None, "cross_attention_norm": None,
        "time_embedding_dim": None,
    }

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @classmethod
    def from_diffusers(cls, cfg: dict, source: str = "unet/config.json") -> "UNetConfig":
        """Build from a diffusers config dict; unsupported architecture options raise ValueError
        naming the key. diffusers' naming quirk is reproduced: with ``num_attention_heads`` unset,
        ``attention_head_dim`` is the number of heads (8 for SD-1.5; 5/10/20/20 for SD-2.1).
        ``upcast_attention`` (SD-2.1: true) is accepted either way: jaxdrag's attention always
        computes its logits and softmax in float32, which is what the flag asks for."""
        for key, ok in cls._SUPPORTED_DEFAULTS.items():
            val = cfg.get(key, ok)
            if key == "act_fn" and val == "swish":
                val = "silu"
            if key == "time_embedding_dim" and val is not None:
                if val != cfg.get("block_out_channels", [320])[0] * 4:
                    raise ValueError(f"{source}: time_embedding_dim={val} is not supported")
                continue
            if val != ok:
                raise ValueError(f"{source}: {key}={val!r} is not supported by jaxdrag's UNet "
                                 f"(SD-1.x/2.x architecture only; expected {ok!r})")
        blocks = tuple(cfg.get("block_out_channels", cls.block_out_channels))
        n = len(blocks)
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        down = tuple(cfg.get("down_block_types", cls.down_block_types))
        up = tuple(cfg.get("up_block_types", cls.up_block_types))
        for t in down:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise ValueError(f"{source}: down block type {t!r} is not supported")
        for t in up:
            if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                raise ValueError(f"{source}: up block type {t!r} is not supported")
        if len(down) != n or len(up) != n:
            raise ValueError(f"{source}: {len(down)} down and {len(up)} up block types for "
                             f"{n} block_out_channels")
        lpb = cfg.get("layers_per_block", 2)
        if not isinstance(lpb, int):
            raise ValueError(f"{source}: per-block layers_per_block is not supported")
        cad = cfg.get("cross_attention_dim", 768)
        if not isinstance(cad, int):
            raise ValueError(f"{source}: per-block cross_attention_dim is not supported")
        return cls(
            in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
            block_out_channels=blocks, down_block_types=down, up_block_types=up,
            layers_per_block=lpb, num_attention_heads=_per_block(heads, n, "num_attention_heads"),
            transformer_layers_per_block=_per_block(cfg.get("transformer_layers_per_block", 1), n,
                                                    "transformer_layers_per_block"),
            cross_attention_dim=cad, norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5), flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
            freq_shift=cfg.get("freq_shift", 0), use_linear_projection=cfg.get("use_linear_projection", False),
            mid_block_scale_factor=cfg.get("mid_block_scale_factor", 1.0),
            downsample_padding=cfg.get("downsample_padding", 1),
            sample_size=cfg.get("sample_size", 64))

    def to_diffusers(self) -> dict:
        """The config.json diffusers writes for this architecture (num_attention_heads as
        ``attention_head_dim``, as the SD-1.5 repo does)."""
        return {
            "_class_name": "UNet2DConditionModel", "act_fn": "silu",
            "attention_head_dim": list(self.num_attention_heads),
            "block_out_channels": list(self.block_out_channels), "center_input_sample": False,
            "cross_attention_dim": self.cross_attention_dim,
            "down_block_types": list(self.down_block_types), "downsample_padding": self.downsample_padding,
            "flip_sin_to_cos": self.flip_sin_to_cos, "freq_shift": self.freq_shift,
            "in_channels": self.in_channels, "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": self.mid_block_scale_factor, "norm_eps": self.norm_eps,
            "norm_num_groups": self.norm_num_groups, "out_channels": self.out_channels,
            "sample_size": self.sample_size, "up_block_types": list(self.up_block_types),
            "use_linear_projection": self.use_linear_projection,
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
        }


SD15_UNET = UNetConfig()


# --------------------------------------------------------------------------------------------
# blocks


class ResnetBlock2D(nnx.Module):
    """GN → SiLU → conv3×3 (+ time projection) → GN → SiLU → conv3×3, plus (1×1) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, *, groups: int, eps: float,
                 output_scale_factor: float = 1.0, dtype):
        self.norm1 = GroupNorm(groups, in_ch, eps=eps, dtype=dtype)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1, dtype=dtype)
        self.time_emb_proj = Linear(temb_ch, out_ch, dtype=dtype) if temb_ch else None
        self.norm2 = GroupNorm(groups, out_ch, eps=eps, dtype=dtype)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1, dtype=dtype)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1, dtype=dtype) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: Array, temb: Array | None, canvas=None) -> Array:
        h = self.conv1(jax.nn.silu(self.norm1(x, canvas)), canvas)
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h, canvas)), canvas)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x.astype(h.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class GEGLU(nnx.Module):
    def __init__(self, dim: int, inner: int, *, dtype):
        self.proj = Linear(dim, inner * 2, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * gelu_exact(gate)


class FeedForward(nnx.Module):
    def __init__(self, dim: int, *, dtype):
        inner = dim * 4
        self.net = nnx.List([GEGLU(dim, inner, dtype=dtype),
                             Identity(), Linear(inner, dim, dtype=dtype)])

    def __call__(self, x: Array) -> Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """LN → self-attn → LN → cross-attn → LN → GEGLU FF, each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, *, lora_rank: int,
                 dtype, attn_impl: str):
        kw = dict(lora_rank=lora_rank, dtype=dtype, attn_impl=attn_impl)
        self.norm1 = LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.attn1 = CrossAttention(dim, None, heads, dim_head, **kw)
        self.norm2 = LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, **kw)
        self.norm3 = LayerNorm(dim, eps=1e-5, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype)

    def __call__(self, x: Array, context: Array, reference: bool, key_mask: Array | None = None) -> Array:
        x = x + self.attn1(self.norm1(x), reference=reference, key_mask=key_mask)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm(eps 1e-6) → proj_in (1×1 conv, or linear) → transformer blocks → proj_out, residual."""

    def __init__(self, channels: int, heads: int, context_dim: int, *, layers: int, groups: int,
                 linear_projection: bool, lora_rank: int, dtype, attn_impl: str):
        self.norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype)
        self.linear_projection = linear_projection
        if linear_projection:
            self.proj_in = Linear(channels, channels, dtype=dtype)
            self.proj_out = Linear(channels, channels, dtype=dtype)
        else:
            self.proj_in = Conv2d(channels, channels, 1, dtype=dtype)
            self.proj_out = Conv2d(channels, channels, 1, dtype=dtype)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, lora_rank=lora_rank,
                                  dtype=dtype, attn_impl=attn_impl)
            for _ in range(layers)])

    def __call__(self, x: Array, context: Array, reference: bool, canvas=None) -> Array:
        b, h, w, c = x.shape
        y = self.norm(x, canvas)
        km = None if canvas is None else canvas.key_mask((h, w))
        if self.linear_projection:
            y = self.proj_in(y.reshape(b, h * w, c))
        else:
            y = self.proj_in(y).reshape(b, h * w, c)
        for blk in self.transformer_blocks:
            y = blk(y, context, reference, km)
        if self.linear_projection:
            y = self.proj_out(y).reshape(b, h, w, c)
        else:
            y = self.proj_out(y.reshape(b, h, w, c))
        return y + x.astype(y.dtype)


class Downsample2D(nnx.Module):
    def __init__(self, ch: int, *, padding: int, dtype):
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=padding,
                           pad_mode="sym" if padding else "asym01", dtype=dtype)

    def __call__(self, x: Array, canvas=None) -> Array:
        return self.conv(x, canvas)


class Upsample2D(nnx.Module):
    """Nearest-neighbour ×2 (or to ``size``, PyTorch's index rule) then conv 3×3."""

    def __init__(self, ch: int, *, dtype):
        self.conv = Conv2d(ch, ch, 3, padding=1, dtype=dtype)

    def __call__(self, x: Array, size: tuple[int, int] | None = None, canvas=None) -> Array:
        """``canvas``: where it holds indices for the target level (the UNet's, whose upsamplers
        go to each edit's skip size), each edit gathers its own rows and columns; otherwise (the
        VAE decoder's exact ×2) the canvas ×2 is the edits' ×2."""
        out_hw = (2 * x.shape[1], 2 * x.shape[2])
        if canvas is not None and out_hw in canvas.ups:
            return self.conv(canvas.upsample(x, out_hw), canvas)
        return self.conv(nearest_resize(x, size or out_hw), canvas)


REMAT_POLICIES = ("off", "blocks", "dots")


def remat_policy(remat) -> str:
    """Normalise a remat setting: False/None → "off", True → "blocks"; names are checked."""
    if remat is None or remat is False:
        return "off"
    if remat is True:
        return "blocks"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
    return remat


# "dots": keep the outputs of the projections (matmuls without batch dimensions), of the
# convolutions and of attention; recompute norms, activations, residual sums and attention
# scores/probabilities (the (T × T) maps that dominate memory at 64×64 latents) in the backward
_SAVE_DOTS = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names("attention", "conv"))


def _remat(remat, fn, *args):
    """``fn(*args)`` under the remat policy: "off" keeps every intermediate for the backward;
    "blocks" keeps only each resnet/transformer block's inputs and recomputes the block;
    "dots" keeps matmul, convolution and attention outputs and recomputes the rest."""
    remat = remat_policy(remat)
    if remat == "off":
        return fn(*args)
    if remat == "blocks":
        return jax.checkpoint(fn)(*args)
    return jax.checkpoint(fn, policy=_SAVE_DOTS)(*args)


class DownBlock(nnx.Module):
    """``CrossAttnDownBlock2D`` (with attentions) or ``DownBlock2D`` (without)."""

    def __init__(self, cfg: UNetConfig, i: int, in_ch: int, *, lora_rank: int, dtype,
                 attn_impl: str):
        out_ch = cfg.block_out_channels[i]
        has_attn = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        self.resnets = nnx.List([
            ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, cfg.time_embed_dim,
                          groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype)
            for j in range(cfg.layers_per_block)])
        self.attentions = nnx.List([
            Transformer2DModel(out_ch, cfg.num_attention_heads[i], cfg.cross_attention_dim,
                               layers=cfg.transformer_layers_per_block[i], groups=cfg.norm_num_groups,
                               linear_projection=cfg.use_linear_projection, lora_rank=lora_rank,
                               dtype=dtype, attn_impl=attn_impl)
            for _ in range(cfg.layers_per_block)]) if has_attn else None
        final = i == len(cfg.block_out_channels) - 1
        self.downsamplers = None if final else nnx.List(
            [Downsample2D(out_ch, padding=cfg.downsample_padding, dtype=dtype)])

    def __call__(self, x, temb, context, remat=False, canvas=None):
        skips = []
        for j, res in enumerate(self.resnets):
            x = _remat(remat, lambda m, x, t, v: m(x, t, v), res, x, temb, canvas)
            if self.attentions is not None:
                x = _remat(remat, lambda m, x, c, v: m(x, c, False, v), self.attentions[j], x, context, canvas)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, canvas)
            skips.append(x)
        return x, skips


class UpBlock(nnx.Module):
    """``CrossAttnUpBlock2D`` / ``UpBlock2D``: layers_per_block+1 resnets over concatenated skips."""

    def __init__(self, cfg: UNetConfig, i: int, prev_out: int, *, lora_rank: int, dtype,
                 attn_impl: str):
        rev = tuple(reversed(cfg.block_out_channels))
        rev_heads = tuple(reversed(cfg.num_attention_heads))
        rev_layers = tuple(reversed(cfg.transformer_layers_per_block))
        out_ch = rev[i]
        in_ch = rev[min(i + 1, len(rev) - 1)]
        n = cfg.layers_per_block + 1
        has_attn = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        resnets = []
        for j in range(n):
            skip_ch = in_ch if j == n - 1 else out_ch
            res_in = prev_out if j == 0 else out_ch
            resnets.append(ResnetBlock2D(res_in + skip_ch, out_ch, cfg.time_embed_dim,
                                         groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype))
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List([
            Transformer2DModel(out_ch, rev_heads[i], cfg.cross_attention_dim, layers=rev_layers[i],
                               groups=cfg.norm_num_groups, linear_projection=cfg.use_linear_projection,
                               lora_rank=lora_rank, dtype=dtype, attn_impl=attn_impl)
            for _ in range(n)]) if has_attn else None
        final = i == len(rev) - 1
        self.upsamplers = None if final else nnx.List([Upsample2D(out_ch, dtype=dtype)])

    def __call__(self, x, skips, temb, context, upsample_size, reference_from: int, remat=False, canvas=None):
        """``reference_from``: index of the first of this block's attentions that uses reference
        attention (len(attentions) = none)."""
        for j, res in enumerate(self.resnets):
            skip = skips.pop()
            x = _remat(remat, lambda m, x, t, v: m(x, t, v), res,
                       jnp.concatenate([x, skip.astype(x.dtype)], axis=-1), temb, canvas)
            if self.attentions is not None:
                ref = j >= reference_from
                x = _remat(remat, lambda m, x, c, v: m(x, c, ref, v), self.attentions[j], x, context, canvas)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size, canvas)
        return x


class MidBlock(nnx.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, (transformer, resnet) × 1."""

    def __init__(self, cfg: UNetConfig, *, lora_rank: int, dtype, attn_impl: str):
        ch = cfg.block_out_channels[-1]
        kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                  output_scale_factor=cfg.mid_block_scale_factor, dtype=dtype)
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, cfg.time_embed_dim, **kw),
                                 ResnetBlock2D(ch, ch, cfg.time_embed_dim, **kw)])
        self.attentions = nnx.List([
            Transformer2DModel(ch, cfg.num_attention_heads[-1], cfg.cross_attention_dim,
                               layers=cfg.transformer_layers_per_block[-1], groups=cfg.norm_num_groups,
                               linear_projection=cfg.use_linear_projection, lora_rank=lora_rank,
                               dtype=dtype, attn_impl=attn_impl)])

    def __call__(self, x, temb, context, remat=False, canvas=None):
        x = _remat(remat, lambda m, x, t, v: m(x, t, v), self.resnets[0], x, temb, canvas)
        x = _remat(remat, lambda m, x, c, v: m(x, c, False, v), self.attentions[0], x, context, canvas)
        return _remat(remat, lambda m, x, t, v: m(x, t, v), self.resnets[1], x, temb, canvas)


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_ch: int, dim: int, *, dtype):
        self.linear_1 = Linear(in_ch, dim, dtype=dtype)
        self.linear_2 = Linear(dim, dim, dtype=dtype)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class UNet2DConditionModel(nnx.Module):
    def __init__(self, cfg: UNetConfig, *, lora_rank: int = 0, dtype=jnp.float32,
                 attn_impl: str = "auto"):
        self.cfg = cfg
        c0 = cfg.block_out_channels[0]
        self.conv_in = Conv2d(cfg.in_channels, c0, 3, padding=1, dtype=dtype)
        self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim, dtype=dtype)
        kw = dict(lora_rank=lora_rank, dtype=dtype, attn_impl=attn_impl)
        downs, ch = [], c0
        for i in range(len(cfg.block_out_channels)):
            downs.append(DownBlock(cfg, i, ch, **kw))
            ch = cfg.block_out_channels[i]
        self.down_blocks = nnx.List(downs)
        self.mid_block = MidBlock(cfg, **kw)
        ups, prev = [], cfg.block_out_channels[-1]
        for i in range(len(cfg.block_out_channels)):
            ups.append(UpBlock(cfg, i, prev, **kw))
            prev = tuple(reversed(cfg.block_out_channels))[i]
        self.up_blocks = nnx.List(ups)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, c0, eps=cfg.norm_eps, dtype=jnp.float32)
        self.conv_out = Conv2d(c0, cfg.out_channels, 3, padding=1, dtype=jnp.float32)
        self.dtype = dtype
        # static: where reference attention starts in each up block: every attention of the last
        # `reference_up_blocks` up blocks (the decoder's highest-resolution levels), none before
        if cfg.reference_up_blocks and any(n != 1 for n in cfg.transformer_layers_per_block):
            raise ValueError("reference attention needs one transformer layer per attention block")
        n_up = len(ups)
        self.reference_starts = tuple(0 if i >= n_up - cfg.reference_up_blocks else 1 << 30
                                      for i in range(n_up))

    def __call__(self, x: Array, t: Array, context: Array, *, reference_attention: bool = False,
                 mid_override: Array | None = None, mid_use: Array | None = None, remat: bool = False,
                 up_until: int | None = None, canvas=None):
        """x: (B, h, w, C_in) latents, t: scalar or (B,) timesteps, context: (B, S, D) →
        (ε (B, h, w, C_out), taps {"mid": bottleneck, "up": [output of each up block, after its
        upsampler]}). ``up_until = i`` (static) stops after up block i and returns ε = None (DIFT
        reads ``up_blocks[1]`` and needs nothing above it).

        ``canvas`` (``models.canvas.unet_canvas``): x is a canvas (B, H, W, C_in) holding edits of
        their own latent sizes at the top left; ε and every tap equal, inside each edit's valid
        region, the unpadded network's (and are zero beyond it)."""
        cfg = self.cfg
        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        temb = timestep_embedding(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                  freq_shift=cfg.freq_shift)
        temb = self.time_embedding(temb.astype(self.dtype))
        context = context.astype(self.dtype)

        clean = (lambda a: a) if canvas is None else canvas.clean
        h = self.conv_in(x, canvas)
        skips = [h]
        for blk in self.down_blocks:
            h, s = blk(h, temb, context, remat, canvas)
            skips.extend(s)
        h = self.mid_block(h, temb, context, remat, canvas)
        taps = {"mid": clean(h), "up": []}
        if mid_override is not None:  # mid_use (bool scalar, traced): override only where True
            h = (mid_override.astype(h.dtype) if mid_use is None
                 else jnp.where(mid_use, mid_override.astype(h.dtype), h))
        n = len(self.up_blocks)
        for i, blk in enumerate(self.up_blocks):
            mine = skips[-len(blk.resnets):]
            del skips[-len(blk.resnets):]
            # diffusers forwards the skip's size to the upsampler when the latent is not a multiple
            # of 2^(#upsamplers); nearest ×2 equals that size otherwise, so always use it.
            size = tuple(skips[-1].shape[1:3]) if i < n - 1 else None
            ref_from = self.reference_starts[i] if reference_attention else 1 << 30
            h = blk(h, mine, temb, context, size, ref_from, remat, canvas)
            taps["up"].append(clean(h))
            if up_until is not None and i >= up_until:
                return None, taps
        h = jax.nn.silu(self.conv_norm_out(h, canvas))
        eps = clean(self.conv_out(h, canvas))
        return eps, taps


def config_from_json(path) -> UNetConfig:
    with open(path) as f:
        return UNetConfig.from_diffusers(json.load(f), source=str(path))
