"""CPU convolution micro-benchmark behind the im2col rule of ``jaxdrag.models.layers``: forward and
input-gradient time (ms) of a 3×3 convolution, XLA's convolution (with the explicit-transpose
gradient) vs im2col + matmul vs torch, at SD-1.5's level shapes.

    python benchmarks/bench_conv.py
"""

import time

import jax
import numpy as np
import torch

from jaxdrag.models.layers import _conv_explicit_transpose, _conv_im2col

PAD = ((1, 1), (1, 1))
SHAPES = [(1, 8, 1280, 1280), (2, 8, 2560, 1280), (2, 16, 1280, 1280), (2, 16, 1920, 640),
          (1, 32, 640, 640), (2, 32, 960, 320), (2, 64, 320, 320)]


def ms(f, *a, n=5):
    jax.block_until_ready(f(*a))
    t = time.perf_counter()
    for _ in range(n):
        r = f(*a)
    jax.block_until_ready(r)
    return (time.perf_counter() - t) / n * 1e3


def main():
    rs = np.random.RandomState(0)
    print(f"{'(batch, size, C_in, C_out)':28s} {'XLA conv':>16s} {'im2col':>16s} {'torch':>16s}   (fwd / dgrad ms)")
    for b, hw, ci, co in SHAPES:
        x = rs.randn(b, hw, hw, ci).astype(np.float32)
        w = (rs.randn(3, 3, ci, co) * 0.01).astype(np.float32)
        g = rs.randn(b, hw, hw, co).astype(np.float32)
        row = []
        for cv in (_conv_explicit_transpose, _conv_im2col):
            fw = jax.jit(lambda x, w, cv=cv: cv(x, w, 1, PAD))
            dg = jax.jit(lambda x, w, g, cv=cv: jax.vjp(lambda a: cv(a, w, 1, PAD), x)[1](g)[0])
            row.append((ms(fw, x, w), ms(dg, x, w, g)))
        tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
        tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            t_f = ms(lambda: torch.nn.functional.conv2d(tx, tw, padding=1))
        t_fb = ms(lambda: torch.autograd.grad(torch.nn.functional.conv2d(tx, tw, padding=1), tx, tg)[0])
        row.append((t_f, t_fb - t_f))
        cells = " ".join(f"{a:7.1f} / {d:6.1f}" for a, d in row)
        print(f"{str((b, f'{hw}x{hw}', ci, co)):28s} {cells}", flush=True)


if __name__ == "__main__":
    main()
