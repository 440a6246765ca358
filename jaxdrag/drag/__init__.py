"""The drag engine: pure losses, tracking and fusion, one jitted step, one while_loop."""

from .fusion import RULES, fuse
from .loop import (FAILURES, DragConfig, DragHypers, DragInputs, DragNetworks, DragState, make_runner, prepare,
                   prepare_batch, run, step)
from .losses import (background_loss, clip_loss, motion_supervision, reference_patches, text_regularizer,
                     upsample_features)
from .methods import METHODS, resolve
from .tracking import templates, track

__all__ = ["FAILURES", "RULES", "fuse", "DragConfig", "DragHypers", "DragInputs", "DragNetworks", "DragState", "make_runner",
           "prepare", "prepare_batch", "run", "step", "background_loss", "clip_loss", "motion_supervision",
           "reference_patches", "text_regularizer", "upsample_features", "METHODS", "resolve", "templates",
           "track"]
