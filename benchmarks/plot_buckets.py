"""The per-shape vs buckets DragBench comparison as a figure (headless matplotlib):

    python benchmarks/plot_buckets.py benchmarks/results/dragbench_buckets_tiny_cpu_2026-12-01.json \\
        benchmarks/dragbench_buckets.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    rep = json.load(open(src))
    modes = rep["modes"]
    names = list(modes)
    stages = list(modes[names[0]]["compile_s_per_stage"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    labels = {"exact": "per shape (exact)", "auto": "buckets (auto)"}
    ax = axes[0]
    ax.bar([labels.get(m, m) for m in names], [modes[m]["programs"] for m in names], color=["#999", "#2a7"])
    ax.set_title("programs compiled")
    ax = axes[1]
    bottom = [0.0] * len(names)
    for st in stages:
        vals = [modes[m]["compile_s_per_stage"].get(st, 0.0) for m in names]
        ax.bar([labels.get(m, m) for m in names], vals, bottom=bottom, label=st)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_title("compile seconds summed, by stage")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[2]
    ax.bar([labels.get(m, m) for m in names], [modes[m]["wall_s"] for m in names], color=["#999", "#2a7"])
    ax.set_title("wall time of the run (s)")
    c = rep.get("comparison", {})
    fig.suptitle(f"{modes[names[0]]['samples']} DragBench samples of {modes[names[0]]['working_shapes']} sizes, "
                 f"tiny model, 2-core CPU — {c.get('programs_ratio')}× fewer programs, {c.get('wall_ratio')}× "
                 f"faster; results: iterations equal {c.get('iterations_equal')}/{c.get('edits')}, "
                 f"largest image difference {c.get('max_grey_level_diff')} grey levels"
                 + ("" if c.get("edits_within_1") is None else f" ({c['edits_within_1']}/{c['edits']} within 1)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
