"""A whole DragBench run, compilation included, on random weights of the exact architecture (no
weight download): every sample through ``edit_batch`` as ``jaxdrag run`` groups it — one group per
working shape (``--buckets exact``) and/or a few masked canvases (``--buckets auto``) — side by side
in one process, each mode on a fresh pipeline, compiled ahead in a thread pool
(``--compile-workers``) while earlier groups run. Reports per mode the wall time from the first
compile to the last image, the programs compiled and their compile seconds summed (per stage too),
the batches and edits per batch, the padding waste; with both modes, how the results compare
(iterations and handles identical, the largest image difference in grey levels).

    python benchmarks/dragbench_run.py ../shared/data/DragBench --model tiny --distinct 20 \
        --buckets exact,auto --lora-steps 2 --max-iters 3 --dtype float32         # CPU, 20 sizes
    python benchmarks/dragbench_run.py ../shared/data/DragBench --model sd15 --dtype bfloat16 \
        --batch-size 8 --out results/gpu_dragbench.json                          # GPU: all 205

The defaults are DragText's faithful ones (80 LoRA steps, 80 drag iterations); ``--lora-steps`` and
``--max-iters`` shorten a smoke run. The persistent compilation cache is off (a fresh process
compiles everything, as a first run would) unless ``--cache DIR`` is given."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402

import common  # noqa: E402


def run_mode(args, reqs, mode: str) -> tuple[dict, list]:
    """One mode's run on a fresh pipeline: (report, results)."""
    from jaxdrag import EditSettings, LoRASettings, edit_batch
    from jaxdrag.pipeline.buckets import plan_buckets
    from jaxdrag.pipeline.editing import bucket_step

    t_load = time.perf_counter()
    pipe = common.jax_random_pipeline(args.model, dtype=args.dtype)
    settings = EditSettings(lora=LoRASettings(steps=args.lora_steps), width=args.width, batch_size=args.batch_size,
                            buckets=mode, bucket_waste=args.bucket_waste, max_buckets=args.max_buckets)
    over = {} if args.max_iters is None else {"max_iters": args.max_iters}
    t0 = time.perf_counter()
    if args.compile_only:  # the programs only (SD-1.5's compile seconds per stage on a CPU)
        from jaxdrag.pipeline import compile_for

        rep = compile_for(pipe, reqs, args.method, settings=settings, workers=args.compile_workers, **over)
        rep.update(buckets=mode, samples=len(reqs), compile_s_per_stage={k: round(v, 1) for k, v in
                                                                         pipe.stages.compile_s.items()},
                   programs_per_stage=dict(pipe.stages.compiles))
        print(json.dumps(rep), flush=True)
        return rep, []
    results = edit_batch(pipe, reqs, args.method, settings=settings, compile_workers=args.compile_workers, **over)
    wall = time.perf_counter() - t0
    shapes = [tuple(r.config["working_size"]) for r in results]
    batches = sum(1.0 / r.config["batch_edits"] for r in results)
    canvases = Counter("x".join(map(str, r.config["canvas"] or r.config["working_size"])) for r in results)
    waste = None
    if mode == "auto":
        plan = plan_buckets(shapes, step=bucket_step(pipe), max_waste=args.bucket_waste, max_buckets=args.max_buckets)
        waste = round(plan.waste(shapes), 3)
    rep = {"buckets": mode, "samples": len(reqs), "edits_done": sum(r.image is not None for r in results),
           "working_shapes": len(set(shapes)), "groups": len(canvases), "canvases": dict(canvases),
           "padding_waste": waste, "batches": round(batches, 3), "edits_per_batch": round(len(reqs) / batches, 2),
           "programs": sum(pipe.stages.compiles.values()),
           "compile_s_summed": round(sum(pipe.stages.compile_s.values()), 1),
           "compile_s_per_stage": {k: round(v, 1) for k, v in pipe.stages.compile_s.items()},
           "programs_per_stage": dict(pipe.stages.compiles),
           "wall_s": round(wall, 1), "model_build_s": round(t0 - t_load, 1),
           "s_per_edit": round(wall / max(1, len(reqs)), 2)}
    print(json.dumps(rep), flush=True)
    return rep, results


def compare(a: list, b: list) -> dict:
    """Results of two modes, edit by edit: iterations and handles equal, the image difference."""
    import numpy as np

    same_it = sum(x.iterations == y.iterations for x, y in zip(a, b))
    same_h = sum(bool(np.array_equal(x.handles, y.handles)) for x, y in zip(a, b))
    diffs, worst = [], []
    for x, y in zip(a, b):
        if x.image is None or y.image is None:
            continue
        d = np.abs(x.image.astype(int) - y.image.astype(int)).max(-1)
        diffs.append(int(d.max()))
        if d.max() > 1:  # where an edit differs: which rows and columns, how many pixels
            rows, cols = np.nonzero(d > 1)
            worst.append({"name": x.name, "working_size": x.config["working_size"], "canvas": y.config["canvas"],
                          "image": list(d.shape), "max": int(d.max()), "pixels_over_1": int(len(rows)),
                          "rows": [int(rows.min()), int(rows.max())], "cols": [int(cols.min()), int(cols.max())]})
    return {"edits": len(a), "iterations_equal": same_it, "handles_equal": same_h,
            "max_grey_level_diff": max(diffs), "edits_within_1": sum(v <= 1 for v in diffs), "differing": worst}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--model", default="sd15", choices=list(common.CONFIGS))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--method", default="dragtext")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--distinct", type=int, default=None,
                    help="the first sample of each of the first N distinct working shapes (instead of --limit)")
    ap.add_argument("--shapes", default=None,
                    help="only samples of these working shapes, e.g. 85x128,128x128 (H x W)")
    ap.add_argument("--skip-distinct", type=int, default=0,
                    help="with --distinct: leave out the first N distinct working shapes")
    ap.add_argument("--buckets", default="exact", help="modes to run side by side: exact, auto or exact,auto")
    ap.add_argument("--bucket-waste", type=float, default=0.25)
    ap.add_argument("--max-buckets", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compile-workers", type=int, default=2)
    ap.add_argument("--lora-steps", type=int, default=None)
    ap.add_argument("--max-iters", type=int, default=None)
    ap.add_argument("--width", type=int, default=None, help="working width (default: the model's native size)")
    ap.add_argument("--cache", type=Path, default=None, help="persistent compilation cache folder (default: off)")
    ap.add_argument("--compile-only", action="store_true", help="compile every program, run no edit")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.cache is not None:
        from jaxdrag import xla_cache

        xla_cache.enable(args.cache)
    from jaxdrag.data import find_samples
    from jaxdrag.data.geometry import working_size

    samples = find_samples(args.dataset)
    reqs, seen = [], set()
    for s in samples:
        r = s.load()
        r.seed = 0
        native = common.CONFIGS[args.model][1].sample_size
        shape = working_size(*r.image.shape[:2], args.width or native)
        if args.shapes is not None and "x".join(map(str, shape)) not in args.shapes.split(","):
            continue
        if args.distinct is not None:
            if shape in seen:
                continue
            seen.add(shape)
            if len(seen) <= args.skip_distinct:
                continue
        reqs.append(r)
        if len(reqs) == (args.distinct or args.limit or len(samples) + 1):
            break
    modes = [m.strip() for m in args.buckets.split(",")]
    rep = {"device": common.device_info(), "jax_devices": [d.device_kind for d in jax.devices()],
           "model": args.model, "method": args.method, "batch_size": args.batch_size,
           "compile_workers": args.compile_workers, "command": " ".join(sys.argv), "modes": {}}
    outs = {}
    for m in modes:
        rep["modes"][m], outs[m] = run_mode(args, reqs, m)
        if args.out is not None:  # what is measured so far, after each mode
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rep, indent=1))
    if len(modes) == 2 and not args.compile_only:
        a, b = (rep["modes"][m] for m in modes)
        rep["comparison"] = {**compare(outs[modes[0]], outs[modes[1]]),
                             "programs_ratio": round(a["programs"] / max(1, b["programs"]), 2),
                             "wall_ratio": round(a["wall_s"] / max(1e-9, b["wall_s"]), 2)}
    rep["dtype"] = args.dtype
    print(json.dumps(rep, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
