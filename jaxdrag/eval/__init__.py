"""Evaluation as the papers do it: LPIPS (AlexNet), DIFT mean distance on SD-2.1, LPIPS × MD,
CLIP ViT-B/32 image similarity and GoodDrag's DAI, batched in JAX (``jaxdrag eval``).

Rooms, in the order data flows: ``settings`` (what is computed), ``networks`` (torch-free loaders),
``image`` (reading, torch-exact resizes, CLIP preprocessing), ``metrics`` (pure metric functions),
``programs`` (the networks as jitted batch programs), ``runner`` (datasets, results, batching,
per-sample files, resume), ``tables`` (aggregates, Markdown).
"""

from .image import EvalInputError
from .metrics import clip_cosine, dai, dift_features, lpips_224, match_distances
from .networks import load_clip_image, load_dift, load_lpips
from .programs import Networks
from .runner import evaluate
from .settings import METRICS, EvalSettings

__all__ = ["EvalInputError", "EvalSettings", "METRICS", "Networks", "clip_cosine", "dai",
           "dift_features", "evaluate", "load_clip_image", "load_dift", "load_lpips", "lpips_224",
           "match_distances"]
