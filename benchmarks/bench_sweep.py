"""A sweep against separate runs, side by side in one session: G values of one setting over N
samples as one ``jaxdrag sweep`` (N LoRAs, N × G drags in shared batches) and as G ``jaxdrag run``
invocations with that setting fixed (G × N LoRAs), same machine, same model, same settings.
Reports each side's wall time (process start to exit, compilation included: each side gets its
own fresh persistent compilation cache, which the later runs of the G then reuse as a user's
would), the LoRAs each trained, and whether the results agree (iteration counts equal, images
within one grey level).

    python benchmarks/bench_sweep.py [--tasks 4] [--values 0,0.1,1,10] [--lora-steps 20] [--max-iters 20]

The samples are ToyBench tasks written in DragBench's layout; the model is the embedded default
(the trained toy model). Writes benchmarks/results/sweep.json."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_dragbench(tasks, root: Path) -> None:
    for t in tasks:
        d = root / "toy" / t.name
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(t.image).save(d / "original_image.png")
        mask = (np.zeros(t.image.shape[:2], np.uint8) if t.mask is None else (np.asarray(t.mask) > 0).astype(np.uint8))
        meta = {"prompt": t.prompt, "points": [list(map(float, p)) for p in t.points], "mask": mask}
        (d / "meta_data.pkl").write_bytes(pickle.dumps(meta))


def timed(cmd: list[str], cache: Path) -> float:
    env = {**os.environ, "JAXDRAG_CACHE_DIR": str(cache)}
    env.pop("JAXDRAG_COMPILE_CACHE", None)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--method", default="dragtext")
    ap.add_argument("--setting", default="text_lam")
    ap.add_argument("--values", default="0,0.1,1,10")
    ap.add_argument("--lora-steps", type=int, default=20)
    ap.add_argument("--max-iters", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    from jaxdrag.toy import bench

    values = [v for v in args.values.split(",") if v]
    common = ["--method", args.method, "--lora-steps", str(args.lora_steps), "--max-iters", str(args.max_iters),
              "--batch-size", str(args.batch_size), "--quiet"]
    exe = [sys.executable, "-m", "jaxdrag.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        write_dragbench(bench.make_tasks(args.tasks), data)
        runs_wall = []
        for v in values:
            runs_wall.append(timed(exe + ["run", str(data), "--out", str(tmp / f"run_{v}"),
                                          f"--{args.setting.replace('_', '-')}", v] + common, tmp / "cache_runs"))
        sweep_wall = timed(exe + ["sweep", str(data), "--grid", f"{args.setting}={','.join(values)}",
                                  "--out", str(tmp / "sweep")] + common, tmp / "cache_sweep")
        tab = json.loads((tmp / "sweep" / "table.json").read_text())
        ids = {float(e["point"][args.setting]): e["id"] for e in tab["points"]}
        diffs, iters_equal, n = [], 0, 0
        for v in values:
            for sdir in sorted((tmp / f"run_{v}").glob("toy/*")):
                name = f"toy/{sdir.name}"
                a = np.asarray(Image.open(sdir / "edited.png"), int)
                sw = tmp / "sweep" / "points" / ids[float(v)] / name
                b = np.asarray(Image.open(sw / "edited.png"), int)
                diffs.append(int(np.abs(a - b).max()))
                ra = json.loads((sdir / "report.json").read_text())
                rb = json.loads((sw / "report.json").read_text())
                iters_equal += ra["iterations"] == rb["iterations"]
                n += 1
        res = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", "benchmarks/bench_sweep.py"] + sys.argv[1:]),
               "method": args.method, "setting": args.setting, "values": values, "samples": args.tasks,
               "lora_steps": args.lora_steps, "max_iters": args.max_iters,
               "runs_wall_s": [round(w, 1) for w in runs_wall], "runs_total_s": round(sum(runs_wall), 1),
               "sweep_wall_s": round(sweep_wall, 1), "speedup": round(sum(runs_wall) / sweep_wall, 2),
               "loras": {"runs": len(values) * args.tasks, "sweep": tab["cost"]["loras_trained"]},
               "edits_compared": n, "iterations_equal": iters_equal, "max_grey_level_difference": max(diffs)}
    out = ROOT / "benchmarks" / "results" / "sweep.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
