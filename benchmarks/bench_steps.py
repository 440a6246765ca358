"""Iteration speed, side by side: jaxdrag vs a PyTorch reference of the same step (same weights,
same inputs, same process).

  - drag step: one DragText iteration (one UNet forward, tracking, motion + background + text
    losses, VJPs / two backward passes, Adam on the latent and the text embedding);
  - the whole jitted while_loop (jaxdrag) per iteration;
  - LoRA step: one identity-finetune step at batch 4 (jaxdrag encodes the latent once; the
    reference re-encodes the batch through the VAE every step as released — both are timed, plus
    the reference without the re-encode);
compile time reported apart from run time; peak memory; MFU from the FLOP counts of PERF.md.

    python benchmarks/bench_steps.py --res 256 --dtype float32 --batch 1        # CPU (reduced: 256²)
    python benchmarks/bench_steps.py --res 512 --dtype bfloat16 --batch 1 8     # GPU (full SD-1.5)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402
from jaxdrag.testing import torch_reference as tref  # noqa: E402
from jaxdrag.drag import DragHypers, make_runner, prepare_batch, resolve, step  # noqa: E402
from jaxdrag.models.lora import init_lora  # noqa: E402
from jaxdrag.pipeline import EditSettings, LoRASettings  # noqa: E402
from jaxdrag.pipeline.lora import lora_chunk_fn  # noqa: E402


def batch_of(x, b):
    return jnp.broadcast_to(jnp.asarray(x), (b,) + np.shape(x))


def drag_inputs(pipe, b, lat_hw, sup_hw, c0):
    """Unreachable targets (so every edit runs every iteration), a mask over the middle."""
    rs = np.random.RandomState(0)
    z = jnp.asarray(rs.randn(*lat_hw, 4).astype(np.float32))
    hs, ws = sup_hw
    h0 = np.array([[hs // 4, ws // 4], [hs // 2, ws // 2]], np.float32)
    tg = np.array([[hs - 1, ws - 1], [0, ws - 1]], np.float32)
    keep = np.ones(lat_hw + (1,), np.float32)
    keep[lat_hw[0] // 4: 3 * lat_hw[0] // 4, lat_hw[1] // 4: 3 * lat_hw[1] // 4] = 0
    tm = (np.arange(77) < 8).astype(np.float32)
    _, hyp = resolve("dragtext")
    hy = DragHypers(*(jnp.full((b,), hyp[k], jnp.float32) for k in DragHypers._fields))
    args = [batch_of(a, b) for a in (z, c0, h0, tg, np.ones(2, bool), keep, tm, np.ones(1, np.float32))]
    return args + [jnp.full((b,), 681, jnp.int32), hy]


def bench_jax(pipe, b, res, iters, loop_iters):
    out = {}
    lat_hw, sup_hw = (res // 8, res // 8), (res // 2, res // 2)
    c0 = pipe.encode_prompt(["a photo of a cat"])[0]
    cfg, _ = resolve("dragtext", max_iters=loop_iters)
    from dataclasses import replace
    cfg = replace(cfg, sup_hw=sup_hw)
    nets = pipe.drag_networks()
    shared = pipe.shared_params(False)
    loras = jax.vmap(lambda k: init_lora(pipe.sd.unet.lora, k))(jax.random.split(jax.random.PRNGKey(0), b))
    args = drag_inputs(pipe, b, lat_hw, sup_hw, c0)
    prep = jax.jit(lambda s, e, *a: prepare_batch(nets, cfg, s, e, *a))
    inputs, state = prep(shared, loras, *args)

    one = jax.jit(lambda s, e, i, st: jax.vmap(lambda e_, i_, st_: step(nets, cfg, s, e_, i_, st_))(e, i, st))
    t0 = time.perf_counter()
    exe = one.lower(shared, loras, inputs, state).compile()
    out["drag_step_compile_s"] = time.perf_counter() - t0
    mem = exe.memory_analysis()
    if mem is not None:
        out["drag_step_temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0))
    try:
        out["drag_step_xla_tflop"] = float(exe.cost_analysis()["flops"]) / 1e12
    except Exception:
        pass
    st = {"s": state}

    def run_step():
        st["s"] = exe(shared, loras, inputs, st["s"])
        return st["s"].z
    out["drag_step"] = common.timeit(run_step, iters)

    _, loop = make_runner(nets, cfg, donate=False)
    t0 = time.perf_counter()
    lexe = loop.lower(shared, loras, inputs, state).compile()
    out["drag_loop_compile_s"] = time.perf_counter() - t0
    r = common.timeit(lambda: lexe(shared, loras, inputs, state).z, 1)
    final = lexe(shared, loras, inputs, state)
    assert int(final.it[0]) == loop_iters, "the loop must run every iteration"
    out["drag_loop_per_iter_s"] = r["median_s"] / loop_iters
    out["drag_loop_iters"] = loop_iters

    # DragDiffusion's LoRA defaults (steps, lr) filled in as an edit would
    settings = EditSettings(lora=LoRASettings(batch=4, chunk=iters)).for_method("dragdiffusion").lora
    crop = lat_hw
    fn = lora_chunk_fn(pipe, settings, iters, crop)
    rs = np.random.RandomState(1)
    means = jnp.asarray(rs.randn(b, *lat_hw, 4).astype(np.float32))
    stds = jnp.full((b, *lat_hw, 4), 0.1, jnp.float32)
    import optax
    opts = jax.vmap(optax.scale_by_adam().init)(loras)
    keys = jax.random.split(jax.random.PRNGKey(2), b)
    ctx = batch_of(c0, b)
    lrs = jnp.full((b,), settings.lr, jnp.float32)  # traced per edit (one program for every rate)
    wds = jnp.full((b,), settings.weight_decay, jnp.float32)
    t0 = time.perf_counter()
    lex = fn.lower(pipe.sd.unet.params, loras, opts, keys, means, stds, ctx, lrs, wds).compile()
    out["lora_chunk_compile_s"] = time.perf_counter() - t0
    carry = {"a": (jax.tree.map(jnp.copy, loras), opts, keys)}

    def run_lora():
        lo, op, ke = carry["a"]
        lo, op, ke, losses = lex(pipe.sd.unet.params, lo, op, ke, means, stds, ctx, lrs, wds)
        carry["a"] = (lo, op, ke)
        return losses
    r = common.timeit(run_lora, 2)
    out["lora_step_s"] = r["median_s"] / iters
    out["jax_peak_bytes"] = common.jax_peak_bytes()
    return out


def bench_torch(unet, vae, res, iters, device, c0):
    out = {}
    lat = res // 8
    sup = (res // 2, res // 2)
    tref.add_lora(unet)  # the reference's UNet carries the LoRA during the drag
    rs = np.random.RandomState(0)
    z = torch.from_numpy(rs.randn(1, 4, lat, lat).astype(np.float32)).to(device)
    hs, ws = sup
    h0 = torch.tensor([[hs // 4, ws // 4], [hs // 2, ws // 2]], dtype=torch.float32)
    tg = torch.tensor([[hs - 1, ws - 1], [0, ws - 1]], dtype=torch.float32)
    m = torch.zeros(1, 1, lat, lat)
    m[..., lat // 4: 3 * lat // 4, lat // 4: 3 * lat // 4] = 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ref = tref.DragTextReference(unet, z, c0, h0, tg, m, sup)
    sync = common.torch_sync(device)
    out["drag_step"] = common.timeit(lambda: ref.step(), iters, warmup=1, sync=sync)
    if device.type == "cuda":
        out["drag_peak_bytes"] = torch.cuda.max_memory_allocated()
    img = torch.rand(1, 3, res, res, device=device) * 2 - 1
    for every in (True, False):
        lref = tref.LoRAReference(unet, vae, img, c0, encode_every_step=every)
        key = "lora_step_reencode" if every else "lora_step_encoded_once"
        out[key] = common.timeit(lambda: lref.step(), max(2, iters // 2), warmup=1, sync=sync)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", choices=list(common.CONFIGS))
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--iters", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--loop-iters", type=int, default=10, help="iterations of the timed while_loop")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    unet, vae, text = common.torch_models(args.model, device)
    pipe = common.jax_pipeline(args.model, unet, vae, text, dtype=args.dtype)
    results = {"device": common.device_info(), "model": args.model, "res": args.res,
               "dtype": jnp.dtype(pipe.policy.compute).name, "setup_s": time.perf_counter() - t0,
               "command": " ".join(sys.argv), "jax": {}}
    for b in args.batch:
        results["jax"][b] = bench_jax(pipe, b, args.res, args.iters, args.loop_iters)
        print(f"jax batch {b}: {results['jax'][b]}", flush=True)
    if not args.no_torch:
        c0 = torch.from_numpy(np.asarray(pipe.encode_prompt(["a photo of a cat"]))).to(device)
        results["torch"] = bench_torch(unet, vae, args.res, args.iters, device, c0)
        print(f"torch: {results['torch']}", flush=True)
    results["host_peak_rss_bytes"] = common.host_peak_rss_bytes()
    report(results, args.res, args.model == "sd15")
    if args.out:
        common.dump(results, args.out)


def report(r, res, flops=True):
    scale = (res / 512) ** 2  # FLOPs ∝ pixels (attention grows faster; an approximation off 512²)
    rows = []
    tq = r.get("torch", {})
    for b, j in r["jax"].items():
        step = j["drag_step"]["median_s"] / b
        rows.append((f"drag step (DragText), per edit, batch {b}", step, tq.get("drag_step", {}).get("median_s"),
                     common.DRAGTEXT_STEP * scale))
        rows.append((f"drag loop iteration, per edit, batch {b}", j["drag_loop_per_iter_s"] / b,
                     tq.get("drag_step", {}).get("median_s"), common.DRAGTEXT_STEP * scale))
        rows.append((f"LoRA step (batch 4), per edit, batch {b}", j["lora_step_s"] / b,
                     tq.get("lora_step_reencode", {}).get("median_s"), 4 * common.LORA_SAMPLE * scale))
    print(f"\n{'measurement':48s} {'jaxdrag s':>10s} {'torch s':>10s} {'ratio':>7s} {'TFLOP/s':>8s}")
    for name, j, t, tf in rows:
        ratio = f"{t / j:7.2f}" if t else "      -"
        ts = f"{t:10.4f}" if t else "         -"
        print(f"{name:48s} {j:10.4f} {ts} {ratio} {tf / j if flops else float('nan'):8.2f}")
    if tq:
        print(f"torch LoRA step without the per-step VAE encode: {tq['lora_step_encoded_once']['median_s']:.4f} s")


if __name__ == "__main__":
    main()
