"""ToyBench's runner (batched, resumable, one LoRA per task shared by the methods) and the
``toybench`` command, on the tiny random-weight model; the pipeline's LoRA cache."""

import json

import numpy as np
import pytest

import jaxdrag
from jaxdrag import EditSettings, LoRASettings
from jaxdrag.cli import main
from jaxdrag.toy import bench, runner

FAST = EditSettings(lora=LoRASettings(steps=4))
ITERS = 3  # all tests here share this and FAST, so the compiled programs are shared


@pytest.mark.slow  # the runner's resume; test_toybench_command covers the runner in CI; ≈ 180 s on 2 cores (run with -m slow)
def test_runner_writes_resumes_and_shares_loras(tiny_pipe, tmp_path):
    tiny_pipe.lora_cache = None
    tasks = bench.make_tasks(3)
    logs = []
    rows = runner.run(tiny_pipe, ["dragdiffusion", "dragtext"], tmp_path, tasks=tasks, batch_size=2,
                      settings=FAST, overrides={"max_iters": ITERS}, progress=False, log=logs.append)
    assert set(rows) == {"dragdiffusion", "dragtext"} and rows["dragtext"]["tasks"] == 3
    for m in ("dragdiffusion", "dragtext"):
        for t in tasks:
            d = tmp_path / m / t.name
            assert {"edited.png", "overlay.png", "report.json", "metrics.json"} <= {p.name for p in d.iterdir()}
            met = json.loads((d / "metrics.json").read_text())
            assert met["name"] == t.name and len(met["objects"]) == len(t.moves)
            assert 0 <= met["iterations"] <= 3
    # the second method reused the first one's LoRAs: no LoRA training time, same LoRA loss
    r1 = json.loads((tmp_path / "dragdiffusion" / tasks[0].name / "report.json").read_text())
    r2 = json.loads((tmp_path / "dragtext" / tasks[0].name / "report.json").read_text())
    assert r2["timings_s"]["lora"] == 0.0 and r1["timings_s"]["lora"] > 0
    assert r1["config"]["lora_final_loss"] == r2["config"]["lora_final_loss"]
    table = (tmp_path / "toybench.md").read_text()
    assert "| dragdiffusion | 3 |" in table and "| dragtext | 3 |" in table
    # resume: nothing left to run, same table
    logs.clear()
    again = runner.run(tiny_pipe, ["dragdiffusion", "dragtext"], tmp_path, tasks=tasks, batch_size=2,
                       settings=FAST, overrides={"max_iters": ITERS}, progress=False, log=logs.append)
    assert any("3 done, 0 to run" in s for s in logs)
    assert again["dragtext"]["median_error_px"] == rows["dragtext"]["median_error_px"]
    tiny_pipe.lora_cache = None


def test_lora_cache_reuses_and_reproduces(tiny_pipe):
    img = bench.make_tasks(1)[0].image
    tiny_pipe.enable_lora_cache()
    kw = dict(settings=FAST, max_iters=ITERS, method="dragdiffusion")
    a = jaxdrag.edit(tiny_pipe, img, [(30, 30), (40, 30)], "a scene", **kw)
    b = jaxdrag.edit(tiny_pipe, img, [(30, 30), (40, 30)], "a scene", **kw)
    c = jaxdrag.edit(tiny_pipe, img, [(30, 30), (40, 30)], "another prompt", **kw)
    tiny_pipe.lora_cache = None
    assert b.timings["lora"] == 0.0 and c.timings["lora"] > 0
    np.testing.assert_array_equal(a.image, b.image)


def test_toybench_command(tiny_models, tmp_path, capsys):
    sd, clip = tiny_models
    common = ["--batch-size", "2", "--lora-steps", "4", "--quiet", "--model", str(sd), "--clip", str(clip),
              "--no-compile-cache"]
    # each method gets the settings it reads: max_iters → dragdiffusion, the GoodDrag schedule → gooddrag
    rc = main(["toybench", "--out", str(tmp_path / "tb"), "--tasks", "2", "--methods", "dragdiffusion,gooddrag",
               "--max-iters", "3", "--drag-end-step", "1", "--track-per-step", "1"] + common)
    assert rc == 0
    out = capsys.readouterr().out
    assert "| dragdiffusion | 2 |" in out and "| gooddrag | 2 |" in out
    summary = json.loads((tmp_path / "tb" / "toybench.json").read_text())
    assert summary["tasks"] == 2 and summary["overrides"] == {"max_iters": 3, "drag_end_step": 1, "track_per_step": 1}
    assert [len(summary["per_task"][m]) for m in ("dragdiffusion", "gooddrag")] == [2, 2]
    reps = {m: json.loads(next((tmp_path / "tb" / m).glob("*/report.json")).read_text()) for m in summary["methods"]}
    assert reps["dragdiffusion"]["config"]["drag"]["max_iters"] == 3 and reps["dragdiffusion"]["iterations"] <= 3
    assert reps["gooddrag"]["config"]["drag"]["track_per_step"] == 1 and reps["gooddrag"]["iterations"] <= 3
    rc = main(["toybench", "--out", str(tmp_path / "tb2"), "--methods", "dragdiffusion", "--l-expected", "2"] + common)
    assert rc == 2 and "drag setting(s) ['l_expected'] are read by none of the methods dragdiffusion" in \
        capsys.readouterr().err
