"""Evaluation as the papers do it: LPIPS (AlexNet), DIFT mean distance on SD-2.1, LPIPS × MD,
CLIP ViT-B/32 image similarity and GoodDrag's DAI, batched in JAX (``jaxdrag eval``).

Rooms: ``image`` (reading, resizes, CLIP preprocessing), ``metrics`` (pure metric functions),
``networks`` (torch-free loaders of the evaluation networks), ``runner`` (datasets, batching,
per-sample files, tables).
"""

from .image import EvalInputError
from .metrics import clip_cosine, dai, dift_features, lpips_224, match_distances
from .networks import load_clip_image, load_dift, load_lpips
from .runner import METRICS, EvalSettings, Networks, evaluate

__all__ = ["EvalInputError", "EvalSettings", "METRICS", "Networks", "clip_cosine", "dai",
           "dift_features", "evaluate", "load_clip_image", "load_dift", "load_lpips", "lpips_224",
           "match_distances"]
