"""A sweep's grid: which settings vary, over which values, checked against the method.

``--grid NAME=v1,v2,…`` (the full product of every ``--grid``) or, with ``--random N``,
``--grid NAME=lo:hi`` ranges (``lo:hi:log`` for log-uniform) sampled N times. NAME is a drag
setting of the table (``drag/settings.py``) that the method reads, or one of the pipeline's
``inversion_strength`` / ``lora_steps``. A point is a dict {name: value}; its settings split into
the continuous ones (``DragHypers``: one batch serves every value) and the compiled ones (each
value its own programs: the points are grouped by them).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ..drag.methods import HYPER_KEYS, resolve, valid_settings
from ..drag.settings import BY_NAME, check
from ..errors import SettingsError

# settings of the pipeline rather than the drag loop that a sweep may vary (compiled: the
# inversion's step count and the LoRA's step count are program shapes)
PIPELINE = {"inversion_strength": "float", "lora_steps": "int"}


def _value(name: str, text: str, kind: str):
    """One grid value parsed as the setting's type (SettingsError naming both otherwise)."""
    t = text.strip()
    try:
        if kind == "int":
            v = int(t)
        elif kind == "float":
            v = float(t)
        elif kind == "bool":
            if t.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            v = t.lower() in ("true", "1")
        elif kind == "choice":
            v = t
        else:
            raise SettingsError(f"--grid {name}: a {kind} setting cannot be swept")
    except ValueError:
        raise SettingsError(f"--grid {name}={text!r}: expected a {kind} value") from None
    if name in PIPELINE:
        if name == "inversion_strength" and not 0 < v <= 1:
            raise SettingsError(f"--grid inversion_strength={v}: must lie in (0, 1]")
        if name == "lora_steps" and v < 0:
            raise SettingsError(f"--grid lora_steps={v}: must be ≥ 0")
        return v
    try:
        return check(name, v)
    except SettingsError as e:
        raise SettingsError(f"--grid {name}: {e}") from None


def _kind(method: str, name: str) -> str:
    if name in PIPELINE:
        return PIPELINE[name]
    if name not in BY_NAME:
        raise SettingsError(f"--grid {name}: unknown setting; the method {method!r} reads: "
                            f"{', '.join(valid_settings(method))}, and the pipeline's {', '.join(PIPELINE)}")
    if name not in valid_settings(method):
        raise SettingsError(f"--grid {name}: not read by method {method!r}; it reads: "
                            f"{', '.join(valid_settings(method))}")
    return BY_NAME[name].kind


def _split_spec(spec: str) -> tuple[str, str]:
    name, eq, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not eq or not name or not values.strip():
        raise SettingsError(f"--grid {spec!r}: expected NAME=v1,v2,… (or NAME=lo:hi with --random)")
    return name, values


def parse_grid(method: str, specs: list[str]) -> dict[str, list]:
    """{name: values} from ``--grid`` specs (each name once, values distinct)."""
    resolve(method)  # an unknown method is named first
    grid: dict[str, list] = {}
    for spec in specs:
        name, values = _split_spec(spec)
        if name in grid:
            raise SettingsError(f"--grid {name}: given twice")
        kind = _kind(method, name)
        vals = [_value(name, v, kind) for v in values.split(",") if v.strip()]
        if len(set(map(repr, vals))) != len(vals):
            raise SettingsError(f"--grid {name}: repeated value in {values!r}")
        grid[name] = vals
    if not grid:
        raise SettingsError("sweep: give at least one --grid NAME=v1,v2,…")
    return grid


def product(grid: dict[str, list]) -> list[dict]:
    """Every combination, the last setting varying fastest."""
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def parse_ranges(method: str, specs: list[str]) -> dict[str, tuple]:
    """{name: (kind, lo, hi, log)} from ``--grid NAME=lo:hi[:log]`` (numeric settings only)."""
    resolve(method)
    out = {}
    for spec in specs:
        name, values = _split_spec(spec)
        kind = _kind(method, name)
        if kind not in ("int", "float"):
            raise SettingsError(f"--grid {name}: --random needs a numeric setting, {name} is a {kind}")
        parts = values.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].strip() != "log"):
            raise SettingsError(f"--grid {spec!r}: with --random expected NAME=lo:hi or NAME=lo:hi:log")
        lo, hi = (_value(name, p, kind) for p in parts[:2])
        log = len(parts) == 3
        if not lo < hi or (log and lo <= 0):
            raise SettingsError(f"--grid {spec!r}: needs lo < hi{' and lo > 0 (log)' if log else ''}")
        out[name] = (kind, lo, hi, log)
    if not out:
        raise SettingsError("sweep --random: give at least one --grid NAME=lo:hi")
    return out


def random_points(ranges: dict[str, tuple], n: int, seed: int = 0) -> list[dict]:
    """``n`` points drawn uniformly (log-uniformly where asked) from the ranges."""
    if n < 1:
        raise SettingsError(f"--random {n}: must be ≥ 1")
    rng = np.random.default_rng(seed)
    pts = []
    for _ in range(n):
        p = {}
        for name, (kind, lo, hi, log) in ranges.items():
            u = rng.uniform()
            v = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if log else lo + u * (hi - lo)
            p[name] = int(round(v)) if kind == "int" else float(f"{v:.4g}")
        pts.append(p)
    return pts


def split(point: dict) -> tuple[dict, dict, dict]:
    """(continuous hyperparameters, compiled drag overrides, pipeline settings) of a point."""
    hyp = {k: v for k, v in point.items() if k in HYPER_KEYS}
    pipe = {k: v for k, v in point.items() if k in PIPELINE}
    comp = {k: v for k, v in point.items() if k not in hyp and k not in pipe}
    return hyp, comp, pipe


def label(point: dict) -> str:
    """``name=value`` pairs, comma-separated (a point's name in tables and pictures)."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def defaults(method: str, names) -> dict:
    """The method's default value of each swept setting."""
    from ..drag.methods import pipeline_defaults

    cfg, hyp = resolve(method)
    pd = pipeline_defaults(method)
    out = {}
    for n in names:
        if n in hyp:
            out[n] = hyp[n]
        elif n in PIPELINE:
            out[n] = pd[n]
        else:
            out[n] = getattr(cfg, n)
    return out
