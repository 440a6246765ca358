"""A whole DragBench run, compilation included, on random weights of the exact architecture (no
weight download): every sample through ``edit_batch`` as ``jaxdrag run`` groups it today (one
group per working shape), compiled ahead in a thread pool (``--compile-workers``) while earlier
groups run. Reports the wall time from the first compile to the last image, the programs compiled
and their compile seconds summed, the edits per batch, and per stage the compile seconds.

    python benchmarks/dragbench_run.py ../shared/data/DragBench --model tiny --limit 20          # CPU smoke
    python benchmarks/dragbench_run.py ../shared/data/DragBench --model sd15 --dtype bfloat16 \\
        --batch-size 8 --out results/gpu_dragbench.json                                       # GPU: all 205

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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--model", default="sd15", choices=list(common.CONFIGS))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--method", default="dragtext")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compile-workers", type=int, default=2)
    ap.add_argument("--lora-steps", type=int, default=None)
    ap.add_argument("--max-iters", type=int, default=None)
    ap.add_argument("--width", type=int, default=None, help="working width (default: the model's native size)")
    ap.add_argument("--cache", type=Path, default=None, help="persistent compilation cache folder (default: off)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.cache is not None:
        from jaxdrag import xla_cache

        xla_cache.enable(args.cache)
    from jaxdrag import EditSettings, LoRASettings, edit_batch
    from jaxdrag.data import find_samples

    samples = find_samples(args.dataset)[:args.limit]
    reqs = []
    for s in samples:
        r = s.load()
        r.seed = 0
        reqs.append(r)
    t_load = time.perf_counter()
    pipe = common.jax_random_pipeline(args.model, dtype=args.dtype)
    settings = EditSettings(lora=LoRASettings(steps=args.lora_steps), width=args.width, batch_size=args.batch_size)
    over = {} if args.max_iters is None else {"max_iters": args.max_iters}
    t0 = time.perf_counter()
    results = edit_batch(pipe, reqs, args.method, settings=settings, compile_workers=args.compile_workers, **over)
    wall = time.perf_counter() - t0
    shapes = Counter(tuple(r.image.shape[:2]) for r in results if r.image is not None)
    rep = {"device": common.device_info(), "jax_devices": [d.device_kind for d in jax.devices()],
           "model": args.model, "dtype": str(jax.numpy.dtype(pipe.policy.compute)),
           "method": args.method, "samples": len(reqs), "edits_done": sum(r.image is not None for r in results),
           "image_sizes": len(shapes), "batch_size": args.batch_size, "compile_workers": args.compile_workers,
           "programs": sum(pipe.stages.compiles.values()),
           "compile_s_summed": round(sum(pipe.stages.compile_s.values()), 1),
           "compile_s_per_stage": {k: round(v, 1) for k, v in pipe.stages.compile_s.items()},
           "programs_per_stage": dict(pipe.stages.compiles),
           "wall_s": round(wall, 1), "model_build_s": round(t0 - t_load, 1),
           "s_per_edit": round(wall / max(1, len(reqs)), 2),
           "command": " ".join(sys.argv)}
    print(json.dumps(rep, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
