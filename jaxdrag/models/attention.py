"""Attention: a kernel dispatcher (cuDNN fused / XLA) and the attention modules of the UNet, VAE
and CLIP, with PyTorch-mirroring parameter names.

All kernels take q, k, v as (B, T, N, H): batch, tokens, heads, head dim.
"""

from __future__ import annotations

from functools import partial

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from ..precision import platform
from .layers import GroupNorm, Identity, Linear

Array = jax.Array


def _xla_attention(q: Array, k: Array, v: Array, causal: bool, key_mask: Array | None = None) -> Array:
    """softmax(q kᵀ/√H) v with float32 logits and softmax; output in q's dtype.

    Heads are folded into the batch ((B·N, T, H) operands: plain batched matmuls) and the
    normalisation is applied after the value product (dividing (T, H) instead of (T, S)); the
    row max is a constant for autodiff (softmax is shift-invariant, so the gradient is exact).
    On XLA:CPU this is 10× faster forward and 1.5× forward + backward than the einsum over
    (B, N, T, S) logits at SD's 16×16 / 256-token level (benchmarks/RESULTS.md).
    ``key_mask`` (B, S) bool: keys that get no weight where False (a masked canvas's padding)."""
    b, t, n, h = q.shape
    s = k.shape[1]
    fold = lambda x: x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], h)
    logits = jnp.einsum("xth,xsh->xts", fold(q), fold(k), preferred_element_type=jnp.float32)
    logits = logits * (h ** -0.5)
    if causal:
        mask = jnp.tril(jnp.ones((t, s), bool))
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    if key_mask is not None:
        keep = jnp.broadcast_to(key_mask[:, None, None, :], (b, n, 1, s)).reshape(b * n, 1, s)
        logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    out = jnp.einsum("xts,xsh->xth", e.astype(v.dtype), fold(v), preferred_element_type=jnp.float32)
    out = out / e.sum(axis=-1, keepdims=True)
    return out.astype(v.dtype).reshape(b, n, t, h).transpose(0, 2, 1, 3)


def _to_blocks(x: Array, block: int) -> Array:
    """(B, T, N, H) → (T/block, B·N, block, H)."""
    b, t, n, h = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * n, t // block, block, h).transpose(1, 0, 2, 3)


def _from_blocks(x: Array, b: int, n: int) -> Array:
    nb, bn, blk, h = x.shape
    return x.transpose(1, 0, 2, 3).reshape(b, n, nb * blk, h).transpose(0, 2, 1, 3)


def _heads(x: Array) -> Array:
    b, s, n, h = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * n, s, h)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def blocked_attention(q: Array, k: Array, v: Array, block: int) -> Array:
    """Non-causal attention computed over blocks of ``block`` queries (a ``lax.map``), with a
    flash-style backward: only the output and each row's log-sum-exp are saved, and the
    probabilities are recomputed block by block. For long sequences on CPUs, where materialising
    the (T × S) logits of every head costs several passes over memory (SD-1.5 at 64²: 4096² per
    head): 3× faster forward + backward than ``_xla_attention`` there. Requires T % block == 0."""
    return _blocked_fwd(q, k, v, block)[0]


def _blocked_fwd(q, k, v, block):
    b, t, n, h = q.shape
    scale = h ** -0.5
    kh, vh = _heads(k), _heads(v)

    def one(qc):
        s = jnp.einsum("xqh,xkh->xqk", qc, kh, preferred_element_type=jnp.float32) * scale
        m = s.max(-1, keepdims=True)
        e = jnp.exp(s - m)
        l = e.sum(-1, keepdims=True)
        o = jnp.einsum("xqk,xkh->xqh", e.astype(vh.dtype), vh) / l.astype(vh.dtype)
        return o, (m + jnp.log(l))[..., 0]

    o, lse = jax.lax.map(one, _to_blocks(q, block))
    out = _from_blocks(o, b, n)
    return out, (q, k, v, out, lse)


def _blocked_bwd(block, res, g):
    q, k, v, out, lse = res
    b, t, n, h = q.shape
    scale = h ** -0.5
    kh, vh = _heads(k), _heads(v)

    def body(carry, x):
        dk, dv = carry
        qc, oc, gc, lc = x
        s = jnp.einsum("xqh,xkh->xqk", qc, kh, preferred_element_type=jnp.float32) * scale
        p = jnp.exp(s - lc[..., None])
        dv = dv + jnp.einsum("xqk,xqh->xkh", p, gc.astype(jnp.float32))
        dp = jnp.einsum("xqh,xkh->xqk", gc, vh, preferred_element_type=jnp.float32)
        delta = jnp.sum(gc.astype(jnp.float32) * oc.astype(jnp.float32), -1, keepdims=True)
        ds = p * (dp - delta) * scale
        dq = jnp.einsum("xqk,xkh->xqh", ds, kh.astype(jnp.float32))
        dk = dk + jnp.einsum("xqk,xqh->xkh", ds, qc.astype(jnp.float32))
        return (dk, dv), dq.astype(q.dtype)

    zeros = jnp.zeros(kh.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(body, (zeros, zeros),
                                (_to_blocks(q, block), _to_blocks(out, block), _to_blocks(g, block), lse))
    s_len = k.shape[1]

    def back(x, like):
        return x.reshape(b, n, s_len, h).transpose(0, 2, 1, 3).astype(like.dtype)

    return _from_blocks(dq, b, n), back(dk, k), back(dv, v)


blocked_attention.defvjp(_blocked_fwd, _blocked_bwd)

BLOCK = 128
BLOCKED_MIN_TOKENS = 1024


def cudnn_applies(q: Array, impl: str, kv_len: int | None = None) -> bool:
    """Whether the cuDNN fused kernel is used for these inputs under ``impl``: a GPU, 16-bit
    inputs, a head dim ≤ 256 that is a multiple of 8, and even query and key lengths (JAX's cuDNN
    wrapper rejects odd lengths when the attention is differentiated, e.g. cross-attention over
    SD's 77 text tokens in the LoRA and drag steps; those run on XLA's kernel)."""
    if impl == "xla":
        return False
    kv_len = q.shape[1] if kv_len is None else kv_len
    ok = (q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
          and q.shape[1] % 2 == 0 and kv_len % 2 == 0 and platform() == "gpu")
    if impl == "cudnn" and not ok:
        raise ValueError(f"cuDNN attention needs a GPU, 16-bit inputs, a head dim ≤ 256 that is a "
                         f"multiple of 8 and even sequence lengths; got dtype {q.dtype}, head dim "
                         f"{q.shape[-1]}, lengths {q.shape[1]}/{kv_len} on {platform()}")
    return ok


def attention(q: Array, k: Array, v: Array, *, causal: bool = False, impl: str = "auto",
              key_mask: Array | None = None) -> Array:
    """Scaled dot-product attention, (B, T, N, H) → (B, T, N, H).

    GPU with 16-bit inputs: cuDNN's fused kernel. CPU, long non-causal sequences (T ≥ 1024, a
    multiple of 128): ``blocked_attention``. Otherwise XLA's einsum-softmax-einsum.
    ``key_mask`` (B, S) bool (a masked canvas's valid tokens) always takes XLA's kernel: the
    valid cells of a canvas are not a prefix of the flattened tokens, which the fused kernels'
    sequence lengths would need."""
    if key_mask is not None:
        out = _xla_attention(q, k, v, causal, key_mask)
    elif cudnn_applies(q, impl, k.shape[1]):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    else:
        t = q.shape[1]
        if (impl == "auto" and not causal and platform() == "cpu" and t >= BLOCKED_MIN_TOKENS
                and t % BLOCK == 0):
            out = blocked_attention(q, k, v, BLOCK)
        else:
            out = _xla_attention(q, k, v, causal)
    return checkpoint_name(out, "attention")  # saved by the "dots" remat policy


def reference_attention(q: Array, k: Array, v: Array, *, impl: str = "auto",
                        key_mask: Array | None = None) -> Array:
    """Mutual self-attention (MasaCtrl): every batch row's queries attend to the keys and values
    of row 0 only: out_b = softmax(Q_b K_0ᵀ/√H) V_0. Implemented as one attention call with the
    queries of all rows concatenated along the token axis (``key_mask``: row 0's is used)."""
    b, t, n, h = q.shape
    out = attention(q.reshape(1, b * t, n, h), k[:1], v[:1], impl=impl,
                    key_mask=None if key_mask is None else key_mask[:1])
    return out.reshape(b, t, n, h)


class CrossAttention(nnx.Module):
    """diffusers ``Attention`` as used in SD transformer blocks: to_q/to_k/to_v without bias,
    to_out.0 with bias, ``heads`` heads of width ``dim_head``; LoRA on all four projections.

    x: (B, T, query_dim); context: (B, S, context_dim) or None for self-attention.
    ``reference=True`` switches self-attention to ``reference_attention`` (row 0's keys/values).
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, *,
                 lora_rank: int = 0, dtype=jnp.float32, attn_impl: str = "auto"):
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        kw = dict(lora_rank=lora_rank, dtype=dtype)
        self.to_q = Linear(query_dim, inner, use_bias=False, **kw)
        self.to_k = Linear(context_dim, inner, use_bias=False, **kw)
        self.to_v = Linear(context_dim, inner, use_bias=False, **kw)
        self.to_out = nnx.List([Linear(inner, query_dim, use_bias=True, **kw), Identity()])
        self.heads = heads
        self.attn_impl = attn_impl

    def __call__(self, x: Array, context: Array | None = None, *, reference: bool = False,
                 key_mask: Array | None = None) -> Array:
        """``key_mask`` (B, T) bool, self-attention only: the valid tokens of a masked canvas."""
        ctx = x if context is None else context
        key_mask = key_mask if context is None else None
        b, t, _ = x.shape
        q = self.to_q(x).reshape(b, t, self.heads, -1)
        k = self.to_k(ctx).reshape(b, ctx.shape[1], self.heads, -1)
        v = self.to_v(ctx).reshape(b, ctx.shape[1], self.heads, -1)
        if reference:
            out = reference_attention(q, k, v, impl=self.attn_impl, key_mask=key_mask)
        else:
            out = attention(q, k, v, impl=self.attn_impl, key_mask=key_mask)
        return self.to_out[0](out.reshape(b, t, -1))


class SpatialSelfAttention(nnx.Module):
    """The VAE mid-block attention (diffusers ``Attention`` with ``group_norm``, one head of width
    C, biases everywhere, residual connection). x: (B, H, W, C) → same."""

    def __init__(self, channels: int, *, groups: int, eps: float, dtype=jnp.float32,
                 attn_impl: str = "auto"):
        self.group_norm = GroupNorm(groups, channels, eps=eps, dtype=dtype)
        kw = dict(dtype=dtype)
        self.to_q = Linear(channels, channels, **kw)
        self.to_k = Linear(channels, channels, **kw)
        self.to_v = Linear(channels, channels, **kw)
        self.to_out = nnx.List([Linear(channels, channels, **kw), Identity()])
        self.attn_impl = attn_impl

    def __call__(self, x: Array, canvas=None) -> Array:
        b, h, w, c = x.shape
        y = self.group_norm(x, canvas).reshape(b, h * w, c)
        q = self.to_q(y).reshape(b, h * w, 1, c)
        k = self.to_k(y).reshape(b, h * w, 1, c)
        v = self.to_v(y).reshape(b, h * w, 1, c)
        km = None if canvas is None else canvas.key_mask((h, w))
        out = attention(q, k, v, impl=self.attn_impl, key_mask=km)  # head dim C (512): XLA path (see precision.py)
        out = self.to_out[0](out.reshape(b, h * w, c)).reshape(b, h, w, c)
        return out + x.astype(out.dtype)


class CLIPAttention(nnx.Module):
    """HF ``CLIPAttention``: q/k/v/out projections with bias; optional causal mask."""

    def __init__(self, dim: int, heads: int, *, dtype=jnp.float32, attn_impl: str = "auto"):
        kw = dict(dtype=dtype)
        self.q_proj = Linear(dim, dim, **kw)
        self.k_proj = Linear(dim, dim, **kw)
        self.v_proj = Linear(dim, dim, **kw)
        self.out_proj = Linear(dim, dim, **kw)
        self.heads = heads
        self.attn_impl = attn_impl

    def __call__(self, x: Array, *, causal: bool) -> Array:
        b, t, d = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, -1)
        k = self.k_proj(x).reshape(b, t, self.heads, -1)
        v = self.v_proj(x).reshape(b, t, self.heads, -1)
        out = attention(q, k, v, causal=causal, impl=self.attn_impl)
        return self.out_proj(out.reshape(b, t, d))
