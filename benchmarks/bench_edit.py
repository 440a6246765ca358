"""Whole-edit wall time by stage and edits per minute at several batch sizes (jaxdrag), side by
side with the PyTorch reference pipeline run on the same machine, weights and input.

A faithful DragText edit: LoRA 80 steps × batch 4, DDIM inversion 35 steps, drag ≤ 80 iterations
(targets out of reach, so every edit runs all 80: the worst case), denoise 35 steps with reference
attention, decode. jaxdrag's first call of each shape compiles; the figures are from a second call
(compile time reported apart).

    python benchmarks/bench_edit.py --model tiny --res 128 --batch 1 2 4 8        # CPU
    python benchmarks/bench_edit.py --model sd15 --res 512 --batch 1 8 --dtype bfloat16   # GPU
    python benchmarks/bench_edit.py --model sd15 --res 512 --batch 8 --no-torch --once --remat dots
        # a bare accelerator machine: no torch; one call per batch (run time = stage time − compile)

With ``--no-torch`` the weights come from the project's own initialiser and torch is never
imported. The JSON (``--out``) is rewritten after every batch, so a call cut short keeps its figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from jaxdrag import EditRequest, EditSettings, LoRASettings, edit_batch  # noqa: E402

STAGES = ("text", "encode", "lora", "invert", "drag_prepare", "drag", "denoise", "decode")


def request(res, seed):
    rs = np.random.RandomState(seed)
    img = (rs.rand(res, res, 3) * 255).astype(np.uint8)
    mask = np.zeros((res, res), np.uint8)
    mask[res // 8: 7 * res // 8, res // 8: 7 * res // 8] = 1
    # 186/256 of the width apart: out of reach of 80 one-pixel steps at the supervision resolution
    pts = [[res // 8, res // 4], [res - res // 64, res // 4]]
    return EditRequest(img, pts, "a photo of a cat", mask, name=f"e{seed}", seed=seed)


def bench_jax(pipe, res, b, lora_steps, drag_iters, remat, once=False):
    settings = EditSettings(width=res, lora=LoRASettings(steps=lora_steps, remat=remat, chunk=10),
                            batch_size=b, remat=remat)
    reqs = [request(res, i) for i in range(b)]
    t0 = time.perf_counter()
    first = edit_batch(pipe, reqs, "dragtext", settings=settings, max_iters=drag_iters)
    first_s = time.perf_counter() - t0
    compile_s = {k: v for k, v in first[0].timings.items() if k.startswith("compile_")}
    if once:  # one call: each stage's run time is its wall time less its compile time
        out, wall = first, first_s - sum(compile_s.values())
        t = {s: first[0].timings.get(s, 0.0) - compile_s.get(f"compile_{s}", 0.0) for s in STAGES}
    else:
        t0 = time.perf_counter()
        out = edit_batch(pipe, reqs, "dragtext", settings=settings, max_iters=drag_iters)
        wall = time.perf_counter() - t0
        t = out[0].timings
    iters = [o.iterations for o in out]
    run = sum(t.get(s, 0.0) for s in STAGES)
    # PERF.md's FLOP counts are SD-1.5's at 512²: other models/sizes get no TFLOP/s or MFU
    sd15_512 = pipe.sd.unet.cfg == common.CONFIGS["sd15"][0] and res == 512
    tflop = sum(common.edit_tflop(lora_steps, 4, 35, it, 35) for it in iters) if sd15_512 else float("nan")
    return {"batch": b, "stages_s": {s: t.get(s, 0.0) for s in STAGES}, "run_s": run, "wall_s": wall,
            "first_call_s": first_s, "compile_s": compile_s, "iterations": iters,
            "s_per_edit": run / b, "edits_per_min": 60 * b / run,
            "tflop_per_s": tflop / run, "mfu_h100": tflop / run / common.H100_PEAK,
            "jax_peak_bytes": common.jax_peak_bytes()}


def memory_plan(pipe, res, lora_steps, drag_iters, remat):
    """Memory per edit of every stage (XLA's memory analysis of the batch-1 programs, weights
    apart) and the batch ``--batch-size auto`` would choose on this device."""
    from jaxdrag.data import prepare
    from jaxdrag.drag.methods import resolve
    from jaxdrag.pipeline import plan_batch, pow2_bucket

    settings = EditSettings(width=res, lora=LoRASettings(steps=lora_steps, remat=remat, chunk=10),
                            batch_size="auto", remat=remat)
    cfg, hyp = resolve("dragtext", max_iters=drag_iters)
    p = prepare(request(res, 0), res, pipe.native_width)
    b, measured = plan_batch(pipe, p, settings, cfg, hyp, pow2_bucket(len(p.handles)))
    return {"auto_batch": b, "device_bytes": pipe.device_memory(), "weight_bytes": pipe.weight_bytes(),
            "per_edit_bytes": {k: v["edit"] for k, v in measured.items()}}


def bench_torch(unet, vae, text_c, res, device, lora_steps, drag_iters):
    import torch

    from jaxdrag.testing import torch_reference as tref

    req = request(res, 0)
    sync = common.torch_sync(device)
    times = {}
    img = torch.from_numpy(req.image).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
    t0 = time.perf_counter()
    lora = tref.LoRAReference(unet, vae, img, text_c, encode_every_step=True)
    for _ in range(lora_steps):
        lora.step()
    sync(None)
    times["lora"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad(), tref.autocast(device):
        z0 = vae.encode(img).latent_dist.mean.float() * 0.18215
    zt = tref.invert(unet, z0, text_c)
    sync(None)
    times["encode+invert"] = time.perf_counter() - t0
    lat, sup = res // 8, (res // 2, res // 2)
    pts = torch.tensor(req.points, dtype=torch.float32)
    h0 = torch.stack([pts[0::2, 1], pts[0::2, 0]], -1) * 0.5
    tg = torch.stack([pts[1::2, 1], pts[1::2, 0]], -1) * 0.5
    m = torch.from_numpy(req.mask[::8, ::8].astype(np.float32))[None, None]
    t0 = time.perf_counter()
    drag = tref.DragTextReference(unet, zt, text_c, h0.round(), tg.round(), m, sup)
    n = 0
    for _ in range(drag_iters):
        if not drag.step():
            break
        n += 1
    sync(None)
    times["drag"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    z = tref.denoise(unet, zt, drag.z.detach(), text_c, drag.c.detach())
    with torch.no_grad(), tref.autocast(device):
        vae.decode(z / 0.18215)
    sync(None)
    times["denoise+decode"] = time.perf_counter() - t0
    total = sum(times.values())
    return {"stages_s": times, "total_s": total, "drag_iterations": n, "edits_per_min": 60 / total,
            "tflop_per_s": common.reference_edit_tflop(lora_steps, 4, 35, n, 35) / total,
            "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", choices=list(common.CONFIGS))
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 2, 4, 8], help="batch sizes to time (none: --plan only)")
    ap.add_argument("--lora-steps", type=int, default=80)
    ap.add_argument("--drag-iters", type=int, default=80)
    ap.add_argument("--remat", choices=("off", "blocks", "dots"), default="off",
                    help="rematerialisation policy of LoRA training and the drag step")
    ap.add_argument("--plan", action="store_true",
                    help="first report each stage's memory per edit and the batch --batch-size auto picks")
    ap.add_argument("--once", action="store_true",
                    help="one call per batch (run time = stage time − compile time), for time-limited calls")
    ap.add_argument("--no-torch", action="store_true",
                    help="no PyTorch at all: weights from jaxdrag's initialiser, no reference run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    if args.no_torch:
        pipe = common.jax_random_pipeline(args.model, dtype=args.dtype)
    else:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        unet, vae, text = common.torch_models(args.model, device)
        pipe = common.jax_pipeline(args.model, unet, vae, text, dtype=args.dtype)
    res = {"device": common.device_info(), "model": args.model, "res": args.res,
           "dtype": jnp.dtype(pipe.policy.compute).name, "command": " ".join(sys.argv), "jax": []}
    if args.plan:
        res["memory_plan"] = memory_plan(pipe, args.res, args.lora_steps, args.drag_iters, args.remat)
        print(f"memory plan: {res['memory_plan']}", flush=True)
        if args.out:
            common.dump(res, args.out)
    for b in args.batch:
        r = bench_jax(pipe, args.res, b, args.lora_steps, args.drag_iters, args.remat, args.once)
        res["jax"].append(r)
        print(f"jax batch {b}: {r}", flush=True)
        if args.out:
            common.dump(res, args.out)
    if not args.no_torch:
        import torch

        c = torch.from_numpy(np.asarray(pipe.encode_prompt(["a photo of a cat"]))).to(device)
        res["torch"] = bench_torch(unet, vae, c, args.res, device, args.lora_steps, args.drag_iters)
        print(f"torch: {res['torch']}", flush=True)
    print(f"\n{'batch':>5s} {'s/edit':>8s} {'edits/min':>10s} {'TFLOP/s':>8s} {'MFU':>6s}  stages (s, whole batch)")
    for r in res["jax"]:
        st = " ".join(f"{k}={v:.2f}" for k, v in r["stages_s"].items())
        print(f"{r['batch']:5d} {r['s_per_edit']:8.2f} {r['edits_per_min']:10.1f} {r['tflop_per_s']:8.1f} "
              f"{r['mfu_h100']:6.1%}  {st}")
    if "torch" in res:
        t = res["torch"]
        print(f"torch reference: {t['total_s']:.2f} s/edit ({t['edits_per_min']:.1f}/min), stages {t['stages_s']}")
        for r in res["jax"]:
            print(f"  speed-up at batch {r['batch']}: {t['total_s'] / r['s_per_edit']:.1f}×")
    if args.out:
        common.dump(res, args.out)


if __name__ == "__main__":
    main()
