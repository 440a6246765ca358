"""Per-edit LoRA state: initialisation, batching helpers and export in peft/diffusers naming.

The LoRA parameters live in the UNet's ``Linear`` layers (``lora_a`` (in, r), ``lora_b`` (r, out),
variable type ``nnx.LoRAParam``) on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of every
attention (self and cross, down/mid/up), as DragDiffusion trains them (ALGORITHMS.md §1.4). Being
a separate state from the shared base weights, a batch of edits simply carries a leading axis on
the LoRA state and ``jax.vmap``s over it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import weights


def init_lora(template: nnx.State, key: jax.Array) -> nnx.State:
    """A fresh LoRA: A ~ N(0, (1/r)²) (diffusers' ``LoRALinearLayer``), B = 0, so the adapted
    network starts equal to the base network. ``template``: the abstract LoRA state."""
    leaves, treedef = jax.tree.flatten(template)
    keys = jax.random.split(key, max(len(leaves), 1))
    paths = [p for p, _ in nnx.to_flat_state(template)]
    out = []
    for k, leaf, path in zip(keys, leaves, paths):
        if path[-1] == "lora_a":
            rank = leaf.shape[-1]
            out.append(jax.random.normal(k, leaf.shape, jnp.float32) / rank)
        else:
            out.append(jnp.zeros(leaf.shape, jnp.float32))
    return jax.tree.unflatten(treedef, out)


def zeros_lora(template: nnx.State) -> nnx.State:
    return jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), template)


def lora_rank(template: nnx.State) -> int:
    for path, leaf in nnx.to_flat_state(template):
        if path[-1] == "lora_a":
            return int(leaf.shape[-1])
    return 0


def export_peft(lora: nnx.State, prefix: str = "unet.") -> dict[str, np.ndarray]:
    """LoRA state → peft/diffusers keys: ``{prefix}<module>.lora_A.weight`` (r, in) and
    ``lora_B.weight`` (out, r), loadable with diffusers' ``load_lora_weights``."""
    out = {}
    for path, v in weights.flat(lora).items():
        mod = ".".join(str(p) for p in path[:-1])
        arr = np.asarray(v, np.float32).T
        out[f"{prefix}{mod}.{'lora_A' if path[-1] == 'lora_a' else 'lora_B'}.weight"] = arr
    return out


def import_peft(template: nnx.State, tensors: dict[str, np.ndarray], prefix: str = "unet.") -> nnx.State:
    """Inverse of ``export_peft``; every LoRA key of ``template`` must be present with its shape."""
    values = {}
    for path, v in weights.flat(template).items():
        mod = ".".join(str(p) for p in path[:-1])
        key = f"{prefix}{mod}.{'lora_A' if path[-1] == 'lora_a' else 'lora_B'}.weight"
        if key not in tensors:
            raise weights.WeightsError(f"LoRA file: missing key {key!r}")
        arr = np.asarray(tensors[key], np.float32).T
        if arr.shape != tuple(v.shape):
            raise weights.WeightsError(f"LoRA file: key {key!r} has shape {arr.T.shape}, "
                                       f"expected {tuple(v.shape)[::-1]}")
        values[path] = jnp.asarray(arr)
    return weights.from_flat(template, values)
