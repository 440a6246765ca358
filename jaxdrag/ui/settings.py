"""The method settings the UI shows, their per-method defaults, and the request parts built from
them: pipeline settings, compile-time drag settings (``overrides``, shared by a batch) and
continuous hyperparameters (``hypers``, per edit, so edits that differ only in them batch
together). Pure functions (no Gradio here)."""

from __future__ import annotations

from ..drag.methods import CONFIG_KEYS, HYPER_KEYS, pipeline_defaults, resolve, valid_settings
from ..drag.settings import SETTINGS
from ..errors import SettingsError

# the fields of the settings panel: (key, label); lora_steps / inversion_strength are pipeline
# settings, the others the drag settings that have a label in the settings table
FIELDS = (("lora_steps", "LoRA steps"), ("inversion_strength", "inversion strength")) + tuple(
    (s.name, s.label) for s in SETTINGS if s.label)
KEYS = tuple(k for k, _ in FIELDS)
INTERPOLATION = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # DragText §6's α


def defaults(method: str) -> dict[str, float | int | None]:
    """Each field's value for ``method`` (None where the method does not read it)."""
    cfg, hyp = resolve(method)
    pipe = pipeline_defaults(method)
    valid = set(valid_settings(method))
    out: dict = {"lora_steps": pipe["lora_steps"], "inversion_strength": pipe["inversion_strength"]}
    for k in KEYS[2:]:
        if k not in valid:
            out[k] = None
        elif k in HYPER_KEYS:
            out[k] = hyp[k]
        else:
            out[k] = getattr(cfg, k)
    return out


def _value(text: str):
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def parse_extra(text: str, method: str) -> dict:
    """'r_m=2, tracking=fast' (commas or new lines) → {"r_m": 2, "tracking": "fast"}; a key the
    method does not read, or a malformed entry, raises SettingsError naming it."""
    out = {}
    valid = valid_settings(method)
    for part in (text or "").replace("\n", ",").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise SettingsError(f"more settings: {part.strip()!r} is not key=value")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in valid:
            raise SettingsError(f"more settings: {k!r} is not a setting of {method}; valid: {', '.join(valid)}")
        out[k] = _value(v)
    return out


def number(label: str, text) -> float | int | None:
    """A settings field's text → its number (None when empty: the method's default)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    v = _value(str(text)) if isinstance(text, str) else text
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SettingsError(f"setting {label} = {text!r}: must be a number (or empty for the method's default)")
    return v


def split(method: str, texts: dict, extra: str = "") -> tuple[dict, dict, dict]:
    """(pipeline fields, drag overrides, hypers) of the panel's fields (key → text; empty = the
    method's default) and the 'more settings' text, checked by ``resolve`` (SettingsError names a
    bad one). Fields the method does not read are ignored."""
    labels = dict(FIELDS)
    values = {k: number(labels[k], t) for k, t in texts.items() if k in labels}
    valid = set(valid_settings(method))
    pipe = {k: values[k] for k in ("lora_steps", "inversion_strength") if values.get(k) is not None}
    drag = {k: v for k, v in values.items() if k in KEYS[2:] and v is not None and k in valid}
    drag.update(parse_extra(extra, method))
    if "max_iters" in drag:
        drag["max_iters"] = _int(labels["max_iters"], drag["max_iters"])
    if "lora_steps" in pipe:
        pipe["lora_steps"] = _int(labels["lora_steps"], pipe["lora_steps"])
    resolve(method, **drag)  # every value checked here
    overrides = {k: v for k, v in drag.items() if k in CONFIG_KEYS}
    hypers = {k: float(v) for k, v in drag.items() if k in HYPER_KEYS}
    return pipe, overrides, hypers


def _int(label: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v):
        raise SettingsError(f"setting {label} = {v!r}: must be a whole number")
    return int(v)
