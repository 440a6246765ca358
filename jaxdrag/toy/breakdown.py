"""Where a method's ToyBench error comes from, read from a finished run's ``toybench.json``
(no editing): per method, the tasks whose point tracking reached the targets against those that ran
into the iteration cap, and the error by drag length.

For every dragged object: ``fraction`` = the object's displacement projected on its drag, over the
drag's length (1 = moved exactly as far as asked along the drag, 0 = did not move); ``rel_error``
= |displacement − drag| / |drag| (ToyBench's error). An object that did not survive has no
displacement and counts in ``lost``. With the run's folders next to the JSON, also the task's
``tracked`` fraction (the tracked handles' final displacement projected on their drags, mean over
handles: where point tracking believes the content went) and the iterations per supervision pixel
the tracked handles moved (how fast the latent optimisation carries the content).

The same run measured as DragBench measures (``md_ratio``): the *mean* distance between where each
object found in the output went and where it was asked to go, over the mean distance an edit that moves
nothing scores (the mean drag) — the published DragBench mean distance (MD) of each reference method
divided by DragBench's own no-move MD is the same ratio on real images with the real SD-1.5
(``PUBLISHED_MD``; ``--dragbench DIR`` computes DragBench's no-move MD from the dataset).

Two methods of the same run compared task by task (``paired``, ``--paired A,B``): the difference of
their median relative errors with a bootstrap interval over tasks, the tasks each does better on
(with the sign test's p), and the difference of their survival rates with its interval.

    python -m jaxdrag.toy.breakdown runs/toybench/toybench.json [--out DIR] [--dragbench DIR] [--paired A,B]

writes ``breakdown.json`` / ``breakdown.md`` and ``breakdown.png`` (error against drag length,
reached against capped) into DIR (default: next to the input).
"""

from __future__ import annotations

import argparse
import math
import json
from pathlib import Path

import numpy as np

LENGTH_BINS = ((0.0, 12.0), (12.0, 16.0), (16.0, 20.0), (20.0, 1e9))  # px

# DragBench mean distance (px, 512-px images, DIFT matching) of each method, without and with
# DragText (jaxdrag's "dragtext" is DragDiffusion with DragText): DragText paper (Choi et al. 2024),
# Table 1, every method at its reference's defaults; CLIPDrag: its paper's App. E, Table 1, pure drag
# editing at 80 iterations (where its own DragDiffusion run scores 38.8, not 33.21).
PUBLISHED_MD = {"dragdiffusion": 33.21, "dragtext": 29.78, "freedrag": 34.44,
                "freedrag+dragtext": 31.59, "dragnoise": 35.55, "dragnoise+dragtext": 34.23,
                "gooddrag": 24.29, "gooddrag+dragtext": 20.53, "clipdrag": 35.8}


def tracking(report: dict) -> tuple[float, float]:
    """(tracked fraction, iterations per supervision px moved by the tracked handles) of one edit's
    ``report.json``; the supervision map is half the image (DragDiffusion), so 1 sup px = 2 px."""
    h0 = np.asarray(report["points"]["initial_handles"], float)
    tg = np.asarray(report["points"]["targets"], float)
    h1 = np.asarray(report["final_handles"], float)
    drag, moved = tg - h0, h1 - h0
    frac = float(np.mean(np.sum(moved * drag, -1) / np.maximum(np.sum(drag * drag, -1), 1e-9)))
    sup_px = float(np.mean(np.linalg.norm(moved, axis=-1))) / 2.0
    return frac, (report["iterations"] / sup_px if sup_px > 0 else float("inf"))


def objects(per_task: dict, run_dir: Path | None = None) -> list[dict]:
    """One row per dragged object of one method's tasks: length (px), rel_error, fraction (NaN
    when lost), reached (the task's tracking reached every target), iterations, kind, survived;
    with ``run_dir`` (the method's folder of the run) also tracked and iters_per_sup_px."""
    rows = []
    for t in per_task.values():
        rep = None if run_dir is None else Path(run_dir) / t["name"] / "report.json"
        tr = tracking(json.loads(rep.read_text())) if rep is not None and rep.exists() else (float("nan"),) * 2
        for o in t["objects"]:
            drag = np.asarray(o["drag"], float)
            length = float(np.linalg.norm(drag))
            moved = np.asarray(o["moved"], float)
            frac = float(moved @ drag / length ** 2) if np.all(np.isfinite(moved)) else float("nan")
            rows.append({"task": t["name"], "kind": t["kind"], "length": length, "rel_error": float(o["rel_error"]),
                         "fraction": frac, "reached": bool(t["reached"]), "iterations": int(t["iterations"]),
                         "survived": bool(o["survived"]), "tracked": tr[0], "iters_per_sup_px": tr[1]})
    return rows


def _summary(rows: list[dict]) -> dict:
    if not rows:
        return {"objects": 0}
    err = np.array([r["rel_error"] for r in rows])
    frac = np.array([r["fraction"] for r in rows])
    trk = np.array([r.get("tracked", np.nan) for r in rows])
    ipp = np.array([r.get("iters_per_sup_px", np.nan) for r in rows])
    return {"objects": len(rows), "median_rel_error": float(np.nanmedian(err)),
            "median_fraction": float(np.nanmedian(frac)) if np.isfinite(frac).any() else None,
            "median_tracked": float(np.nanmedian(trk)) if np.isfinite(trk).any() else None,
            "median_iters_per_sup_px": (float(np.median(ipp[np.isfinite(ipp)])) if np.isfinite(ipp).any()
                                        else None),
            "within_25": float(np.mean(err <= 0.25)), "lost": int(np.sum(~np.isfinite(frac))),
            "mean_iterations": float(np.mean([r["iterations"] for r in rows]))}


def md_ratio(per_task: dict) -> dict:
    """DragBench's statistic on one method's ToyBench tasks: {"md_px": mean |displacement − drag|
    over the objects found in the output (px), "no_move_px": their mean drag (what an edit that moves
    nothing scores), "ratio": md_px / no_move_px, "lost": the share of objects left out (not found,
    so no displacement)}."""
    rows = objects(per_task)
    kept = [r for r in rows if np.isfinite(r["fraction"])]
    if not kept:
        return {"md_px": None, "no_move_px": None, "ratio": None, "lost": 1.0 if rows else 0.0}
    md = float(np.mean([r["rel_error"] * r["length"] for r in kept]))
    no_move = float(np.mean([r["length"] for r in kept]))
    return {"md_px": md, "no_move_px": no_move, "ratio": md / no_move, "lost": 1 - len(kept) / len(rows)}


def dragbench_no_move_md(root: Path) -> float:
    """DragBench's mean distance of an edit that moves nothing: the mean handle–target distance
    over every pair of every sample under ``root`` (px of the source images, as MD is measured)."""
    from ..data import find_samples

    dists = []
    for sample in find_samples(root):
        p = np.asarray(sample.load().points, float).reshape(-1, 2)
        dists += list(np.linalg.norm(p[1::2] - p[0::2], axis=1))
    if not dists:
        raise ValueError(f"{root}: no DragBench samples found")
    return float(np.mean(dists))


def md_markdown(ratios: dict, dragbench_no_move: float | None) -> str:
    """The table of ``md_ratio`` per method beside the published DragBench ratio (MD / no-move MD)."""
    lines = ["| method | ToyBench mean distance (px) | ToyBench no-move (px) | ToyBench ratio | objects lost | "
             "DragBench MD (published, px) | DragBench ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m, r in ratios.items():
        pub = PUBLISHED_MD.get(m)
        db = "—" if pub is None or dragbench_no_move is None else f"{100 * pub / dragbench_no_move:.1f} %"
        if r["ratio"] is None:
            toy = "| — | — | — |"
        else:
            toy = f"| {r['md_px']:.2f} | {r['no_move_px']:.2f} | {100 * r['ratio']:.1f} % |"
        lines.append(f"| {m} {toy} {100 * r['lost']:.0f} % | {'—' if pub is None else pub} | {db} |")
    return "\n".join(lines) + "\n"


def _sign_test_p(k: int, n: int) -> float:
    """Two-sided exact binomial p of ``k`` successes in ``n`` fair trials (1.0 when n = 0)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(per_task_a: dict, per_task_b: dict, n_boot: int = 10000, seed: int = 0) -> dict:
    """B against A on the tasks both ran: {"tasks", "median_a", "median_b", "median_diff" (B − A,
    fractions of the drag), "median_diff_ci" (95 % bootstrap over tasks), "b_better", "b_worse"
    (tasks with a lower / higher relative error), "sign_p", "survival_a", "survival_b",
    "survival_diff" (B − A), "survival_diff_ci", "a_only", "b_only" (tasks only one survived)}.
    A vanished object's infinite error counts as the largest (the medians stay defined)."""
    names = sorted(set(per_task_a) & set(per_task_b))
    ra = np.array([per_task_a[k]["rel_error"] for k in names], float)
    rb = np.array([per_task_b[k]["rel_error"] for k in names], float)
    sa = np.array([bool(per_task_a[k]["survived"]) for k in names])
    sb = np.array([bool(per_task_b[k]["survived"]) for k in names])
    both = np.isfinite(ra) & np.isfinite(rb)
    d = (rb - ra)[both]
    # a vanished object's error ranks above every measured one (keeps the differences finite)
    ra, rb = np.where(np.isfinite(ra), ra, 1e9), np.where(np.isfinite(rb), rb, 1e9)
    better, worse = int(np.sum(d < 0)), int(np.sum(d > 0))
    idx = np.random.default_rng(seed).integers(0, len(names), (n_boot, len(names)))
    med = np.median(rb[idx], axis=1) - np.median(ra[idx], axis=1)
    surv = sb[idx].mean(axis=1) - sa[idx].mean(axis=1)
    return {"tasks": len(names), "median_a": float(np.median(ra)), "median_b": float(np.median(rb)),
            "median_diff": float(np.median(rb) - np.median(ra)),
            "median_diff_ci": [float(np.percentile(med, 2.5)), float(np.percentile(med, 97.5))],
            "b_better": better, "b_worse": worse, "sign_p": _sign_test_p(better, better + worse),
            "survival_a": float(sa.mean()), "survival_b": float(sb.mean()),
            "survival_diff": float(sb.mean() - sa.mean()),
            "survival_diff_ci": [float(np.percentile(surv, 2.5)), float(np.percentile(surv, 97.5))],
            "a_only": int(np.sum(sa & ~sb)), "b_only": int(np.sum(sb & ~sa))}


def paired_markdown(a: str, b: str, r: dict) -> str:
    """One paragraph stating ``paired``'s result of B against A."""
    lo, hi = r["median_diff_ci"]
    slo, shi = r["survival_diff_ci"]
    return (f"{b} against {a}, {r['tasks']} tasks: median error {100 * r['median_b']:.1f} % against "
            f"{100 * r['median_a']:.1f} % of the drag, difference {100 * r['median_diff']:+.1f} points "
            f"(95 % bootstrap {100 * lo:+.1f} .. {100 * hi:+.1f}); {b} better on {r['b_better']} tasks, worse on "
            f"{r['b_worse']} (sign test p = {r['sign_p']:.3f}); survival {100 * r['survival_b']:.0f} % against "
            f"{100 * r['survival_a']:.0f} % ({100 * r['survival_diff']:+.0f} points, 95 % bootstrap "
            f"{100 * slo:+.0f} .. {100 * shi:+.0f}; only {a} on {r['a_only']} tasks, only {b} on {r['b_only']}).\n")


def breakdown(per_task: dict, run_dir: Path | None = None) -> dict:
    """{"all", "reached", "capped", "by_length": {"lo–hi px": …}, "by_kind": {…}} of one method."""
    rows = objects(per_task, run_dir)
    out = {"all": _summary(rows),
           "reached": _summary([r for r in rows if r["reached"]]),
           "capped": _summary([r for r in rows if not r["reached"]]),
           "by_length": {}, "by_kind": {}}
    for lo, hi in LENGTH_BINS:
        name = f"{lo:g}–{hi:g} px" if hi < 1e9 else f"≥ {lo:g} px"
        out["by_length"][name] = _summary([r for r in rows if lo <= r["length"] < hi])
    for kind in dict.fromkeys(r["kind"] for r in rows):
        out["by_kind"][kind] = _summary([r for r in rows if r["kind"] == kind])
    out["reached_share"] = float(np.mean([r["reached"] for r in rows])) if rows else 0.0
    return out


def markdown(result: dict) -> str:
    def pct(v):
        return "—" if v is None else f"{100 * v:.1f} %"

    lines = ["| method | objects | group | median error / drag | median fraction moved | median fraction tracked | ≤ 25 % | lost | mean iterations | iterations per tracked sup px |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, b in result.items():
        groups = [("all", b["all"]), (f"tracking reached ({pct(b['reached_share'])} of objects)", b["reached"]),
                  ("ran into the iteration cap", b["capped"])]
        groups += [(f"drag {k}", v) for k, v in b["by_length"].items()]
        groups += [(k, v) for k, v in b["by_kind"].items()]
        for name, s in groups:
            if not s.get("objects"):
                continue
            lines.append(f"| {method} | {s['objects']} | {name} | {pct(s['median_rel_error'])} | "
                         f"{pct(s['median_fraction'])} | {pct(s.get('median_tracked'))} | {pct(s['within_25'])} | "
                         f"{s['lost']} | {s['mean_iterations']:.1f} | "
                         f"{'—' if s.get('median_iters_per_sup_px') is None else format(s['median_iters_per_sup_px'], '.1f')} |")
    return "\n".join(lines) + "\n"


def plot(per_method: dict, path: Path) -> Path:
    """Error / drag against drag length, one panel per method, reached (o) and capped (x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_method)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], names):
        rows = objects(per_method[m])
        for reached, marker, label in ((True, "o", "tracking reached"), (False, "x", "iteration cap")):
            sel = [r for r in rows if r["reached"] == reached]
            ax.scatter([r["length"] for r in sel], [100 * r["rel_error"] for r in sel], marker=marker, label=label,
                       alpha=0.75)
        ax.axhline(25, color="gray", lw=0.8, ls="--")
        ax.set_title(m)
        ax.set_xlabel("drag length (px)")
    axes[0][0].set_ylabel("displacement error / drag (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxdrag.toy.breakdown", description=__doc__.split("\n\n")[0])
    ap.add_argument("toybench_json", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--methods", default=None, help="comma-separated (default: every method of the run)")
    ap.add_argument("--dragbench", type=Path, default=None,
                    help="DragBench folder: compute its no-move mean distance for the published ratios")
    ap.add_argument("--paired", default=None, metavar="A,B",
                    help="compare method B with method A task by task (e.g. dragdiffusion,dragtext)")
    args = ap.parse_args(argv)
    run = json.loads(args.toybench_json.read_text())
    per_method = run["per_task"]
    pair = None
    if args.paired:
        pair = args.paired.split(",")
        missing = [m for m in pair if m not in run["per_task"]]
        if len(pair) != 2 or missing:
            raise SystemExit(f"--paired {args.paired}: give two methods of the run "
                             f"({', '.join(sorted(run['per_task']))})")
    if args.methods:
        per_method = {m: per_method[m] for m in args.methods.split(",")}
    out = args.out or args.toybench_json.parent
    out.mkdir(parents=True, exist_ok=True)
    root = args.toybench_json.parent
    result = {m: breakdown(p, root / m if (root / m).is_dir() else None) for m, p in per_method.items()}
    ratios = {m: md_ratio(p) for m, p in per_method.items()}
    no_move = None if args.dragbench is None else dragbench_no_move_md(args.dragbench)
    extra = {}
    text = markdown(result) + "\n" + md_markdown(ratios, no_move)
    if pair:
        pr = paired(run["per_task"][pair[0]], run["per_task"][pair[1]])
        extra["paired"] = {"a": pair[0], "b": pair[1], **pr}
        text += "\n" + paired_markdown(pair[0], pair[1], pr)
    (out / "breakdown.json").write_text(json.dumps(
        {**result, "md_ratio": ratios, "dragbench_no_move_md": no_move, **extra}, indent=1))
    (out / "breakdown.md").write_text(text)
    plot(per_method, out / "breakdown.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
