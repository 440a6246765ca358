"""NNX parameter paths ↔ PyTorch (diffusers/transformers) names: the table derived from a
network's own parameter tree, the per-leaf transforms (conv kernels OIHW↔HWIO, linear kernels
transposed), and ``assign``, which fills an abstract state from named tensors, asserting every
key and shape."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .files import WeightsError

PathT = tuple  # an NNX state path, e.g. ('down_blocks', 0, 'resnets', 0, 'conv1', 'kernel')


_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(path: PathT) -> str:
    """NNX path → diffusers/transformers key (leaf renamed, list indices kept)."""
    *mods, leaf = path
    return ".".join([str(m) for m in mods] + [_LEAF.get(leaf, leaf)])


def to_flax(leaf: str, arr: np.ndarray) -> np.ndarray:
    """PyTorch tensor → Flax layout for a leaf of kind ``leaf`` (a strided view: the copy to the
    device makes it contiguous, faster than a separate numpy copy)."""
    if leaf == "kernel":
        if arr.ndim == 4:
            return arr.transpose(2, 3, 1, 0)  # OIHW → HWIO
        if arr.ndim == 2:
            return arr.T
    return arr


def to_torch(leaf: str, arr: np.ndarray) -> np.ndarray:
    """Flax layout → PyTorch tensor layout (inverse of ``to_flax``)."""
    if leaf == "kernel":
        if arr.ndim == 4:
            return np.ascontiguousarray(arr.transpose(3, 2, 0, 1))  # HWIO → OIHW
        if arr.ndim == 2:
            return np.ascontiguousarray(arr.T)
    return arr


def torch_shape(leaf: str, flax_shape: tuple) -> tuple:
    if leaf == "kernel" and len(flax_shape) == 4:
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if leaf == "kernel" and len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def flat(state: nnx.State) -> dict[PathT, Any]:
    """Flatten an NNX state to {path: array}."""
    return {tuple(p): v.get_value() if hasattr(v, "get_value") else v
            for p, v in nnx.to_flat_state(state)}


def key_table(abstract_state: nnx.State) -> dict[str, tuple[PathT, tuple]]:
    """{torch key: (nnx path, expected torch shape)} for every parameter of a (base) state."""
    table = {}
    for path, v in flat(abstract_state).items():
        table[torch_key(path)] = (path, torch_shape(path[-1], tuple(v.shape)))
    return table


def assign(abstract_state: nnx.State, tensors: Mapping[str, Callable[[], np.ndarray]],
           shapes: Mapping[str, tuple], *, label: str, ignore: Callable[[str], bool] = lambda k: False,
           where: Callable[[str], str] | None = None) -> nnx.State:
    """Fill ``abstract_state`` from torch-named tensors; strict about keys and shapes.

    tensors: {torch key: zero-arg loader}; shapes: {torch key: shape} (read without loading).
    Raises WeightsError naming the file (``where(key)`` or ``label``), the key and the expected
    shape for missing keys, shape mismatches and unexpected keys (those not ``ignore``d).
    """
    where = where or (lambda k: label)
    table = key_table(abstract_state)
    missing = [k for k in table if k not in tensors]
    if missing:
        shown = "; ".join(f"{k} (expected shape {table[k][1]})" for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightsError(f"{label}: missing {len(missing)} key(s): {shown}{more}")
    unexpected = [k for k in tensors if k not in table and not ignore(k)]
    if unexpected:
        shown = "; ".join(f"{k} in {where(k)}" for k in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise WeightsError(f"{label}: {len(unexpected)} unexpected key(s) for this architecture: "
                           f"{shown}{more}")
    values = {}
    for k, (path, shape) in table.items():
        got = tuple(shapes[k])
        if got != shape:
            raise WeightsError(f"{where(k)}: key {k!r} has shape {got}, expected {shape}")
        values[path] = jnp.asarray(to_flax(path[-1], tensors[k]()))
    return from_flat(abstract_state, values)


def from_flat(abstract_state: nnx.State, values: dict[PathT, Any]) -> nnx.State:
    pure = nnx.to_pure_dict(abstract_state)

    def put(d, path, v):
        for p in path[:-1]:
            d = d[p]
        d[path[-1]] = v

    for path, v in values.items():
        put(pure, path, v)
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, pure)
    return state


def export(state: nnx.State) -> dict[str, np.ndarray]:
    """NNX state → {torch key: float32 numpy array in PyTorch layout}."""
    return {torch_key(p): to_torch(p[-1], np.asarray(v, np.float32)) for p, v in flat(state).items()}
