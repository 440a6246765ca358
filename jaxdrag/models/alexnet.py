"""LPIPS with the AlexNet trunk (Zhang et al. 2018, package ``lpips`` v0.1), the perceptual distance
DragBench's ``run_eval_similarity.py`` reports.

Architecture as torchvision's ``alexnet().features`` (conv 11/4 → ReLU → maxpool 3/2 → conv 5 →
ReLU → maxpool → conv 3 ×3 with ReLUs), tapped after each ReLU (64, 192, 384, 256, 256 channels);
each tap is unit-normalised over channels (eps 1e-10 added to the norm), the squared difference of
the two images' taps is weighted by a 1×1 convolution without bias (the trained "lin" heads) and
averaged over space; the five averages are summed. Inputs are in [-1, 1], shifted and scaled by
lpips' ``ScalingLayer`` first.

Parameter names (``weights.torch_key``): ``features.conv{0,3,6,8,10}.{weight,bias}`` (the indices
of torchvision's ``features``) and ``lin{0..4}.weight``; ``eval.networks.load_lpips`` maps the
``lpips`` state dict and torchvision names onto them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import Conv2d

Array = jax.Array

# lpips.ScalingLayer: (x - shift) / scale, per RGB channel
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 192, 384, 256, 256)
# (torchvision features index, in, out, kernel, stride, padding)
CONVS = ((0, 3, 64, 11, 4, 2), (3, 64, 192, 5, 1, 2), (6, 192, 384, 3, 1, 1),
         (8, 384, 256, 3, 1, 1), (10, 256, 256, 3, 1, 1))
# max pools (3×3, stride 2, no padding) run before these convolutions
POOL_BEFORE = (3, 6)


def max_pool(x: Array) -> Array:
    """(B, H, W, C) → (B, ⌊(H−3)/2⌋+1, ⌊(W−3)/2⌋+1, C): torch ``MaxPool2d(3, 2)``."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


class AlexNetFeatures(nnx.Module):
    """torchvision's AlexNet ``features`` without the last max pool; returns the five ReLU taps."""

    def __init__(self, *, dtype=jnp.float32):
        for idx, cin, cout, k, s, p in CONVS:
            setattr(self, f"conv{idx}", Conv2d(cin, cout, k, stride=s, padding=p, dtype=dtype))

    def __call__(self, x: Array) -> list[Array]:
        """x: (B, H, W, 3) already scaled → [(B, h_l, w_l, C_l) for the five taps]."""
        taps = []
        for idx, *_ in CONVS:
            if idx in POOL_BEFORE:
                x = max_pool(x)
            x = jax.nn.relu(getattr(self, f"conv{idx}")(x))
            taps.append(x)
        return taps


def unit_normalize(f: Array, eps: float = 1e-10) -> Array:
    """lpips.normalize_tensor over the channel axis (last): f / (‖f‖₂ + eps)."""
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


class LPIPS(nnx.Module):
    """``lpips.LPIPS(net='alex', version='0.1')`` in eval mode (dropout off, spatial=False)."""

    def __init__(self, *, dtype=jnp.float32):
        self.features = AlexNetFeatures(dtype=dtype)
        for i, c in enumerate(CHANNELS):
            setattr(self, f"lin{i}", Conv2d(c, 1, 1, use_bias=False, dtype=jnp.float32))

    def __call__(self, x0: Array, x1: Array) -> Array:
        """x0, x1: (B, H, W, 3) in [-1, 1] → (B,) distances (0 for equal images)."""
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        b = x0.shape[0]
        taps = self.features((jnp.concatenate([x0, x1]) - shift) / scale)
        total = jnp.zeros((b,), jnp.float32)
        for i, f in enumerate(taps):
            f = unit_normalize(f.astype(jnp.float32))
            d = (f[:b] - f[b:]) ** 2
            total = total + jnp.mean(getattr(self, f"lin{i}")(d)[..., 0], axis=(1, 2))
        return total
