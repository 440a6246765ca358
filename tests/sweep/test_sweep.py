"""Sweeps: the grid checked before any work, every grid point equal to the same edit run alone,
the LoRA trained once per sample, a rerun computing only what is missing, the table's numbers.

The edits use the suite's standard setting (96×128, dragtext, 4 LoRA steps, 4 iterations, two
pairs, batches of 4 and 1): the programs test_errors.py and test_pipeline.py compile."""

import copy
import json
import shutil

import numpy as np
import pytest

import jaxdrag
from jaxdrag import EditRequest, EditSettings, LoRASettings
from jaxdrag.cli import main
from jaxdrag.errors import SettingsError
from jaxdrag.sweep import Item, grid, sweep, table

FAST = EditSettings(lora=LoRASettings(steps=4))
BASE = {"max_iters": 4}


def _img(h=96, w=128, seed=0):
    y, x = np.mgrid[0:h, 0:w]
    r = np.random.default_rng(seed)
    return np.clip(np.stack([x * 2.0, y * 2.5, r.uniform(0, 255, (h, w))], -1), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("spec, message", [
    (["foo=1,2"], "--grid foo: unknown setting"),
    (["fuse_weight=0.5,0.7"], "--grid fuse_weight: not read by method 'dragtext'"),
    (["text_lam=-1,0"], "--grid text_lam: setting text_lam = -1.0: must be ≥ 0"),
    (["text_lam=a"], "--grid text_lam='a': expected a float value"),
    (["text_lam=0.1,0.1"], "--grid text_lam: repeated value"),
    (["text_lam=0.1", "text_lam=1"], "--grid text_lam: given twice"),
    (["max_iters=0,4"], "--grid max_iters: setting max_iters = 0: must be > 0"),
    (["text_lam"], "expected NAME=v1,v2"),
])
def test_a_bad_grid_is_one_line_before_any_work(spec, message):
    with pytest.raises(SettingsError, match=None) as e:
        grid.parse_grid("dragtext", spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_cli_refuses_a_swept_setting_given_twice(capsys, tmp_path):
    rc = main(["sweep", "toybench", "--method", "dragtext", "--grid", "text_lam=0,1", "--text-lam", "0.5",
               "--out", str(tmp_path / "s"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "error: --grid text_lam: also given as a fixed option; give it once"
    assert not (tmp_path / "s").exists()


def test_grid_product_random_and_split():
    g = grid.parse_grid("dragtext", ["text_lam=0,0.1,10", "max_iters=4,8", "lora_steps=2"])
    pts = grid.product(g)
    assert len(pts) == 6 and pts[1] == {"text_lam": 0.0, "max_iters": 8, "lora_steps": 2}
    assert grid.split(pts[1]) == ({"text_lam": 0.0}, {"max_iters": 8}, {"lora_steps": 2})
    assert grid.defaults("dragtext", ["text_lam", "max_iters", "lora_steps"]) == \
        {"text_lam": 0.1, "max_iters": 80, "lora_steps": 80}
    r = grid.random_points(grid.parse_ranges("dragdiffusion", ["latent_lr=0.001:0.1:log", "max_iters=10:20"]),
                           50, seed=1)
    lr = np.array([p["latent_lr"] for p in r])
    assert len(r) == 50 and lr.min() >= 0.001 and lr.max() <= 0.1 and all(10 <= p["max_iters"] <= 20 for p in r)
    assert 0.2 < np.mean(lr < 0.01) < 0.8  # log-uniform: about half below the geometric middle
    assert r == grid.random_points(grid.parse_ranges("dragdiffusion", ["latent_lr=0.001:0.1:log",
                                                                       "max_iters=10:20"]), 50, seed=1)


def test_table_stats_pareto_by_hand():
    s = table.stats([1.0, 2.0, 3.0, float("inf")])
    assert s["mean"] == 2.0 and s["median"] == 2.5 and s["n"] == 4 and s["n_inf"] == 1
    lo, hi = s["ci95"]
    assert 1.0 <= lo < 2.0 < hi <= 3.0
    assert table.bootstrap_ci(np.array([5.0])) == (5.0, 5.0)
    # minimise x, maximise y: (1, 1) and (2, 3) and (4, 4) are the front; (3, 2) is beaten by (2, 3)
    assert table.pareto([1, 2, 3, 4], [1, 3, 2, 4]) == [0, 1, 3]


def test_sweep_points_equal_edits_alone_one_lora_per_sample_and_resume(tiny_pipe, tmp_path):
    pipe = copy.copy(tiny_pipe)  # its own LoRA cache and counters; the compiled programs shared
    pipe.lora_cache, pipe.loras_trained, pipe.inversions_run = None, 0, 0
    items = [Item("s0", EditRequest(_img(seed=1), [(30, 40), (50, 45), (80, 60), (70, 50)], "a gradient", seed=0)),
             Item("s1", EditRequest(_img(seed=2), [(20, 20), (30, 35), (100, 70), (90, 60)], "noise", seed=0))]
    points = grid.product(grid.parse_grid("dragtext", ["text_lam=0,1", "latent_lr=0.01,0.03"]))
    out = tmp_path / "sweep"
    res = sweep(pipe, items, "dragtext", points, out, dataset="test", settings=FAST, batch_size=4, base=BASE,
                log=lambda s: None)
    cost = res["cost"]
    assert cost["edits_run"] == 8 and cost["loras_trained"] == 2  # N LoRAs, N × G drags
    assert cost["inversions_run"] == 2  # and N inversions: a sample's grid points share it in the batch
    assert len(cost["groups"]) == 1 and cost["groups"][0]["points"] == 4
    tab = json.loads((out / "table.json").read_text())
    assert [e["label"] for e in tab["points"]] == ["text_lam=0,latent_lr=0.01", "text_lam=0,latent_lr=0.03",
                                                   "text_lam=1,latent_lr=0.01", "text_lam=1,latent_lr=0.03"]
    assert all(e["samples"] == 2 and e["metrics"]["iterations"]["n"] == 2 for e in tab["points"])
    assert not any(e["is_default"] for e in tab["points"])  # the default (0.1, 0.01) is not in this grid
    assert {"metric_vs_text_lam.png", "metric_vs_latent_lr.png", "strip.png"} <= {p.name for p in out.iterdir()}
    # a grid point equals the edit run alone with that setting
    for k in (1, 2):
        alone = jaxdrag.edit_batch(pipe, [items[0].request], "dragtext", settings=FAST, max_iters=4,
                                   **points[k])[0]
        rep = json.loads((out / "points" / f"p{k:03d}" / "s0" / "report.json").read_text())
        assert rep["iterations"] == alone.iterations
        np.testing.assert_allclose(np.asarray(rep["final_handles"]), alone.handles.round(3), atol=1e-6)
        from PIL import Image
        img = np.asarray(Image.open(out / "points" / f"p{k:03d}" / "s0" / "edited.png"))
        assert np.abs(img.astype(int) - alone.image.astype(int)).max() <= 1
    # interrupted: one edit lost; the rerun computes it alone, with the cached LoRA
    shutil.rmtree(out / "points" / "p002" / "s1")
    again = sweep(pipe, items, "dragtext", points, out, dataset="test", settings=FAST, batch_size=4, base=BASE,
                  log=lambda s: None)
    assert again["cost"]["edits_run"] == 1 and again["cost"]["loras_trained"] == 0
    assert again["cost"]["inversions_run"] == 0  # the sample's inversion is reused too
    # another grid in the same folder is refused
    with pytest.raises(SettingsError, match="holds a sweep of another"):
        sweep(pipe, items, "dragtext", points[:2], out, dataset="test", settings=FAST, base=BASE, log=lambda s: None)
