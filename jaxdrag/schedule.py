"""DDIM for SD-1.5 as pure functions (ALGORITHMS.md §1.2).

Scheduler config (SD-1.5 / DragDiffusion): T = 1000 training steps, betas "scaled_linear" from
0.00085 to 0.012 (linear in sqrt space, then squared), ``set_alpha_to_one=False`` (so the
"final" alpha is ᾱ_0 = 0.99915), ``steps_offset=1``, η = 0, no clipping. With S = 50 inference
steps the timesteps are τ_i = 981 − 20·i (i = 0 noisiest, τ_49 = 1).

Latents are whatever shape; all arithmetic is float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class DDIM:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_inference_steps: int = 50
    steps_offset: int = 1

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t for t = 0..T−1, float32 (computed in float32 as diffusers does)."""
        betas = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, self.num_train_timesteps,
                            dtype=np.float32) ** 2
        return np.cumprod(1.0 - betas, dtype=np.float32)

    @property
    def step_ratio(self) -> int:
        return self.num_train_timesteps // self.num_inference_steps

    @property
    def timesteps(self) -> np.ndarray:
        """τ_i, i = 0..S−1, descending ("leading" spacing + offset): 981, 961, …, 1."""
        ts = (np.arange(self.num_inference_steps) * self.step_ratio).round()[::-1].astype(np.int64)
        return ts + self.steps_offset

    def alpha(self, t) -> jnp.ndarray:
        """ᾱ_t for (traced) integer t ≥ 0; ᾱ_final = ᾱ_0 for t < 0 (set_alpha_to_one=False)."""
        ac = jnp.asarray(self.alphas_cumprod)
        t = jnp.asarray(t)
        return jnp.where(t >= 0, ac[jnp.clip(t, 0, self.num_train_timesteps - 1)], ac[0])

    def start_index(self, strength: float) -> int:
        """Index into ``timesteps`` of the optimised timestep t* for inversion ``strength``:
        K = round(strength·S) inversion steps, t* = τ_{S−K}. Python's round (banker's rounding) as
        the reference uses: strength 0.7 → K 35 → t* = 681; 0.75 → K 38 → t* = 741."""
        k = round(strength * self.num_inference_steps)
        if not 0 < k <= self.num_inference_steps:
            raise ValueError(f"inversion strength {strength} gives {k} steps; need 1..{self.num_inference_steps}")
        return self.num_inference_steps - k

    def inversion_timesteps(self, strength: float) -> np.ndarray:
        """UNet timesteps of the K inversion steps, ascending: 1, 21, …, t*."""
        return self.timesteps[self.start_index(strength):][::-1].copy()

    def denoise_timesteps(self, strength: float) -> np.ndarray:
        """Timesteps of the K denoising steps from t*, descending: t*, …, 1."""
        return self.timesteps[self.start_index(strength):].copy()


def predict_x0(sched: DDIM, z, eps, t):
    """x̂0 = (z − √(1−ᾱ_t) ε)/√ᾱ_t."""
    a = sched.alpha(t)
    return (z - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)


def ddim_step(sched: DDIM, z, eps, t):
    """One deterministic DDIM denoising step z_t → z_{t−Δ} (Δ = 1000/S; ᾱ_final below 0).

    This is also Φ, the one-step prediction inside DragDiffusion's background loss."""
    a_prev = sched.alpha(jnp.asarray(t) - sched.step_ratio)
    x0 = predict_x0(sched, z, eps, t)
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps


def inversion_step(sched: DDIM, z, eps, t):
    """One DDIM inversion step (DragPipeline.inv_step): the UNet was evaluated at the destination
    timestep t with the current, less noisy z; the source timestep is t − Δ (ᾱ_final if < 0):
    x̂0 = (z − √(1−ᾱ_{t−Δ}) ε)/√ᾱ_{t−Δ};  z ← √ᾱ_t x̂0 + √(1−ᾱ_t) ε."""
    a_cur = sched.alpha(jnp.asarray(t) - sched.step_ratio)
    a_next = sched.alpha(t)
    x0 = (z - jnp.sqrt(1.0 - a_cur) * eps) / jnp.sqrt(a_cur)
    return jnp.sqrt(a_next) * x0 + jnp.sqrt(1.0 - a_next) * eps


def add_noise(sched: DDIM, z0, noise, t):
    """DDPM forward process q(z_t | z_0): √ᾱ_t z0 + √(1−ᾱ_t) noise; t (B,) broadcast over z."""
    a = sched.alpha(t).reshape((-1,) + (1,) * (z0.ndim - 1))
    return jnp.sqrt(a) * z0 + jnp.sqrt(1.0 - a) * noise
