"""The drag engine: pure losses, tracking and fusion, DragText's text step, and the hosts' loops
(``loop``: DragDiffusion, CLIPDrag, DragNoise; ``gooddrag``; ``freedrag``), each one jitted
``lax.while_loop`` batched over edits."""

from .fusion import RULES, fuse
from .loop import (FAILURES, HOSTS, DragConfig, DragHypers, DragInputs, DragNetworks, DragState, make_runner,
                   prepare, prepare_batch, run, step, update_budget)
from .losses import (background_loss, clip_loss, motion_supervision, reference_patches, text_regularizer,
                     upsample_features)
from .methods import METHODS, pipeline_defaults, resolve, valid_settings
from .text import text_cotangent, text_gradient, text_step
from .tracking import templates, track

__all__ = ["FAILURES", "HOSTS", "RULES", "update_budget", "pipeline_defaults", "valid_settings", "text_cotangent",
           "text_gradient", "text_step", "fuse", "DragConfig", "DragHypers", "DragInputs", "DragNetworks", "DragState", "make_runner",
           "prepare", "prepare_batch", "run", "step", "background_loss", "clip_loss", "motion_supervision",
           "reference_patches", "text_regularizer", "upsample_features", "METHODS", "resolve", "templates",
           "track"]
