"""jaxdrag: diffusion point-drag image editing in functional JAX: DragDiffusion, GoodDrag, FreeDrag and
DragNoise, each with and without DragText, and CLIPDrag (``METHODS``).

    pipe = jaxdrag.load_pipeline("path/to/sd15", clip="path/to/clip-vit-base-patch16")
    result = jaxdrag.edit(pipe, image, [(x_h, y_h), (x_t, y_t)], "a photo of a cat")
"""

from .data import EditRequest, EditResult, Generation, RequestError
from .drag.methods import METHODS
from .pipeline import EditSettings, LoRASettings, Pipeline, edit, edit_batch, load_pipeline
from .weights import WeightsError

__all__ = ["METHODS", "load_pipeline", "edit", "edit_batch", "Pipeline", "EditRequest", "EditResult", "EditSettings", "Generation",
           "LoRASettings", "RequestError", "WeightsError"]
__version__ = "0.1.0"
