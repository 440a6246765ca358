"""Method presets with the reference defaults (ALGORITHMS.md §2.1, §3, §4.2, §8), overridable.

A preset is a ``DragConfig`` (static structure) plus ``DragHypers`` defaults (continuous values).
``resolve(method, **overrides)`` applies overrides by name to whichever of the two holds the key
and rejects unknown keys with the list of valid ones.

Choices where the sources disagree (documented, all overridable):
- CLIPDrag: the DragBench script's loop settings (r1 4, r2 12, max 40 iterations, lr 0.01, λ 0.1)
  with the fusion weight 0.7 of the paper, the GUI and the author's advice (CLIPDrag issue #1)
  rather than the bench script's 0.3. The GUI runs up to 800 iterations (``max_iters=800``).
- Fusion rule ``paper`` (eq. 6 as printed); ``code`` reproduces the released sign.
- The background term is applied only when a mask is drawn (DragDiffusion since Dec 2023, CLIPDrag
  HEAD); DragBench has no empty masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import SettingsError, check_number
from .loop import DragConfig, DragHypers

_PRESETS: dict[str, tuple[dict, dict]] = {
    "dragdiffusion": (
        dict(r_m=1, r_p=3, max_step=1.0, ms_reference="current", tracking="nearest", max_iters=80),
        dict(latent_lr=0.01, lam=0.1),
    ),
    "dragtext": (
        dict(r_m=1, r_p=3, max_step=1.0, ms_reference="current", tracking="nearest", max_iters=80,
             optimize_text=True),
        dict(latent_lr=0.01, lam=0.1, text_lr=0.004, text_lam=0.1),
    ),
    "clipdrag": (
        dict(r_m=4, r_p=12, max_step=4.0, ms_reference="initial", tracking="fast", max_iters=40,
             use_clip=True, fusion="paper"),
        dict(latent_lr=0.01, lam=0.1, fuse_weight=0.7, clip_coef=300.0),
    ),
    "clipdrag+dragtext": (
        dict(r_m=4, r_p=12, max_step=4.0, ms_reference="initial", tracking="fast", max_iters=40,
             use_clip=True, fusion="paper", optimize_text=True),
        dict(latent_lr=0.01, lam=0.1, fuse_weight=0.7, clip_coef=300.0, text_lr=0.004, text_lam=0.1),
    ),
}

METHODS = tuple(_PRESETS)
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(DragConfig) if f.name not in ("sup_hw", "schedule"))
HYPER_KEYS = DragHypers._fields


# valid ranges of the continuous hyperparameters: learning rates > 0, weights ≥ 0
_HYPER_RANGES = {"latent_lr": "positive", "text_lr": "positive", "lam": "nonnegative",
                 "text_lam": "nonnegative", "fuse_weight": "nonnegative", "clip_coef": "nonnegative"}


def check_hypers(hypers: dict) -> dict[str, float]:
    """Every hyperparameter (names from HYPER_KEYS; callers reject unknown ones) finite and in its
    range (learning rates > 0, weights ≥ 0); returns them as floats. Raises SettingsError naming
    the setting."""
    return {k: check_number(k, v, **{_HYPER_RANGES[k]: True}) for k, v in hypers.items()}


def resolve(method: str, **overrides: Any) -> tuple[DragConfig, dict[str, float]]:
    """(DragConfig without sup_hw, hyperparameter dict) for ``method`` with ``overrides``.
    Raises SettingsError for an unknown method or setting, or a value out of range."""
    key = method.lower() if isinstance(method, str) else method
    if key not in _PRESETS:
        raise SettingsError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cfg_kw, hyp = dict(_PRESETS[key][0]), dict(DragHypers.make()._asdict())
    hyp = {k: float(v) for k, v in hyp.items()}
    hyp.update(_PRESETS[key][1])
    unknown = [k for k in overrides if k not in CONFIG_KEYS and k not in HYPER_KEYS]
    if unknown:
        raise SettingsError(f"unknown drag setting(s) {unknown}; valid: {', '.join(CONFIG_KEYS + HYPER_KEYS)}")
    for k, v in overrides.items():
        if v is None:
            continue
        if k in HYPER_KEYS:
            hyp[k] = v
        else:
            cfg_kw[k] = v
    hyp = check_hypers(hyp)
    for k in ("r_m", "r_p"):
        cfg_kw[k] = check_number(k, cfg_kw[k], nonnegative=True, integer=True)
    cfg_kw["max_iters"] = check_number("max_iters", cfg_kw["max_iters"], positive=True, integer=True)
    cfg_kw["max_step"] = check_number("max_step", cfg_kw["max_step"], positive=True)
    if cfg_kw.get("ms_weight") is not None:
        cfg_kw["ms_weight"] = check_number("ms_weight", cfg_kw["ms_weight"], positive=True)
    try:
        return DragConfig(**cfg_kw), hyp
    except (ValueError, TypeError) as e:
        raise SettingsError(str(e)) from None
