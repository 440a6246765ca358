"""Several devices and several processes (slow: each runs fresh processes that compile every stage;
``python -m pytest -m slow tests/pipeline/test_devices.py``, ~5 min on 2 cores).

- four host CPU devices (``--xla_force_host_platform_device_count=4``): a batch of four edits
  spread with ``shard_map`` (one edit and one drag ``while_loop`` per device) gives the results of
  the single-device run, for DragText and the GoodDrag, FreeDrag and DragNoise hosts;
- ``jaxdrag run --distributed``: two local processes split a dataset and together write every
  result exactly once, and process 0 writes the merged summary."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import dragbench_sample

pytestmark = pytest.mark.slow

MULTI = r'''
import json, sys
import numpy as np
import jaxdrag
from jaxdrag import EditRequest, EditSettings, LoRASettings
pipe = jaxdrag.load_pipeline(sys.argv[1], dtype="float32")
rs = np.random.RandomState(0)
reqs = [EditRequest((rs.rand(48, 64, 3) * 255).astype(np.uint8), [(10 + 3 * i, 20), (20 + 3 * i, 26)], "x",
                    name=f"e{i}", seed=i) for i in range(4)]
st = EditSettings(lora=LoRASettings(steps=2, chunk=2), width=0, batch_size=4)
out = {}
for label, devices in (("one", []), ("four", None)):
    n = pipe.use_devices(devices)
    res = jaxdrag.edit_batch(pipe, reqs, sys.argv[2], settings=st, **json.loads(sys.argv[3]))
    out[label] = {"n": n, "handles": [r.handles.tolist() for r in res], "iters": [r.iterations for r in res],
                  "images": [r.image.astype(int).tolist() for r in res]}
print(json.dumps(out))
'''


def _env(**extra):
    env = dict(os.environ, JAXDRAG_COMPILE_CACHE="0", **extra)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("method", ["dragtext", "gooddrag+dragtext", "freedrag+dragtext", "dragnoise"])
def test_four_devices_equal_one(tiny_models, method):
    import numpy as np

    from helpers import short_run

    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    p = subprocess.run([sys.executable, "-c", MULTI, str(tiny_models[0]), method, json.dumps(short_run(method, 3))],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["one"]["n"] == 1 and out["four"]["n"] == 4
    assert out["one"]["handles"] == out["four"]["handles"] and out["one"]["iters"] == out["four"]["iters"]
    diff = np.abs(np.asarray(out["one"]["images"]) - np.asarray(out["four"]["images"])).max()
    assert diff <= 1, diff  # batch 4 on one device vs batch 1 per device: float rounding only


def _split_run(model, data, out, *extra):
    """start(i): process i of 2 of ``jaxdrag run --distributed`` on the tiny model (a free port)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]

    def start(i):
        return subprocess.Popen([sys.executable, "-m", "jaxdrag.cli", "run", str(data), "--out", str(out),
                                 "--model", str(model), "--method", "dragdiffusion", "--lora-steps", "2",
                                 "--max-iters", "2", "--quiet", "--distributed", "--coordinator", f"localhost:{port}",
                                 "--num-processes", "2", "--process-id", str(i), *extra],
                                env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return start


def test_two_processes_split_a_dataset(tiny_models, tmp_path):
    data, out = tmp_path / "bench", tmp_path / "out"
    for i in range(5):
        dragbench_sample(data / "cat" / f"s{i}", i)
    start = _split_run(tiny_models[0], data, out)
    procs = [start(i) for i in range(2)]
    logs = [p.communicate(timeout=1200) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in logs]
    summary = json.loads((out / "summary.json").read_text())
    ran = [set(p["ran"]) for p in summary["processes"]]
    assert ran[0] == {"cat/s0", "cat/s2", "cat/s4"} and ran[1] == {"cat/s1", "cat/s3"}
    assert summary["total"] == 5 and summary["done"] == 5 and not summary["failed"]
    for i in range(5):
        assert json.loads((out / "cat" / f"s{i}" / "report.json").read_text())["name"] == f"cat/s{i}"
    assert "process 1 of 2: 2 of the 5 samples" in logs[1][1]


def test_a_killed_peer_is_named_and_a_rerun_completes(tiny_models, tmp_path):
    """Two processes; process 1 is killed after its first result. Process 0 finishes its share,
    declares process 1 lost within --peer-timeout of its last heartbeat, writes the summary of
    what finished with the missing samples named, exits 1; a rerun completes the missing ones."""
    import time

    data, out = tmp_path / "bench", tmp_path / "out"
    for i in range(6):
        dragbench_sample(data / "cat" / f"s{i}", i)
    start = _split_run(tiny_models[0], data, out, "--batch-size", "1", "--peer-timeout", "15")

    p0, p1 = start(0), start(1)
    deadline = time.monotonic() + 900
    while not (out / "cat" / "s1" / "report.json").exists():  # process 1's first sample
        assert time.monotonic() < deadline and p1.poll() is None
        time.sleep(0.2)
    p1.kill()
    killed_at = time.monotonic()
    _, err0 = p0.communicate(timeout=900)
    p1.communicate()
    assert p0.returncode == 1, err0[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    lost = summary["lost_processes"]["1"]
    assert "cat/s1" in lost["finished"] and 15 <= lost["silent_s"] < 60
    assert set(summary["missing"]) == {"cat/s3", "cat/s5"} - set(lost["finished"])
    assert summary["missing"] and summary["done"] == 6 - len(summary["missing"])
    assert "lost process(es) 1" in err0 and "rerun the same command" in err0
    waited = time.monotonic() - killed_at
    assert waited < 15 + 120  # bounded, not the old seven days
    print(f"\nkilled peer: process 0 exited {waited:.1f} s after the kill; summary done {summary['done']}, "
          f"missing {summary['missing']}, lost {lost}, waited_for_peers_s {summary['waited_for_peers_s']}")
    # the rerun does only what is missing
    p0, p1 = start(0), start(1)
    logs = [p.communicate(timeout=900) for p in (p0, p1)]
    assert p0.returncode == 0 and p1.returncode == 0, [e[-2000:] for _, e in logs]
    assert "3 samples, 3 already done, 0 to run" in logs[0][1]
    print("rerun:", [l for _, e in logs for l in e.splitlines() if "already done" in l])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 6 and not summary["missing"] and not summary["lost_processes"]
    for i in range(6):
        assert (out / "cat" / f"s{i}" / "edited.png").exists()
