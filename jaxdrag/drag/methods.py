"""Method presets with the reference defaults (ALGORITHMS.md §2.1, §3, §4.2, §5–§8), overridable.

Ten methods: four hosts (DragDiffusion, GoodDrag, FreeDrag, DragNoise) with and without DragText,
and CLIPDrag with and without DragText. A method reads only its host's settings
(``valid_settings``); others are rejected with that list.

A preset is a ``DragConfig`` (static structure) plus ``DragHypers`` defaults (continuous values).
``resolve(method, **overrides)`` applies overrides by name to whichever of the two holds the key
and rejects unknown keys with the list of valid ones.

Choices where the sources disagree (documented, all overridable):
- CLIPDrag: the DragBench script's loop settings (r1 4, r2 12, max 40 iterations, lr 0.01, λ 0.1)
  with the fusion weight 0.7 of the paper, the GUI and the author's advice (CLIPDrag issue #1)
  rather than the bench script's 0.3. The GUI runs up to 800 iterations (``max_iters=800``).
- Fusion rule ``paper`` (eq. 6 as printed); ``code`` reproduces the released sign; ``project``,
  ``add`` and ``prograd`` are the vector reading and the two baselines of CLIPDrag's Fig. 7a.
- ``snapshots`` (iteration caps, e.g. 10,20,40,80,160: CLIPDrag's Tables 1–2 in one run) sets
  ``max_iters`` to the largest cap unless ``max_iters`` is given too.
- The background term is applied only when a mask is drawn (DragDiffusion since Dec 2023, CLIPDrag
  HEAD); DragBench has no empty masks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import SettingsError, check_number
from .loop import DragConfig, DragHypers
from .settings import BY_NAME, check, read_by

_TEXT = dict(optimize_text=True)
_TEXT_HYP = dict(text_lr=0.004, text_lam=0.1)
_DD = dict(r_m=1, r_p=3, max_step=1.0, ms_reference="current", tracking="nearest", max_iters=80)
_CLIP = dict(r_m=4, r_p=12, max_step=4.0, ms_reference="initial", tracking="fast", max_iters=40,
             use_clip=True, fusion="paper")
_CLIP_HYP = dict(latent_lr=0.01, lam=0.1, fuse_weight=0.7, clip_coef=300.0)
# GoodDrag: DragText's DragBench run and bench_gooddrag.py (λ 0.1, 5 trackings without change;
# the UI uses λ 0.2 and 10); weight (2r1)², information-preserving reference, background always
_GOOD = dict(host="gooddrag", r_m=4, r_p=12, max_step=4.0, ms_reference="initial",  # weight (2r1)²
             background="always", drag_end_step=7, track_per_step=10, max_drag_per_track=3,
             max_track_no_change=5)
_GOOD_HYP = dict(latent_lr=0.02, lam=0.1, drag_loss_threshold=0.0)
# FreeDrag: 9×9 template (r_m = win_r = 4), 300 Adam steps, 5 per block, mean background λ 10
_FREE = dict(host="freedrag", r_m=4, max_iters=300, block_steps=5, bg_reduction="mean")
_FREE_HYP = dict(latent_lr=0.01, lam=10.0, l_expected=1.0, d_max=5.0)
# DragNoise: DragDiffusion's loss on the bottleneck at t*, background always, bench λ 0.2, lr 0.02
_NOISE = dict(_DD, host="dragnoise", background="always", end_step=0)
_NOISE_HYP = dict(latent_lr=0.02, lam=0.2)

_PRESETS: dict[str, tuple[dict, dict]] = {
    "dragdiffusion": (dict(_DD), dict(latent_lr=0.01, lam=0.1)),
    "dragtext": (dict(_DD, **_TEXT), dict(latent_lr=0.01, lam=0.1, **_TEXT_HYP)),
    "clipdrag": (dict(_CLIP), dict(_CLIP_HYP)),
    "clipdrag+dragtext": (dict(_CLIP, **_TEXT), dict(_CLIP_HYP, **_TEXT_HYP)),
    "gooddrag": (dict(_GOOD), dict(_GOOD_HYP)),
    "gooddrag+dragtext": (dict(_GOOD, **_TEXT), dict(_GOOD_HYP, **_TEXT_HYP)),
    "freedrag": (dict(_FREE), dict(_FREE_HYP)),
    "freedrag+dragtext": (dict(_FREE, **_TEXT), dict(_FREE_HYP, **_TEXT_HYP)),
    "dragnoise": (dict(_NOISE), dict(_NOISE_HYP)),
    "dragnoise+dragtext": (dict(_NOISE, **_TEXT), dict(_NOISE_HYP, **_TEXT_HYP)),
}

# pipeline-level defaults (ALGORITHMS.md §8) per method family (the name before "+"): LoRA steps /
# lr and inversion strength
_PIPELINE = {"dragdiffusion": dict(lora_steps=80, lora_lr=5e-4, inversion_strength=0.7),
             "dragtext": dict(lora_steps=80, lora_lr=5e-4, inversion_strength=0.7),
             "clipdrag": dict(lora_steps=80, lora_lr=5e-4, inversion_strength=0.7),
             "gooddrag": dict(lora_steps=70, lora_lr=5e-4, inversion_strength=0.75),
             "freedrag": dict(lora_steps=200, lora_lr=2e-4, inversion_strength=0.7),
             "dragnoise": dict(lora_steps=200, lora_lr=2e-4, inversion_strength=0.7)}

METHODS = tuple(_PRESETS)
# the overridable structure (host, optimize_text and use_clip define the method itself)
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(DragConfig)
                    if f.name not in ("sup_hw", "schedule", "host", "optimize_text", "use_clip"))
HYPER_KEYS = DragHypers._fields


# valid ranges of the continuous hyperparameters (from the settings table)
_HYPER_RANGES = {k: BY_NAME[k].range for k in HYPER_KEYS}


def _key(method) -> str:
    key = method.lower() if isinstance(method, str) else method
    if key not in _PRESETS:
        raise SettingsError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return key


def valid_settings(method: str) -> tuple[str, ...]:
    """The drag settings (config and hyperparameter names) ``method`` reads (``settings.read_by``)."""
    cfg = _PRESETS[_key(method)][0]
    return read_by(cfg.get("host", "dragdiffusion"), bool(cfg.get("optimize_text")), bool(cfg.get("use_clip")))


def pipeline_defaults(method: str) -> dict:
    """{lora_steps, lora_lr, inversion_strength} of ``method``'s reference (ALGORITHMS.md §8)."""
    return dict(_PIPELINE[_key(method).split("+")[0]])


def overrides_per_method(methods, overrides: dict) -> dict[str, dict]:
    """Route drag settings to the methods that read them (a benchmark over several methods):
    {method: its overrides}. Raises SettingsError for a setting no method reads."""
    unused = [k for k in overrides if not any(k in valid_settings(m) for m in methods)]
    if unused:
        raise SettingsError(f"drag setting(s) {unused} are read by none of the methods {', '.join(methods)}")
    return {m: {k: v for k, v in overrides.items() if k in valid_settings(m)} for m in methods}


def check_hypers(hypers: dict) -> dict[str, float]:
    """Every hyperparameter (names from HYPER_KEYS; callers reject unknown ones) finite and in its
    range (learning rates > 0, weights ≥ 0); returns them as floats. Raises SettingsError naming
    the setting."""
    return {k: check_number(k, v, **{_HYPER_RANGES[k]: True}) for k, v in hypers.items()}


def resolve(method: str, **overrides: Any) -> tuple[DragConfig, dict[str, float]]:
    """(DragConfig without sup_hw, hyperparameter dict) for ``method`` with ``overrides``.
    Raises SettingsError for an unknown method or setting, or a value out of range."""
    key = _key(method)
    cfg_kw, hyp = dict(_PRESETS[key][0]), dict(DragHypers.make()._asdict())
    hyp = {k: float(v) for k, v in hyp.items()}
    hyp.update(_PRESETS[key][1])
    valid = valid_settings(key)
    unknown = [k for k in overrides if overrides[k] is not None and k not in valid]
    if unknown:
        known = [k for k in unknown if k in CONFIG_KEYS or k in HYPER_KEYS]
        what = "setting(s) not used by method " + repr(key) if len(known) == len(unknown) else "unknown drag setting(s)"
        raise SettingsError(f"{what} {unknown}; valid for {key}: {', '.join(valid)}")
    for k, v in overrides.items():
        if v is None:
            continue
        if k in HYPER_KEYS:
            hyp[k] = v
        else:
            cfg_kw[k] = v
    hyp = check_hypers(hyp)
    if cfg_kw.get("snapshots"):
        caps = cfg_kw["snapshots"]
        if isinstance(caps, str):  # "10,20,40" (the command line)
            try:
                caps = [float(c) for c in caps.replace(",", " ").split()]
            except ValueError:
                raise SettingsError(f"setting snapshots = {caps!r}: must be iteration counts like 10,20,40") from None
        caps = tuple(check_number("snapshots", c, positive=True, integer=True) for c in caps)
        cfg_kw["snapshots"] = caps
        if overrides.get("max_iters") is None:  # the run goes on to the largest cap
            cfg_kw["max_iters"] = max(caps)
    cfg_kw.setdefault("max_step", 1.0)
    for k, v in cfg_kw.items():  # numbers against the settings table (choices: DragConfig)
        if k in BY_NAME and BY_NAME[k].kind in ("int", "float") and v is not None:
            cfg_kw[k] = check(k, v)
    try:
        return DragConfig(**cfg_kw), hyp
    except (ValueError, TypeError) as e:
        raise SettingsError(str(e)) from None
