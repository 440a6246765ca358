"""The drag engine: pure losses, tracking and fusion, DragText's text step, the shared engine
types (``engine``), and the hosts (``loop``: DragDiffusion, CLIPDrag, DragNoise; ``gooddrag``;
``freedrag``), each one jitted ``lax.while_loop`` batched over edits, mapped by name in
``hosts.REGISTRY``."""

from .fusion import RULES, fuse
from .engine import FAILURES, DragConfig, DragHypers, DragInputs, DragNetworks, Host
from .hosts import HOSTS, REGISTRY, make_runner, update_budget
from .loop import DragState, prepare, prepare_batch, run, step
from .losses import (background_loss, clip_loss, motion_supervision, reference_patches, text_regularizer,
                     upsample_features)
from .methods import METHODS, pipeline_defaults, resolve, valid_settings
from .text import text_cotangent, text_gradient, text_step
from .tracking import templates, track

__all__ = ["FAILURES", "HOSTS", "REGISTRY", "Host", "RULES", "update_budget", "pipeline_defaults", "valid_settings", "text_cotangent",
           "text_gradient", "text_step", "fuse", "DragConfig", "DragHypers", "DragInputs", "DragNetworks", "DragState", "make_runner",
           "prepare", "prepare_batch", "run", "step", "background_loss", "clip_loss", "motion_supervision",
           "reference_patches", "text_regularizer", "upsample_features", "METHODS", "resolve", "templates",
           "track"]
