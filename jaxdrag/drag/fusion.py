"""CLIPDrag's global–local gradient fusion (ALGORITHMS.md §4.5; CLIPDrag paper eq. 6).

G_l: the local (drag) gradient, G_g: the global (CLIP) gradient, both over the whole latent and
flattened for the angle: cos θ = ⟨G_g, G_l⟩ / (‖G_g‖ ‖G_l‖), sin θ = √(1 − cos²θ). λ = ``weight``.
"Agreeing" means cos θ ≥ 0 (the paper's cos θ > 0 case; cos θ = 0 exactly is put with it, as the
released code does). Rules:

``paper`` (default) — eq. 6 as printed:
    cos θ ≥ 0:  G = G_l + λ·sin θ·G_g
    cos θ < 0:  G = G_l − λ·cos θ·G_g
``code`` — the released code: the conflict branch has the opposite sign,
    cos θ < 0:  G = G_l + λ·cos θ·G_g
``project`` — the vector reading of the paper's text, with ĝ = unit vectors:
    agreeing:     G = G_l + λ·(G_g − (G_g·ĝ_l) ĝ_l)    (the identity component of G_g)
    conflicting:  G = G_l − λ·(G_l·ĝ_g) ĝ_g            (ProGrad: drop G_l's conflicting part)

The two baselines of CLIPDrag's fusion ablation (Fig. 7a):
``add`` — "gradient adding":  G = G_l + λ·G_g
``prograd`` — ProGrad (Zhu et al., 2023) on the drag gradient: the conflict branch of ``project``
    without the identity component,
    agreeing:     G = G_l
    conflicting:  G = G_l − λ·(G_l·ĝ_g) ĝ_g

If either gradient is zero, θ is undefined and G = G_l (``add`` still adds: G_l + λ·G_g).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

RULES = ("paper", "code", "project", "add", "prograd")


def fuse(g_local: Array, g_global: Array, weight, rule: str = "paper") -> Array:
    """Fused gradient, same shape as ``g_local``."""
    if rule not in RULES:
        raise ValueError(f"unknown fusion rule {rule!r}; choose one of {RULES}")
    gl = g_local.reshape(-1).astype(jnp.float32)
    gg = g_global.reshape(-1).astype(jnp.float32)
    nl, ng = jnp.linalg.norm(gl), jnp.linalg.norm(gg)
    defined = (nl > 0) & (ng > 0)
    cos = jnp.where(defined, jnp.dot(gl, gg) / jnp.where(defined, nl * ng, 1.0), 0.0)
    cos = jnp.clip(cos, -1.0, 1.0)
    sin = jnp.sqrt(1.0 - cos * cos)
    agree = cos >= 0
    if rule == "paper":
        out = gl + weight * jnp.where(agree, sin, -cos) * gg
    elif rule == "code":
        out = gl + weight * jnp.where(agree, sin, cos) * gg
    elif rule == "add":
        out = gl + weight * gg
    else:
        ul = gl / jnp.where(defined, nl, 1.0)
        ug = gg / jnp.where(defined, ng, 1.0)
        conflict = jnp.dot(gl, ug) * ug
        if rule == "project":
            identity = gg - jnp.dot(gg, ul) * ul
            out = jnp.where(agree, gl + weight * identity, gl - weight * conflict)
        else:  # prograd
            out = jnp.where(agree, gl, gl - weight * conflict)
    if rule != "add":
        out = jnp.where(defined, out, gl)
    return out.reshape(g_local.shape).astype(g_local.dtype)
