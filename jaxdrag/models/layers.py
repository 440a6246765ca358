"""Primitive NNX layers whose parameter paths mirror PyTorch module names.

Construction is deterministic and allocates placeholders (zeros; ones for norm scales): networks
are built abstractly with ``nnx.eval_shape`` and their parameters always come from weight files
(``weights.py``), the tiny model's numpy initialiser (``tiny.py``) or ``init_lora``. No RNG is
drawn while building, which keeps ``eval_shape`` of the full UNet well under a second.

Every layer keeps its parameters in float32 (`nnx.Param`) and computes in the module's ``dtype``
(float32 on CPU, bfloat16 on accelerators; see ``jaxdrag.precision``). Normalisation statistics are
always taken in float32 with the two-pass variance ``mean((x - mean)^2)``, as PyTorch does; Flax's
built-in norms default to the one-pass "fast variance" and epsilon 1e-6, which breaks parity.

Layout conventions: images and feature maps are NHWC; sequences are (B, T, C).
Parameter leaves are named like the converted PyTorch leaves: ``kernel`` (Linear ``weight.T``,
Conv ``weight`` OIHW→HWIO), ``bias``, ``scale`` (norm ``weight``), ``embedding`` (Embedding ``weight``).
"""

from __future__ import annotations

import math
from functools import partial

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..precision import platform
from .canvas import nearest_indices

Array = jax.Array


def _zeros(*shape) -> Array:
    return jnp.zeros(shape, jnp.float32)


class Identity(nnx.Module):
    """Parameter-free placeholder (stands for ``nn.Dropout`` so list indices match PyTorch)."""

    def __call__(self, x: Array) -> Array:
        return x


class Linear(nnx.Module):
    """y = x @ kernel + bias. kernel: (in, out) float32; x: (..., in) → (..., out) in ``dtype``.

    With ``lora_rank > 0`` the layer also holds a LoRA pair in its own variable type
    (``nnx.LoRAParam``) so it can be split from the shared base weights and batched per edit:
    y += (x @ lora_a) @ lora_b (scale 1, no alpha: diffusers' ``LoRALinearLayer`` as DragDiffusion
    trains it). ``lora_a`` is (in, r), ``lora_b`` (r, out); ``models.lora.init_lora`` draws them.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 lora_rank: int = 0, dtype=jnp.float32):
        self.kernel = nnx.Param(_zeros(in_features, out_features))
        self.bias = nnx.Param(_zeros(out_features)) if use_bias else None
        if lora_rank > 0:
            self.lora_a = nnx.LoRAParam(_zeros(in_features, lora_rank))
            self.lora_b = nnx.LoRAParam(_zeros(lora_rank, out_features))
        else:
            self.lora_a = None
            self.lora_b = None
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.lora_a is not None:
            y = y + jnp.dot(jnp.dot(x, self.lora_a[...].astype(self.dtype)),
                            self.lora_b[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def _conv(x: Array, w: Array, stride: int, padding, rhs_spec: str = "HWIO") -> Array:
    return jax.lax.conv_general_dilated(x, w, window_strides=(stride, stride), padding=padding,
                                        dimension_numbers=("NHWC", rhs_spec, "NHWC"))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_explicit_transpose(x: Array, w: Array, stride: int, padding) -> Array:
    return _conv(x, w, stride, padding)


def _conv_fwd(x, w, stride, padding):
    return _conv(x, w, stride, padding), (x, w)


def _conv_bwd(stride, padding, res, g):
    x, w = res
    # The input gradient is a convolution with the kernel's I/O axes swapped. JAX expresses it
    # with kernel dimension labels 01oi; XLA:CPU makes that layout Eigen's 01io by a copy in the
    # entry computation but not inside a while/scan body, where the convolution then falls
    # back to a naive loop nest (2-3x slower; jax-ml/jax#12868). Swapping the axes explicitly
    # (a materialised HWOI copy) gives the canonical form everywhere.
    w_oi = jnp.swapaxes(w, 2, 3)
    _, vjp_x = jax.vjp(lambda a: _conv(a, w_oi, stride, padding, "HWOI"), x)
    _, vjp_w = jax.vjp(lambda k: _conv(x, k, stride, padding), w)  # dead code unless trained
    return vjp_x(g)[0], vjp_w(g)[0]


_conv_explicit_transpose.defvjp(_conv_fwd, _conv_bwd)


# CPU convolutions with at most IM2COL_MAX_PIXELS output pixels per image and at least
# IM2COL_MIN_CHANNELS input channels run as im2col + one matmul: XLA:CPU's convolution reads its
# weights inefficiently when there are few output pixels and many channels (SD's 8×8 and 16×16
# levels with 1280-2560 channels run 3-7× slower than the matmul form; benchmarks/RESULTS.md).
# Larger maps keep the convolution, which wins there; narrow layers gain nothing and would only
# lengthen compilation (kh·kw slices per convolution).
IM2COL_MAX_PIXELS = 256
IM2COL_MIN_CHANNELS = 256


def _conv_im2col(x: Array, w: Array, stride: int, padding) -> Array:
    """The convolution as patches (N, H', W', kh·kw·C_in) @ kernel (kh·kw·C_in, C_out).

    The patch features are ordered (kh, kw, c_in), so an HWIO kernel reshapes without a copy; its
    gradient is the matmul with the kernel transposed plus the adjoint of the patch gather."""
    kh, kw, cin, cout = w.shape
    _, h, wd, _ = x.shape
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = (h + pt + pb - kh) // stride + 1
    ow = (wd + pl + pr - kw) // stride + 1
    cols = [xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
            for i in range(kh) for j in range(kw)]
    cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return jnp.einsum("nhwk,ko->nhwo", cols, w.reshape(kh * kw * cin, cout))


def conv2d(x: Array, w: Array, stride: int, padding) -> Array:
    """NHWC × HWIO → NHWC convolution; ``padding`` is ((top, bottom), (left, right)) in pixels.

    On CPU, small outputs of wide layers (see ``IM2COL_MAX_PIXELS``) run as im2col + matmul and
    the others as a convolution whose gradient swaps the kernel axes explicitly (see ``_conv_bwd``); both
    give the same values as the plain ``conv_general_dilated`` used elsewhere (up to fp32
    summation order)."""
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    stride = int(stride)
    if platform() == "cpu":
        (pt, pb), (pl, pr) = padding
        oh = (x.shape[1] + pt + pb - w.shape[0]) // stride + 1
        ow = (x.shape[2] + pl + pr - w.shape[1]) // stride + 1
        if oh * ow <= IM2COL_MAX_PIXELS and x.shape[-1] >= IM2COL_MIN_CHANNELS:
            return _conv_im2col(x, w, stride, padding)
        return _conv_explicit_transpose(x, w, stride, padding)
    return _conv(x, w, stride, padding)


class Conv2d(nnx.Module):
    """2-D convolution, NHWC, kernel HWIO float32. ``padding`` is PyTorch's symmetric padding;
    ``pad_mode="asym01"`` pads (0, 1) on both spatial axes with padding 0 (the VAE encoder's
    downsampler, ``F.pad(x, (0, 1, 0, 1))``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, pad_mode: str = "sym", use_bias: bool = True,
                 dtype=jnp.float32):
        self.kernel = nnx.Param(_zeros(kernel_size, kernel_size, in_ch, out_ch))
        self.bias = nnx.Param(_zeros(out_ch)) if use_bias else None
        self.stride = stride
        if pad_mode == "asym01":
            self.padding = ((0, 1), (0, 1))
        else:
            self.padding = ((padding, padding), (padding, padding))
        self.dtype = dtype

    def __call__(self, x: Array, canvas=None) -> Array:
        """``canvas`` (``models.canvas.Canvas``): a kernel larger than 1×1 reads zeros beyond each
        edit's valid region, as the unpadded convolution reads its zero padding."""
        if canvas is not None and self.kernel.shape[0] * self.kernel.shape[1] > 1:
            x = canvas.clean(x)
        y = conv2d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride, self.padding)
        y = checkpoint_name(y, "conv")  # saved by the "dots" remat policy
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC (or (B, T, C)) input: float32 two-pass statistics per (sample, group)."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float, dtype=jnp.float32):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into "
                             f"{num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_channels,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: Array, canvas=None) -> Array:
        """``canvas`` (NHWC input only): the statistics count each edit's valid cells only."""
        shape = x.shape
        c = shape[-1]
        xf = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, c // self.num_groups)
        if canvas is None:
            mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
            var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
        else:
            m = canvas.masks[canvas.level(shape[1:3])].reshape(shape[0], -1, 1, 1)
            count = jnp.sum(m, axis=1, keepdims=True) * xf.shape[3]
            mean = jnp.sum(xf * m, axis=(1, 3), keepdims=True) / count
            var = jnp.sum(jnp.square((xf - mean) * m), axis=(1, 3), keepdims=True) / count
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        y = y * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with float32 two-pass statistics."""

    def __init__(self, num_features: int, *, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """Lookup table (num, dim) float32; ids (...,) int → (..., dim) in ``dtype``."""

    def __init__(self, num: int, dim: int, *, dtype=jnp.float32):
        self.embedding = nnx.Param(_zeros(num, dim))
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def quick_gelu(x: Array) -> Array:
    """OpenAI CLIP's activation: x · sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x: Array) -> Array:
    """erf-based GELU (PyTorch ``F.gelu`` default; Flax defaults to the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


def nearest_resize(x: Array, out_hw: tuple[int, int]) -> Array:
    """PyTorch ``F.interpolate(mode="nearest", size=out_hw)`` for NHWC input.

    Source index = min(floor(dst · in/out), in − 1) computed in float32 as PyTorch does
    (``canvas.nearest_indices``); for an exact ×2 this is ``dst // 2``. Used by the UNet upsamplers,
    which diffusers drives with the skip connection's size when the latent is not a multiple of
    2^(number of upsamplers).
    """
    if out_hw == (2 * x.shape[1], 2 * x.shape[2]):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, nearest_indices(x.shape[1], out_hw[0])][:, :, nearest_indices(x.shape[2], out_hw[1])]


def timestep_embedding(t: Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> Array:
    """Sinusoidal timestep embedding as diffusers ``get_timestep_embedding``.

    t: (B,) timesteps (int or float). Returns (B, dim) float32, ordered [cos, sin] when
    ``flip_sin_to_cos`` (SD-1.5), else [sin, cos].
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
