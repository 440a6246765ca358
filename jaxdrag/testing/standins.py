"""The small differentiable stand-in networks the drag engine's parity tests run in both frameworks
(JAX here, PyTorch in ``torch_reference``), their weights and the cases' constants; no torch needed.

Features: a 3×3 conv + text conditioning + tanh; ε: a pointwise map plus a global term, so that, as in
a UNet with attention, every ε element changes when z changes anywhere (otherwise untouched pixels
would give Φ(z_k) − Φ(z*) = 0 exactly in one framework and ±rounding in the other, where the L1
subgradient jumps); a stand-in CLIP image tower; for DragNoise a bottleneck h = 2×2 average pool of z
feeding the features and ε.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..drag import DragNetworks

# latent (h, w), supervision (h, w), feature channels, text tokens, text width, CLIP projection
LAT = (12, 14)

SUP = (24, 28)

CF, T, D, P = 6, 6, 8, 5

T_STAR = 681

ITERS = 3


def standin_weights():
    rs = np.random.RandomState(0)
    return {"W1": rs.randn(CF, 4, 3, 3).astype(np.float32) * 0.4,   # torch OIHW
            "Wc": rs.randn(D, CF).astype(np.float32) * 0.3,
            "W2": rs.randn(4, 4).astype(np.float32) * 0.5,
            "We": rs.randn(D, 4).astype(np.float32) * 0.3,
            "Wg": rs.randn(4, 4).astype(np.float32) * 3.0,
            "Wx": rs.randn(LAT[0] * LAT[1] * 4, 7).astype(np.float32) * 0.05,
            "Wp": rs.randn(7, P).astype(np.float32)}


def jax_features(shared, edit, z, c, t):
    k = jnp.transpose(shared["W1"], (2, 3, 1, 0))
    u = jax.lax.conv_general_dilated(z[None], k, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)[0]
    f = jnp.tanh(u + jnp.mean(c, 0) @ shared["Wc"])
    eps = 0.5 * jnp.tanh(z @ shared["W2"] + c[0] @ shared["We"] + jnp.mean(z, (0, 1)) @ shared["Wg"])
    return eps, f


def jax_clip(shared, x0):
    return jnp.tanh(x0.reshape(-1) @ shared["Wx"]) @ shared["Wp"]


NETS = DragNetworks(jax_features, jax_clip)
FEATURE_NETS = DragNetworks(jax_features)  # no CLIP tower: the GoodDrag / FreeDrag cases


def noise_weights():
    rs = np.random.RandomState(1)
    return {**standin_weights(), "Wh": rs.randn(4, 6).astype(np.float32) * 0.5, "Wk": rs.randn(4, 4).astype(np.float32)}


def jax_bottleneck(shared, edit, z, c, t):
    """The stand-in's bottleneck h: z average-pooled 2×2, (6, 7, 4)."""
    return z.reshape(LAT[0] // 2, 2, LAT[1] // 2, 2, 4).mean((1, 3))


def jax_features_mid(shared, edit, z, c, t, h):
    k = jnp.transpose(shared["W1"], (2, 3, 1, 0))
    u = jax.lax.conv_general_dilated(z[None], k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)[0]
    hu = jnp.repeat(jnp.repeat(h, 2, 0), 2, 1)
    f = jnp.tanh(u + jnp.mean(c, 0) @ shared["Wc"] + hu @ shared["Wh"])
    g = jnp.mean(z, (0, 1)) @ shared["Wg"] + jnp.mean(h, (0, 1)) @ shared["Wk"]
    eps = 0.5 * jnp.tanh(z @ shared["W2"] + c[0] @ shared["We"] + g)
    return eps, f


NOISE_NETS = DragNetworks(lambda s, e, z, c, t: jax_features_mid(s, e, z, c, t, jax_bottleneck(s, e, z, c, t)),
                          features_mid=jax_features_mid, bottleneck=jax_bottleneck)


def rel_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(1e-12, np.abs(b).max())

# the GoodDrag / FreeDrag cases: handles (row, col) and targets in supervision pixels, the prompt's
# token count, and the hosts' settings (short schedules on the 24 × 28 supervision map)
H0 = np.array([[9, 9], [14, 18]], np.float32)
TG = np.array([[9, 18], [10, 13]], np.float32)
TOKEN_P = 3
GOOD = dict(r_m=2, r_p=3, drag_end_step=2, track_per_step=3, max_drag_per_track=2)
FREE = dict(r_m=2, max_iters=14, block_steps=3)
