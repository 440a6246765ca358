"""A sweep's pictures (matplotlib, headless PNG):

``metric_vs_<setting>.png``  each metric's mean (with its 95 % interval) against one swept setting,
                              one line per value of the other settings, the default dashed;
``tradeoff.png``              the trade-off plane (displacement error or MD against background PSNR
                              or 1 − LPIPS), every point labelled, the Pareto front drawn, the
                              method's default a star (DragText's Fig. 7);
``strip.png``                 the edited images of a few samples across the grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .table import LOWER_IS_BETTER, pareto


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean(e, m):
    s = e["metrics"].get(m)
    return None if not s or s["mean"] is None else s["mean"]


def _log_axis(values) -> bool:
    v = [float(x) for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)]
    pos = [x for x in v if x > 0]
    return len(pos) >= 2 and max(pos) / min(pos) >= 100


def metric_vs_setting(table: dict, setting: str, metrics: list[str], path: Path) -> Path:
    plt = _plt()
    pts = table["points"]
    metrics = [m for m in metrics if any(_mean(e, m) is not None for e in pts)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    others = sorted({tuple((k, v) for k, v in e["point"].items() if k != setting) for e in pts}, key=repr)
    xs_all = sorted({e["point"][setting] for e in pts}, key=lambda v: (isinstance(v, str), v))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs_all)
    log = numeric and _log_axis(xs_all)
    default = table["defaults"].get(setting)
    for ax, m in zip(axes[0], metrics):
        for o in others:
            line = [e for e in pts if tuple((k, v) for k, v in e["point"].items() if k != setting) == o]
            line.sort(key=lambda e: xs_all.index(e["point"][setting]))
            xv = [e["point"][setting] for e in line]
            if numeric and log:  # zero on a log axis: drawn at a tenth of the smallest positive value
                pos = [v for v in xs_all if v > 0]
                xv = [v if v > 0 else min(pos) / 10 for v in xv]
            xpos = xv if numeric else [xs_all.index(v) for v in xv]
            y = [_mean(e, m) for e in line]
            ci = [e["metrics"].get(m, {}).get("ci95") for e in line]
            keep = [i for i, v in enumerate(y) if v is not None]
            if not keep:
                continue
            lo = [y[i] - ci[i][0] if ci[i] else 0 for i in keep]
            hi = [ci[i][1] - y[i] if ci[i] else 0 for i in keep]
            ax.errorbar([xpos[i] for i in keep], [y[i] for i in keep], yerr=[lo, hi], marker="o", capsize=3,
                        label=", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in o) or None)
        if default is not None and numeric:
            ax.axvline(default if not log or default > 0 else min(v for v in xs_all if v > 0) / 10,
                       color="gray", ls="--", lw=1)
        if log:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(xs_all)), [str(v) for v in xs_all])
        ax.set_xlabel(setting)
        ax.set_ylabel(m + (" (lower is better)" if LOWER_IS_BETTER.get(m) else ""))
        ax.grid(alpha=0.3)
    if len(others) > 1:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tradeoff(table: dict, x: str, y: str, path: Path, y_transform=None, y_label: str | None = None) -> Path:
    plt = _plt()
    pts = table["points"]
    xs = [_mean(e, x) for e in pts]
    ys = [_mean(e, y) for e in pts]
    if y_transform is not None:
        ys = [None if v is None else y_transform(v) for v in ys]
    y_lower = LOWER_IS_BETTER.get(y, False) if y_transform is None else False
    front = pareto(xs, ys, x_lower=LOWER_IS_BETTER.get(x, True), y_lower=y_lower)
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    for i, e in enumerate(pts):
        if xs[i] is None or ys[i] is None:
            continue
        ax.scatter(xs[i], ys[i], marker="*" if e["is_default"] else "o", s=160 if e["is_default"] else 28,
                   color="tab:red" if e["is_default"] else ("tab:blue" if i in front else "tab:gray"), zorder=3)
        ax.annotate(e["label"], (xs[i], ys[i]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if len(front) > 1:
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:blue", lw=1, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel(x + (" (lower is better)" if LOWER_IS_BETTER.get(x, True) else ""))
    ax.set_ylabel(y_label or y)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def strip(out: Path, table: dict, samples: list[str], path: Path) -> Path | None:
    """Rows: samples; columns: grid points; each cell the edited image (blank if missing)."""
    from PIL import Image

    plt = _plt()
    pts = table["points"]
    if not samples or not pts:
        return None
    fig, axes = plt.subplots(len(samples), len(pts), figsize=(1.6 * len(pts), 1.7 * len(samples)), squeeze=False)
    for r, name in enumerate(samples):
        for c, e in enumerate(pts):
            ax = axes[r][c]
            f = Path(out) / "points" / e["id"] / name / "overlay.png"
            f = f if f.exists() else f.with_name("edited.png")
            if f.exists():
                ax.imshow(np.asarray(Image.open(f).convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(e["label"].replace(",", "\n") + ("\n(default)" if e["is_default"] else ""), fontsize=6)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(out: Path, table: dict, grid_names: list[str], samples: list[str], toy: bool) -> list[Path]:
    """Every picture of a sweep into ``out``; returns their paths."""
    out = Path(out)
    paths = []
    if toy:
        metrics, x, y, tf, yl = ["rel_error", "survived", "bg_psnr", "iterations"], "rel_error", "bg_psnr", None, \
            "background PSNR (dB)"
    else:
        metrics = ["md", "lpips", "clip", "dai", "iterations"]
        x, y, tf, yl = "md", "lpips", (lambda v: 1 - v), "1 − LPIPS"
    for s in grid_names:
        paths.append(metric_vs_setting(table, s, metrics, out / f"metric_vs_{s}.png"))
    if any(_mean(e, x) is not None and _mean(e, y) is not None for e in table["points"]):
        paths.append(tradeoff(table, x, y, out / "tradeoff.png", tf, yl))
    p = strip(out, table, samples, out / "strip.png")
    if p is not None:
        paths.append(p)
    return paths
