"""Datasets on disk: the DragBench (``meta_data.pkl``, read with a restricted unpickler) and
Drag100 (``points.json``) layouts as ``Sample``s that load and check themselves one by one, and
the input image reader (EXIF orientation applied, ``jaxdrag.images``)."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .requests import EditRequest, RequestError


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle that references a global outside the allowed numpy/plain-type set."""


class SafeUnpickler(pickle.Unpickler):
    """Loads only plain Python types and numpy arrays: any other global (a class, a function —
    the way a pickle runs code) is refused with UnpicklingError naming it."""

    _NUMPY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._NUMPY:
            if name == "_reconstruct":
                from numpy._core.multiarray import _reconstruct
                return _reconstruct
            if name == "scalar":
                from numpy._core.multiarray import scalar
                return scalar
            return getattr(np, name)
        raise ForbiddenGlobal(f"global '{module}.{name}' is not allowed (only numpy arrays and plain "
                              f"types)")


def safe_load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f).load()
    except ForbiddenGlobal as e:
        raise RequestError(f"{path}: refused: {e}") from None
    except Exception as e:  # truncated / corrupt pickles raise many types
        raise RequestError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def read_image(path: Path, mode: str = "RGB") -> tuple[np.ndarray, dict]:
    """(pixels, what reading did) of an input image, EXIF orientation applied (``images.read``);
    a failure is a one-line ``RequestError`` naming the file."""
    from ..images import read

    arr, info = read(path, mode, error=RequestError)
    return arr, info.to_json()


@dataclass
class Sample:
    """A dataset entry; ``load()`` reads and checks it (errors are per sample)."""

    name: str
    folder: Path
    kind: str

    def load(self) -> EditRequest:
        if self.kind == "dragbench":
            meta = safe_load_pickle(self.folder / "meta_data.pkl")
            if not isinstance(meta, dict) or not {"prompt", "points", "mask"} <= set(meta):
                raise RequestError(f"{self.folder / 'meta_data.pkl'}: expected a dict with prompt, "
                                   f"points and mask")
            img, src = read_image(self.folder / "original_image.png")
            if not isinstance(meta["prompt"], str):
                raise RequestError(f"{self.folder / 'meta_data.pkl'}: prompt must be a string, got "
                                   f"{type(meta['prompt']).__name__}")
            if not isinstance(meta["mask"], np.ndarray):
                raise RequestError(f"{self.folder / 'meta_data.pkl'}: mask must be an array, got "
                                   f"{type(meta['mask']).__name__}")
            return EditRequest(image=img, points=meta["points"], prompt=meta["prompt"], mask=meta["mask"],
                               name=self.name, source=src)
        if self.kind == "drag100":
            try:
                pts = json.loads((self.folder / "points.json").read_text())["points"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise RequestError(f"{self.folder / 'points.json'}: cannot read points ({e})") from None
            img, src = read_image(self.folder / "original.jpg")
            mask = None
            if (self.folder / "mask.png").exists():
                mask = read_image(self.folder / "mask.png", "L")[0]
            return EditRequest(image=img, points=pts, prompt="", mask=mask, name=self.name, source=src)
        raise RequestError(f"{self.folder}: unknown sample kind {self.kind!r}")


def find_samples(root: str | Path) -> list[Sample]:
    """DragBench (``<category>/<sample>/meta_data.pkl`` + ``original_image.png``) or Drag100
    (``<sample>/points.json`` + ``original.jpg``) layout, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise RequestError(f"{root}: not a folder")
    bench = sorted(p.parent for p in root.glob("*/*/meta_data.pkl"))
    if bench:
        return [Sample(str(p.relative_to(root)), p, "dragbench") for p in bench]
    d100 = sorted(p.parent for p in root.glob("*/points.json"))
    if d100:
        return [Sample(str(p.relative_to(root)), p, "drag100") for p in d100]
    raise RequestError(f"{root}: neither DragBench (*/*/meta_data.pkl) nor Drag100 (*/points.json) layout")
