"""The SD-1.5 networks as pure functions, and the editing pipeline (ALGORITHMS.md §1):

  per-edit LoRA identity finetune → DDIM inversion to t* → drag loop (``jaxdrag.drag``) →
  denoising of [z*, ẑ] from t* with reference (mutual self-) attention → VAE decode → uint8

Every stage is one jitted function over a batch of edits that share an image shape: the base
weights are shared, each edit carries its own LoRA, latents, text embedding, points and
hyperparameters on a leading axis (``jax.vmap``). Stages are compiled ahead of time once per shape
(``_Stages``) so per-stage timings separate compile time from run time.

Rooms: ``pixels`` (pixel-space helpers), ``stages`` (the compile cache, export, devices, memory
measurement), ``networks`` (``Pipeline``: the networks, devices, jit caches; ``load_pipeline``), ``lora`` (the per-edit
LoRA), ``sampling`` (inversion, denoising, generation, decoding), ``dragnets`` (the drag engine's view of
the networks), ``settings`` (``EditSettings``), ``group`` (one batch through every stage), ``editing``
(requests, batches, planning, compiling ahead; ``edit_batch``), ``assemble`` (results). Every name is importable from ``jaxdrag.pipeline`` as before.
"""

from __future__ import annotations

from .pixels import tree_bytes, pool_matrix, adaptive_avg_pool, clip_pixels, bilinear_resize, to_uint8, Array, CLIP_MEAN, CLIP_STD
from .stages import ProgressRelay, Bar, Stages, CUDNN_TARGETS
from .lora import LoRASettings, check_remat
from .networks import Pipeline, load_pipeline
from .settings import EditSettings
from .editing import pow2_bucket, plan_batch, edit_batch, edit, compile_for

__all__ = ["tree_bytes", "pool_matrix", "adaptive_avg_pool", "clip_pixels", "bilinear_resize", "to_uint8", "Array", "CLIP_MEAN", "CLIP_STD", "ProgressRelay", "Bar", "Stages", "CUDNN_TARGETS", "LoRASettings", "check_remat", "Pipeline", "load_pipeline", "EditSettings", "pow2_bucket", "plan_batch", "edit_batch", "edit", "compile_for"]
