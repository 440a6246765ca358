"""Aggregates and tables of ``jaxdrag eval`` (as the papers: LPIPS, CLIP similarity and DAI are
means over images, MD the mean over all handle–target pairs, LPIPS × MD the product of the two
aggregates)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .settings import EvalSettings


def _aggregate(recs: list[dict], s: EvalSettings) -> dict:
    agg: dict = {"samples": len(recs)}
    vals = lambda m: [r["metrics"][m] for r in recs if m in r["metrics"]]  # noqa: E731
    if "lpips" in s.metrics and vals("lpips"):
        agg["lpips"] = float(np.mean(vals("lpips")))
        agg["image_fidelity"] = 1.0 - agg["lpips"]
    if "clip" in s.metrics and vals("clip"):
        agg["clip"] = float(np.mean(vals("clip")))
    if "md" in s.metrics and vals("md"):
        dists = [d for v in vals("md") for d in v]
        agg["md"] = float(np.mean(dists))
        agg["pairs"] = len(dists)
        if "lpips" in agg:
            agg["lpips_x_md"] = agg["lpips"] * agg["md"]
    if "dai" in s.metrics and vals("dai"):
        agg["dai"] = {str(g): float(np.mean([v[str(g)] for v in vals("dai")])) for g in s.gammas}
    return agg


def summarize(out: Path, names: list[str], s: EvalSettings, skipped: dict[str, str]) -> dict:
    recs = []
    for n in names:
        p = out / "samples" / f"{n}.json"
        if n not in skipped and p.exists():
            recs.append(json.loads(p.read_text()))
    cats = sorted({r["category"] for r in recs if r["category"]})
    return {"settings": asdict(s), "overall": _aggregate(recs, s),
            "categories": {c: _aggregate([r for r in recs if r["category"] == c], s) for c in cats},
            "skipped": skipped}


def markdown(summary: dict) -> str:
    """The summary as Markdown tables (overall first, then per category)."""
    s = summary["settings"]
    cols = [("samples", "samples", "{:d}")]
    if "lpips" in s["metrics"]:
        cols += [("lpips", "LPIPS ↓", "{:.4f}"), ("image_fidelity", "1−LPIPS ↑", "{:.4f}")]
    if "md" in s["metrics"]:
        cols += [("md", "MD ↓", "{:.2f}"), ("pairs", "pairs", "{:d}")]
        if "lpips" in s["metrics"]:
            cols += [("lpips_x_md", "LPIPS×MD ↓", "{:.3f}")]
    if "clip" in s["metrics"]:
        cols += [("clip", "CLIP sim ↑", "{:.4f}")]
    dai_cols = [str(g) for g in s["gammas"]] if "dai" in s["metrics"] else []
    head = ["", *[c[1] for c in cols], *[f"DAI γ={g} ↓" for g in dai_cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, agg):
        cells = [name]
        for key, _, fmt in cols:
            cells.append(fmt.format(agg[key]) if key in agg else "–")
        for g in dai_cols:
            cells.append(f"{agg['dai'][g]:.4f}" if "dai" in agg else "–")
        return "| " + " | ".join(cells) + " |"

    lines.append(row("**all**", summary["overall"]))
    for c, agg in summary["categories"].items():
        lines.append(row(c, agg))
    text = "\n".join(lines) + "\n"
    if summary["skipped"]:
        text += f"\nSkipped {len(summary['skipped'])} sample(s):\n\n"
        text += "\n".join(f"- {n}: {why}" for n, why in sorted(summary["skipped"].items())) + "\n"
    notes = []
    if "md" in s["metrics"]:
        notes.append(f"MD: DIFT at t = {s['t']}, up_blocks[{s['up_index']}], ensemble {s['ensemble']}, "
                     f"seed {s['seed']}; mean over pairs.")
    if "dai" in s["metrics"]:
        notes.append(f"DAI: {'÷N² (reference code)' if s['dai_double_n'] else '÷N (paper)'}.")
    if notes:
        text += "\n" + " ".join(notes)
    return text + "\n"
