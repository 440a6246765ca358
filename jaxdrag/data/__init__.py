"""Edits in and results out, one room per idea:

- ``requests``: ``EditRequest``, ``Generation``, ``EditResult`` and ``validate``;
- ``geometry``: working size, resizing, supervision coordinates, bucketing (``prepare``);
- ``datasets``: the DragBench and Drag100 readers (``find_samples``) and the image reader;
- ``results``: atomic writing of edited images, overlays and reports.

Every public name is importable from ``jaxdrag.data`` as before.
"""

from __future__ import annotations

from .requests import RequestError, Generation, EditRequest, EditResult, validate, MAX_PAIRS
from .geometry import working_size, nearest_indices, resize_nearest, Prepared, prepare, bucket_key
from .datasets import ForbiddenGlobal, SafeUnpickler, safe_load_pickle, read_image, Sample, find_samples
from .results import atomic_write, png_bytes, overlay, upscale, result_overlay, side_by_side, report, strip, write_result, is_done, write_json

__all__ = ["RequestError", "Generation", "EditRequest", "EditResult", "validate", "MAX_PAIRS", "working_size", "nearest_indices", "resize_nearest", "Prepared", "prepare", "bucket_key", "ForbiddenGlobal", "SafeUnpickler", "safe_load_pickle", "read_image", "Sample", "find_samples", "atomic_write", "png_bytes", "overlay", "upscale", "result_overlay", "side_by_side", "report", "strip", "write_result", "is_done", "write_json"]
