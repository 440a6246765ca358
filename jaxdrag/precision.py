"""The precision policy, in one place.

- LoRA weights, latents, text embeddings, optimiser states, losses, norm scales, biases,
  embeddings and normalisation statistics are float32 everywhere. The frozen base weights of the
  matmuls and convolutions are stored once in the dtype their layer computes in
  (``weights.store_in_compute_dtype``): bfloat16 on accelerators, so no loop body converts them.
- Activations and matmul/conv inputs use ``Policy.compute`` (float32 on CPU; bfloat16 on GPU/TPU
  by default). Every network's final projection back to latent/pixel space (UNet ``conv_out``,
  VAE ``conv_out``) runs in float32, as maxdiffusion does.
- Attention uses cuDNN's fused kernel where it applies (GPU, 16-bit inputs, head dim ≤ 256 and a
  multiple of 8) and XLA's einsum-softmax-einsum elsewhere (CPU, float32, the VAE's 512-wide head).
- Parity tests additionally run under ``jax.default_matmul_precision("highest")`` (float32 matmuls
  default to TF32 on NVIDIA GPUs).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}


@dataclass(frozen=True)
class Policy:
    """compute: activation dtype; attention: "auto" | "xla" | "cudnn"."""

    compute: Any = jnp.float32
    attention: str = "auto"


_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxdrag_target_platform", default=None)
_PLATFORM_NAMES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}


def platform() -> str:
    """The platform programs are being built for: "cpu", "gpu" or "tpu". The backend JAX runs on,
    unless ``target_platform`` says otherwise (building a GPU/TPU program on a CPU machine, e.g.
    with ``jax.export``). Kernel choices (cuDNN attention, CPU convolution paths) follow it."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def target_platform(name: str | None):
    """Trace programs for ``name`` ("cuda", "rocm", "gpu", "tpu", "cpu"; None: the backend)."""
    if name is not None and name not in _PLATFORM_NAMES:
        raise ValueError(f"unknown platform {name!r}; choose one of {sorted(_PLATFORM_NAMES)}")
    token = _TARGET.set(_PLATFORM_NAMES[name] if name is not None else None)
    try:
        yield
    finally:
        _TARGET.reset(token)


def resolve_dtype(dtype: Any = "auto") -> Any:
    """"auto" → bfloat16 on GPU/TPU, float32 on CPU; names and jnp dtypes pass through."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return jnp.float32 if platform() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'") from None
    return jnp.dtype(dtype).type


def policy_for(dtype: Any = "auto", attention: str = "auto") -> Policy:
    if attention not in ("auto", "xla", "cudnn"):
        raise ValueError(f"attention implementation must be 'auto', 'xla' or 'cudnn', got {attention!r}")
    return Policy(compute=resolve_dtype(dtype), attention=attention)
