"""``jaxdrag.toy.breakdown`` on a constructed run: the fractions moved and tracked, the reached /
capped split, the iterations per tracked supervision pixel, the files written."""

import json

import numpy as np
import pytest

from jaxdrag.toy import breakdown


def _run(tmp_path):
    per_task = {
        "a": {"name": "a", "kind": "single", "reached": True, "iterations": 20,
              "objects": [{"drag": [10, 0], "moved": [8, 1], "rel_error": float(np.hypot(2, 1) / 10),
                           "survived": True}]},
        "b": {"name": "b", "kind": "single", "reached": False, "iterations": 80,
              "objects": [{"drag": [0, 20], "moved": [0, 5], "rel_error": 0.75, "survived": True}]},
        "c": {"name": "c", "kind": "two-objects", "reached": False, "iterations": 80,
              "objects": [{"drag": [0, 20], "moved": [float("nan")] * 2, "rel_error": 1.0, "survived": False}]},
    }
    reports = {"a": ([[10, 10]], [[20, 10]], [[20, 10]], 20), "b": ([[0, 0]], [[0, 20]], [[0, 8]], 80),
               "c": ([[0, 0]], [[0, 20]], [[0, 0]], 80)}
    for name, (h0, tg, h1, it) in reports.items():
        d = tmp_path / "dragdiffusion" / name
        d.mkdir(parents=True)
        (d / "report.json").write_text(json.dumps({"points": {"initial_handles": h0, "targets": tg},
                                                   "final_handles": h1, "iterations": it}))
    (tmp_path / "toybench.json").write_text(json.dumps({"per_task": {"dragdiffusion": per_task}}))
    return per_task


def test_fractions_split_and_speed(tmp_path):
    per_task = _run(tmp_path)
    rows = {r["task"]: r for r in breakdown.objects(per_task, tmp_path / "dragdiffusion")}
    assert rows["a"]["fraction"] == 0.8 and rows["b"]["fraction"] == 0.25 and np.isnan(rows["c"]["fraction"])
    assert rows["a"]["tracked"] == 1.0 and rows["b"]["tracked"] == 0.4 and rows["c"]["tracked"] == 0.0
    # a: 10 px = 5 sup px in 20 iterations; b: 8 px = 4 sup px in 80; c: never moved
    assert rows["a"]["iters_per_sup_px"] == 4.0 and rows["b"]["iters_per_sup_px"] == 20.0
    assert rows["c"]["iters_per_sup_px"] == float("inf")
    b = breakdown.breakdown(per_task, tmp_path / "dragdiffusion")
    assert b["reached"]["objects"] == 1 and b["capped"]["objects"] == 2 and b["capped"]["lost"] == 1
    assert b["all"]["median_fraction"] == (0.8 + 0.25) / 2 and b["all"]["within_25"] == 1 / 3
    assert b["capped"]["median_iters_per_sup_px"] == 20.0  # the infinite one left out
    assert b["by_length"]["0–12 px"]["objects"] == 1 and b["by_length"]["≥ 20 px"]["objects"] == 2
    assert abs(b["reached_share"] - 1 / 3) < 1e-12


def test_command_writes_table_and_plot(tmp_path):
    _run(tmp_path)
    assert breakdown.main([str(tmp_path / "toybench.json"), "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "breakdown.md").read_text()
    assert "| dragdiffusion | 2 | ran into the iteration cap | 87.5 % | 25.0 % | 20.0 % |" in md
    from PIL import Image

    assert Image.open(tmp_path / "o" / "breakdown.png").size[0] > 300


def test_md_ratio_is_dragbench_statistic(tmp_path):
    """a: |(8, 1) − (10, 0)| = √5 for a 10-px drag; b: 15 px of 20; c lost (left out, counted)."""
    per_task = _run(tmp_path)
    r = breakdown.md_ratio(per_task)
    assert abs(r["md_px"] - (np.sqrt(5) + 15) / 2) < 1e-9 and r["no_move_px"] == 15.0
    assert abs(r["ratio"] - (np.sqrt(5) + 15) / 30) < 1e-9 and abs(r["lost"] - 1 / 3) < 1e-12
    md = breakdown.md_markdown({"dragdiffusion": r}, dragbench_no_move=52.27)
    # the published DragBench MD of DragDiffusion (33.21 px) over DragBench's no-move 52.27 px
    assert f"| dragdiffusion | {r['md_px']:.2f} | 15.00 | 57.5 % | 33 % | 33.21 | 63.5 % |" in md


def test_paired_comparison_on_hand_made_tasks():
    """B beats A on 1 task of 4 and loses on 2 (one tie); the medians, counts, the exact sign-test p
    (two-sided, 1 of 3: p = 2 · 4/8 → 1.0) and the survival split are the hand-computed ones; a
    vanished object (infinite error) is left out of the task counts, not of the medians."""
    a = {"t0": {"rel_error": 0.2, "survived": True}, "t1": {"rel_error": 0.4, "survived": True},
         "t2": {"rel_error": 0.6, "survived": True}, "t3": {"rel_error": 0.5, "survived": False},
         "t4": {"rel_error": float("inf"), "survived": False}}
    b = {"t0": {"rel_error": 0.1, "survived": True}, "t1": {"rel_error": 0.5, "survived": False},
         "t2": {"rel_error": 0.7, "survived": True}, "t3": {"rel_error": 0.5, "survived": True},
         "t4": {"rel_error": 0.9, "survived": True}, "only_b": {"rel_error": 0.0, "survived": True}}
    r = breakdown.paired(a, b, n_boot=2000)
    assert r["tasks"] == 5
    assert r["median_a"] == 0.5 and r["median_b"] == 0.5 and r["median_diff"] == 0.0
    assert (r["b_better"], r["b_worse"]) == (1, 2)
    assert r["sign_p"] == 1.0 and breakdown._sign_test_p(0, 10) == 2 / 1024
    assert r["survival_a"] == 0.6 and r["survival_b"] == 0.8 and abs(r["survival_diff"] - 0.2) < 1e-12
    assert (r["a_only"], r["b_only"]) == (1, 2)
    lo, hi = r["median_diff_ci"]
    assert lo <= 0.0 <= hi
    text = breakdown.paired_markdown("a", "b", r)
    assert "+0.0 points" in text and "better on 1 tasks, worse on 2" in text


def test_paired_option_names_a_missing_method(tmp_path):
    _run(tmp_path)
    with pytest.raises(SystemExit, match="--paired dragdiffusion,dragtext: give two methods of the run"):
        breakdown.main([str(tmp_path / "toybench.json"), "--paired", "dragdiffusion,dragtext"])
