"""Reading and writing ``.safetensors`` without torch: lazy tensor sources over files or a
state dict, the weight files of a diffusers/transformers component folder (plain, ``.fp16``
variant or sharded with an index; pickles refused), and the writer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np



class WeightsError(ValueError):
    """A weight file or folder that does not match the expected architecture or format."""


def _open(path: Path):
    from safetensors import safe_open

    if not path.exists():
        raise WeightsError(f"{path}: file not found")
    try:
        return safe_open(str(path), framework="np")
    except Exception as e:  # safetensors raises SafetensorError / OSError with terse texts
        raise WeightsError(f"{path}: cannot read as safetensors ({e}); the file may be truncated, "
                           f"corrupt, or in another format") from None


class TensorSource:
    """Lazy view of one or more safetensors files: ``keys()``, ``shape(k)``, ``get(k)`` (float32)."""

    def __init__(self, files: Iterable[Path], label: str | None = None):
        self.files = [Path(f) for f in files]
        self.label = label or ", ".join(str(f) for f in self.files)
        self._where: dict[str, Any] = {}
        self._handles = []
        for f in self.files:
            h = _open(f)
            self._handles.append(h)
            for k in h.keys():
                self._where[k] = (h, f)

    def keys(self):
        return self._where.keys()

    def file_of(self, key: str) -> Path:
        return self._where[key][1]

    def shape(self, key: str) -> tuple:
        h, _ = self._where[key]
        return tuple(h.get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        h, f = self._where[key]
        try:
            arr = h.get_tensor(key)
        except Exception as e:
            raise WeightsError(f"{f}: cannot read tensor {key!r} ({e}); the file may be truncated") from None
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        return arr


class DictSource:
    """In-memory tensors (e.g. a PyTorch ``state_dict`` converted to numpy) with the
    ``TensorSource`` interface, for converting models without writing files."""

    def __init__(self, tensors: Mapping[str, Any], label: str = "<state dict>"):
        self.tensors, self.label = dict(tensors), label

    def keys(self):
        return self.tensors.keys()

    def file_of(self, key: str) -> str:
        return self.label

    def shape(self, key: str) -> tuple:
        return tuple(np.shape(self.tensors[key]))

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self.tensors[key], np.float32)


def model_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of a diffusers/transformers component folder."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [folder / s for s in shards]
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bf16.safetensors"):
        if (folder / name).exists():
            return [folder / name]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.ckpt"))
    if pickles:
        raise WeightsError(f"{folder}: only PyTorch pickle weights ({', '.join(pickles)}) found; jaxdrag "
                           f"reads .safetensors only (pickles need torch to load and can run code). "
                           f"Convert them once with safetensors' torch API, then retry.")
    raise WeightsError(f"{folder}: no {stem}.safetensors (or .fp16/.bf16 variant, or sharded index) found")


def save_safetensors(tensors: Mapping[str, np.ndarray], path: Path, dtype=np.float32) -> None:
    """Write {key: array} to ``path`` atomically, cast to ``dtype`` (float32/float16/bfloat16)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype == "bfloat16":
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
    # np.require keeps 0-d arrays 0-d (ascontiguousarray would make them (1,))
    arrays = {k: np.require(np.asarray(v).astype(dtype), requirements="C") for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp))
    os.replace(tmp, path)


