"""A sweep's table: per grid point and metric, the mean, the median and a bootstrap 95 %
interval of the mean over the samples (JSON + Markdown).

Metrics are whatever the edits were scored with (ToyBench: displacement error in px and per
drag length, spot error, IoU, survival, background PSNR; a real dataset: the ``jaxdrag eval``
metrics) plus the iteration count. Non-finite values (an object that vanished has an infinite
error) count in the median and in ``n_inf``; the mean and its interval are over the finite ones.
"""

from __future__ import annotations

import math

import numpy as np

# what a lower value means for each metric the pictures and the Pareto front use
LOWER_IS_BETTER = {"rel_error": True, "error": True, "spot_error": True, "md": True, "lpips": True,
                   "lpips_md": True, "dai": True, "iterations": True, "iou": False, "survived": False,
                   "bg_psnr": False, "clip": False}
TOY_METRICS = ("rel_error", "error", "spot_error", "iou", "survived", "bg_psnr", "iterations")


def bootstrap_ci(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``values`` (finite, ≥ 1) over ``n`` resamples."""
    v = np.asarray(values, np.float64)
    if len(v) == 1:
        return float(v[0]), float(v[0])
    idx = np.random.default_rng(seed).integers(0, len(v), (n, len(v)))
    means = v[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def stats(values) -> dict:
    """{mean, median, ci95, n, n_inf} of one metric over the samples (None where no value)."""
    v = np.asarray([float(x) for x in values if x is not None], np.float64)
    if len(v) == 0:
        return {"mean": None, "median": None, "ci95": None, "n": 0, "n_inf": 0}
    fin = v[np.isfinite(v)]
    med = float(np.median(v))
    out = {"median": med if math.isfinite(med) else None, "n": int(len(v)), "n_inf": int(len(v) - len(fin))}
    if len(fin):
        out.update(mean=float(fin.mean()), ci95=list(bootstrap_ci(fin)))
    else:
        out.update(mean=None, ci95=None)
    return out


def build(rows: dict[str, dict[str, dict]], points: list[dict], ids: list[str], defaults: dict) -> dict:
    """The table: one entry per point with its stats per metric (metrics that are numbers)."""
    from .grid import label

    entries = []
    for pid, p in zip(ids, points):
        per = rows.get(pid, {})
        names = sorted({k for m in per.values() for k, v in m.items() if isinstance(v, (int, float))})  # bools too
        metrics = {k: stats([float(m[k]) for m in per.values() if isinstance(m.get(k), (int, float))])
                   for k in names}
        entries.append({"id": pid, "label": label(p), "point": p, "samples": len(per),
                        "is_default": all(_same(p[k], defaults.get(k)) for k in p), "metrics": metrics})
    return {"points": entries, "defaults": defaults}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return b is not None and math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def markdown(table: dict, metrics: list[str] | None = None) -> str:
    """One row per point: each metric's mean [95 % interval] and median."""
    pts = table["points"]
    have = sorted({k for e in pts for k in e["metrics"]})
    metrics = [m for m in (metrics or have) if m in have]
    head = "| point | samples | " + " | ".join(f"{m} mean [95 % CI] · median" for m in metrics) + " |"
    lines = [head, "| --- | ---: |" + " ---: |" * len(metrics)]
    for e in pts:
        cells = []
        for m in metrics:
            s = e["metrics"].get(m)
            if not s or s["n"] == 0:
                cells.append("–")
                continue
            mean = "–" if s["mean"] is None else f"{s['mean']:.3g} [{s['ci95'][0]:.3g}, {s['ci95'][1]:.3g}]"
            med = "inf" if s["median"] is None else f"{s['median']:.3g}"
            cells.append(f"{mean} · {med}" + (f" ({s['n_inf']} inf)" if s["n_inf"] else ""))
        name = e["label"] + (" **(default)**" if e["is_default"] else "")
        lines.append(f"| {name} | {e['samples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto(xs: list[float], ys: list[float], x_lower: bool = True, y_lower: bool = False) -> list[int]:
    """Indices of the points no other point beats on both axes (sorted by x)."""
    sx = 1 if x_lower else -1
    sy = 1 if y_lower else -1
    front = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x is None or y is None:
            continue
        dominated = any(xj is not None and yj is not None and sx * xj <= sx * x and sy * yj <= sy * y
                        and (sx * xj < sx * x or sy * yj < sy * y) for xj, yj in zip(xs, ys))
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: xs[i])
