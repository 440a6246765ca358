"""DragText (ALGORITHMS.md §3): the text embedding ĉ optimised together with the drag variable.

One piece every host uses. In every host the reference takes one forward F(z, ĉ), backpropagates
the host's loss L (writing ∇_ĉ L into ĉ's gradient as a side effect), steps the drag variable,
then backpropagates L_text = (the host's motion term, same value) + λ_t·reg and steps ĉ. So ĉ's
gradient is the pullback of one cotangent through the forward:

    ∇_ĉ (L + L_text) = pullback_ĉ( ∂L/∂ε, ∂L/∂F + ∂L_motion/∂F ) + ∇_ĉ (n·λ_t·reg)

with reg = Σ_{j<P, d} |ĉ_jd − c_jd| (BOS + prompt tokens) counted n times: n = the number of active
pairs in DragDiffusion/DragNoise (the regulariser sits inside the per-pair loop), 1 in GoodDrag
and FreeDrag. Hosts differ only in *when* the step is taken (every iteration; per GoodDrag
timestep with ĉ re-initialised; once per converged FreeDrag block) and are written in their modules.

Shapes: ĉ, c (T, D) = (77, 768) for SD-1.5; token_mask (T,) float.
"""

from __future__ import annotations

import jax
import optax

from .losses import text_regularizer

Array = jax.Array

ADAM = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)


def text_cotangent(geps_loss: Array, gf_loss: Array, gf_motion: Array) -> tuple[Array, Array]:
    """The (∂/∂ε, ∂/∂F) cotangent whose ĉ-pullback is ∇_ĉ(L + L_motion)."""
    return geps_loss, gf_loss + gf_motion


def text_gradient(pulled: Array, c: Array, c0: Array, token_mask: Array, reg_weight) -> Array:
    """ĉ's total gradient: the pullback of ``text_cotangent`` plus ∇ of reg_weight·reg (reg_weight =
    n·λ_t). Returns (T, D) float32."""
    return pulled + jax.grad(text_regularizer)(c, c0, token_mask, reg_weight)


def text_step(c: Array, opt, grad: Array, lr) -> tuple[Array, object]:
    """One Adam step (β (0.9, 0.999), ε 1e-8, as torch.optim.Adam) on ĉ: (ĉ_new, opt_new)."""
    upd, opt = ADAM.update(grad, opt)
    return c - lr * upd, opt


def text_loss(c: Array, c0: Array, token_mask: Array, reg_weight) -> Array:
    """The regulariser's value n·λ_t·Σ|ĉ − c| over the prompt tokens (for the reported loss)."""
    return text_regularizer(c, c0, token_mask, reg_weight)
