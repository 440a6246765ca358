"""Throughput of the toy UNet's training step (UNet + text encoder, ε loss, AdamW), before and
after the changes of world v2's training, side by side in one run:

  before — one host device, the former attention (einsum over (B, N, T, S) logits, softmax,
           einsum), the text encoder's 49408-row token table trained;
  after  — two host devices (data parallel, one per core), attention with heads folded into the
           batch and the normalisation after the value product, the token table frozen.

Each configuration runs in its own process (the host device count is fixed when JAX starts).
Reported: FLOPs per step from XLA's cost analysis, seconds per step (median of timed steps after
warm-up), examples per second, achieved GFLOP/s and, for scale, the GFLOP/s of a plain 2048³
float32 matmul on the same machine.

    python benchmarks/bench_train.py [--batch 32] [--steps 12] [--json out.json] [--attention]

``--attention`` also times the attention alone at the 16×16 level's shape (32 × 256 tokens × 4
heads × 8), the former and the current implementation, forward and forward + backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import json, sys, time, statistics
import numpy as np, jax, jax.numpy as jnp, optax
from jaxdrag.models import attention as A
from jaxdrag.toy import models as M, train as T
cfg = json.loads(sys.argv[1])
if cfg["attention"] == "before":
    def old(q, k, v, causal):
        logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
        if causal:
            t, s = logits.shape[-2:]
            logits = jnp.where(jnp.tril(jnp.ones((t, s), bool)), logits, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
    A._xla_attention = old
a = jnp.ones((2048, 2048), jnp.float32)
mm = jax.jit(lambda a: a @ a)
mm(a).block_until_ready()
t = time.perf_counter()
for _ in range(10):
    mm(a).block_until_ready()
matmul = 2 * 2048 ** 3 / ((time.perf_counter() - t) / 10) / 1e9
B = cfg["batch"]
unet, text = M.net(M.build_unet()), M.net(M.build_text())
params = {"unet": M.init_params(M.build_unet(), 10), "text": M.init_params(M.build_text(), 11)}
loss_fn = T.unet_loss(unet, text, 0.45, min_snr=5.0)
stage = T.UNET_STAGE
tx = stage.optimizer()
if cfg["freeze_tokens"]:
    labels = jax.tree_util.tree_map_with_path(
        lambda p, _: "train" if T.is_not_token_embedding(tuple(T._key(k) for k in p)) else "fixed", params)
    tx = optax.multi_transform({"train": tx, "fixed": optax.set_to_zero()}, labels)
opt = tx.init(params)
grad_fn = T._grad_fn(loss_fn, B)
def step(params, opt, b, key):
    (l, _), g = grad_fn(params, b, key)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, l
rng = np.random.default_rng(0)
b = {"mean": rng.normal(size=(B, 16, 16, 4)).astype(np.float32), "std": np.full((B, 16, 16, 4), .05, np.float32),
     "ids": rng.integers(0, 49407, (B, 77)).astype(np.int32)}
key = jax.random.PRNGKey(0)
c = jax.jit(step).lower(params, opt, b, key).compile()
ca = c.cost_analysis()
ca = ca[0] if isinstance(ca, list) else ca
flops = float(ca["flops"])
if jax.device_count() > 1:  # the per-device program's count is for one slice of the batch
    flops *= jax.device_count()
p, o, l = c(params, opt, b, key)
jax.block_until_ready(l)
times = []
for i in range(cfg["steps"]):
    t = time.perf_counter()
    p, o, l = c(p, o, b, key)
    jax.block_until_ready(l)
    times.append(time.perf_counter() - t)
dt = statistics.median(times)
print(json.dumps({"devices": jax.device_count(), "s_per_step": dt, "examples_per_s": B / dt,
                  "gflop_per_step": flops / 1e9, "gflop_per_s": flops / dt / 1e9, "matmul_gflop_per_s": matmul}))
'''

ATTENTION = r'''
import json, time
import numpy as np, jax, jax.numpy as jnp
from jaxdrag.models import attention as A
def old(q, k, v, causal=False):
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
def timed(f, *a):
    c = jax.jit(f).lower(*a).compile()
    jax.block_until_ready(c(*a))
    t = time.perf_counter()
    for _ in range(10):
        r = c(*a)
    jax.block_until_ready(r)
    return (time.perf_counter() - t) / 10 * 1000
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(32, 256, 4, 8)), jnp.float32) for _ in range(3))
out = {}
for name, f in (("before", old), ("after", lambda q, k, v: A._xla_attention(q, k, v, False))):
    g = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))
    out[name] = {"forward_ms": timed(f, q, k, v), "forward_backward_ms": timed(g, q, k, v)}
out["max_abs_diff"] = float(jnp.abs(old(q, k, v) - A._xla_attention(q, k, v, False)).max())
print(json.dumps(out))
'''

CONFIGS = {
    "before": {"devices": 1, "attention": "before", "freeze_tokens": False},
    "after": {"devices": 2, "attention": "after", "freeze_tokens": True},
}


def run(name: str, batch: int, steps: int) -> dict:
    cfg = dict(CONFIGS[name], batch=batch, steps=steps)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={cfg['devices']}"
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name}: failed\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json", default=None)
    ap.add_argument("--attention", action="store_true")
    args = ap.parse_args(argv)
    res = {n: run(n, args.batch, args.steps) for n in CONFIGS}
    if args.attention:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        r = subprocess.run([sys.executable, "-c", ATTENTION], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"attention: failed\n{r.stderr[-3000:]}")
        res["attention"] = json.loads(r.stdout.strip().splitlines()[-1])
    res["speedup"] = res["after"]["examples_per_s"] / res["before"]["examples_per_s"]
    print("| configuration | devices | GFLOP / step | s / step | examples / s | GFLOP/s | matmul GFLOP/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in CONFIGS:
        r = res[n]
        print(f"| {n} | {r['devices']} | {r['gflop_per_step']:.2f} | {r['s_per_step']:.3f} | "
              f"{r['examples_per_s']:.1f} | {r['gflop_per_s']:.1f} | {r['matmul_gflop_per_s']:.0f} |")
    print(f"speed-up (examples / s): {res['speedup']:.2f}×")
    if args.attention:
        a = res["attention"]
        print(f"attention (32 × 256 × 4 × 8): forward {a['before']['forward_ms']:.1f} → {a['after']['forward_ms']:.1f} ms, "
              f"forward + backward {a['before']['forward_backward_ms']:.1f} → {a['after']['forward_backward_ms']:.1f} ms, "
              f"max |Δ| {a['max_abs_diff']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
