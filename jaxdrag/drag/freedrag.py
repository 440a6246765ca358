"""FreeDrag, diffusion version (ALGORITHMS.md §6), with DragText (§3.4), batched.

No point tracking: each handle is replaced by a sub-target q_i that moves along the line to its
target t_i by a line search, and the feature template T_i (the (2w+1)² = 81 bilinear samples of
F around q_i, w = ``r_m`` = 4) adapts as the drag proceeds. Terms, per pair i:

  S(F, P)   bilinear samples of F at the points P (floor-based weights, indices clamped to the map)
  ℓ_i(F)    = mean_{81×C} |S(F, q_i + Q) − T_i|        (Q: the 9×9 integer offsets, row-major)
  L         = Σ_i ℓ_i + λ·mean(|Φ(z) − Φ(z*)| ⊙ (1 − m))   (the mean over all 4·h·w latent entries;
              only when a mask is drawn; λ = 10)

Blocks: a line search, then up to ``block_steps`` = 5 Adam steps on z (a block ends early when
max_i ℓ_i < 0.5·L_exp, the loss measured before that step), then a forward at the new z gives
ℓ_end,i, the signs (done iff ‖q_i − t_i‖ < 2 and ℓ_end,i ≤ 0.5·L_exp) and the template update
T_i ← γ_i·S(F, q_i + Q) + (1 − γ_i)·T_i with γ_i = 1 for a done pair, else 1/(1 + e^{a(ℓ_end,i − b)}),
a = ln 9/(0.6·L_exp), b = 0.2·L_exp. The run ends when every pair is done or after ``max_iters``
Adam steps (300).

Line search for each pair not done, D = ‖q − t‖, with ℓ_ini/ℓ_end the previous block's first and
final losses (0 at the start):
  ℓ_end < 0.5·L_exp  ("normal"):   candidates q + s·(q_max − q), s = 0.1…1.0, q_max = q + min(d_max/D, 1)(t − q);
                                   the one whose mean|S(F, cand + Q) − T| is closest to L_exp
  ℓ_end < ℓ_ini      ("stay"):     q unchanged
  else               ("backtrack"): q ← q − min(d_max/D, 1)(t − q), then candidates up to
                                   q + min(2·d_max/D′, 1)(t − q); the one with the smallest distance.

One forward per iteration: the forward that gives a block's ℓ_end (the reference's extra no-grad
forward) is at the same (z, ĉ) as the next block's first Adam step, so this loop uses it for both;
an iteration at a block start first closes the previous block (ℓ_end, signs, templates) and runs
the line search, then takes that block's first step.

DragText (as the reference integrates it): ĉ's gradient accumulates ∇_ĉ L over the inner steps
and is applied at most once per block, when the block converged (max ℓ < threshold) and at least
one pair's line search was not a backtrack: the step then adds ∇_ĉ(Σℓ + λ_t·reg) and clears the
accumulator.

QUIRK (``stale_latent_grad``): the reference backpropagates L a second time after a step that did
not converge (its ``else`` branch, even without DragText), so the next latent step uses
∇L_{k+1} + ∇L_k and ĉ's accumulator gets ∇_ĉ L_k twice; its text step also leaves ∇_z(Σℓ) in z's
gradient for the next step. Off by default (FreeDrag's paper update); on reproduces the code.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ..schedule import ddim_step
from .engine import (DragConfig, DragInputs, DragNetworks, Host, failure_update, max_iters_budget, pair_plan, sized,
                     while_live)
from .losses import STOP_DISTANCE, background_loss, background_weight, l1, map_sizes, upsample_features
from .text import ADAM, text_gradient, text_loss, text_step

Array = jax.Array

N_CANDIDATES = 10  # line-search candidates s = 0.1, 0.2, …, 1.0


class FreeDragState(NamedTuple):
    z: Array
    c: Array
    eps0: Array         # (h, w, 4) ε(z*, c) for Φ(z*) (filled by the first forward)
    opt_z: Any
    opt_c: Any
    acc_c: Array        # (T, D) ĉ gradient accumulated since the last text step
    stale: Array        # (h, w, 4) latent gradient left over by the reference (QUIRK only)
    handles: Array      # (N, 2) the sub-targets q_i
    tmpl: Array         # (N, (2w+1)², C) templates T_i
    sign: Array         # (N,) bool pair done
    l_ini: Array        # (N,) the current block's first losses
    l_end: Array        # (N,) the previous block's final losses
    ltype: Array        # (N,) bool this block's line search was "normal" or "stay" (not backtrack)
    inner: Array        # () int32 step within the block (0 = the block starts with this iteration)
    started: Array      # () bool a block has run (the first block has no previous one to close)
    it: Array
    done: Array
    traj: Array         # (max_iters + 1, N, 2) initial handles, then the sub-targets of each update
    losses: Array
    failed: Array
    fail_it: Array
    fail_what: Array


def offsets(w: int) -> Array:
    """Q: the (2w+1)² integer offsets (row, col), row-major: (K, 2) float32."""
    k = jnp.arange(-w, w + 1, dtype=jnp.float32)
    return jnp.stack(jnp.meshgrid(k, k, indexing="ij"), -1).reshape(-1, 2)


def sample(f: Array, pts: Array, hw: Array | None = None) -> Array:
    """Bilinear samples of f (h, w, C) at pts (P, 2) (row, col) → (P, C). Weights from the floor
    (the reference's ``.long()``, equal for in-map points); corner indices are clamped to the map
    (the reference does not check bounds). ``hw`` (2,) int: the edit's map is f[:h, :w] (a masked
    canvas), the clamp is to it."""
    h, w = f.shape[:2] if hw is None else (hw[0], hw[1])
    y, x = pts[:, 0], pts[:, 1]
    y0, x0 = jnp.floor(y), jnp.floor(x)
    wy, wx = (y - y0)[:, None], (x - x0)[:, None]
    yi0 = jnp.clip(y0.astype(jnp.int32), 0, h - 1)
    yi1 = jnp.clip(y0.astype(jnp.int32) + 1, 0, h - 1)
    xi0 = jnp.clip(x0.astype(jnp.int32), 0, w - 1)
    xi1 = jnp.clip(x0.astype(jnp.int32) + 1, 0, w - 1)
    return ((1 - wy) * (1 - wx) * f[yi0, xi0] + wy * (1 - wx) * f[yi1, xi0]
            + (1 - wy) * wx * f[yi0, xi1] + wy * wx * f[yi1, xi1])


def patch_features(f: Array, q: Array, w: int, hw: Array | None = None) -> Array:
    """S(f, q + Q): (K, C) for one point q (2,)."""
    return sample(f, q[None] + offsets(w), hw)


def point_losses(f: Array, q: Array, tmpl: Array, w: int, hw: Array | None = None) -> Array:
    """ℓ_i = mean |S(f, q_i + Q) − T_i| for every pair: (N,)."""
    # l1: sign(0) = 0 as torch. A done pair's template is S(F, q + Q) of the very forward that
    # the next step sees again, so the difference is exactly 0 there
    return jax.vmap(lambda qi, ti: jnp.mean(l1(patch_features(f, qi, w, hw) - ti)))(q, tmpl)


def line_search(f: Array, q: Array, t: Array, tmpl: Array, l_ini: Array, l_end: Array, *, w: int,
                l_expected, d_max, hw: Array | None = None) -> tuple[Array, Array]:
    """The new sub-target of one pair and its ltype (module docstring). q, t (2,); tmpl (K, C)."""
    thr = 0.5 * l_expected
    s = jnp.arange(1, N_CANDIDATES + 1, dtype=jnp.float32) / N_CANDIDATES

    def cands(start, reach):
        d = jnp.sqrt(jnp.sum((start - t) ** 2))
        end = start + jnp.minimum(reach / (d + 1e-8), 1.0) * (t - start)
        pts = (1 - s)[:, None] * start[None] + s[:, None] * end[None]
        dif = jax.vmap(lambda p: jnp.mean(jnp.abs(patch_features(f, p, w, hw) - tmpl)))(pts)
        return pts, dif

    pts_n, dif_n = cands(q, d_max)
    normal = pts_n[jnp.argmin(jnp.abs(dif_n - l_expected))]
    d = jnp.sqrt(jnp.sum((q - t) ** 2))
    back = q - jnp.minimum(d_max / (d + 1e-8), 1.0) * (t - q)
    pts_b, dif_b = cands(back, 2.0 * d_max)
    backtrack = pts_b[jnp.argmin(dif_b)]
    is_normal, is_stay = l_end < thr, l_end < l_ini
    new = jnp.where(is_normal, normal, jnp.where(is_stay, q, backtrack))
    return new, is_normal | is_stay


def template_weight(l_end: Array, sign: Array, l_expected) -> Array:
    """γ_i: 1 for a done pair, else 1/(1 + exp(a(ℓ_end − b))), a = ln 9/(0.6 L), b = 0.2 L."""
    a = math.log(9.0) / (0.6 * l_expected)
    b = 0.2 * l_expected
    return jnp.where(sign, 1.0, jax.nn.sigmoid(-a * (l_end - b)))


def close_block(f: Array, st: FreeDragState, targets: Array, mask: Array, *, w: int, l_expected,
                hw: Array | None = None):
    """End of a block on the features of the final z: (ℓ_end, signs, templates)."""
    cur = jax.vmap(lambda qi: patch_features(f, qi, w, hw))(st.handles)
    l_end = jnp.mean(jnp.abs(cur - st.tmpl), axis=(1, 2))
    dist = jnp.sqrt(jnp.sum((st.handles - targets) ** 2, axis=-1))
    sign = (dist < STOP_DISTANCE) & (l_end <= 0.5 * l_expected)
    g = template_weight(l_end, sign, l_expected)[:, None, None]
    tmpl = jnp.where(mask[:, None, None], g * cur + (1 - g) * st.tmpl, st.tmpl)
    return l_end, sign | ~mask, tmpl


def prepare(nets: DragNetworks, cfg: DragConfig, shared, edit, z0, c0, handles0, targets, mask, keep,
            token_mask, clip_text, t_star, hypers, sizes=None) -> tuple[DragInputs, FreeDragState]:
    """Inputs and initial state for one edit; the templates T_i = S(F0, p_i + Q) are taken from
    the first iteration's forward (at z*, c). ``sizes``: ``DragInputs.sizes`` (a masked canvas)."""
    inp = DragInputs(z0, c0, handles0, targets, mask, keep, token_mask, clip_text,
                     jnp.asarray(t_star, jnp.int32), hypers, None if sizes is None else jnp.asarray(sizes, jnp.int32))
    _, f_s = jax.eval_shape(lambda: sized(nets.features, inp.sizes)(shared, edit, z0, c0, t_star))
    n, k, m = handles0.shape[0], (2 * cfg.r_m + 1) ** 2, cfg.max_iters
    zeros_n = jnp.zeros((n,), jnp.float32)
    st = FreeDragState(
        z=z0, c=c0, eps0=jnp.zeros_like(z0), opt_z=ADAM.init(z0), opt_c=ADAM.init(c0),
        acc_c=jnp.zeros_like(c0), stale=jnp.zeros_like(z0), handles=handles0,
        tmpl=jnp.zeros((n, k, f_s.shape[-1]), jnp.float32), sign=~mask, l_ini=zeros_n, l_end=zeros_n,
        ltype=jnp.zeros((n,), bool), inner=jnp.int32(0), started=jnp.bool_(False), it=jnp.int32(0),
        done=jnp.bool_(False), traj=jnp.zeros((m + 1, n, 2), jnp.float32).at[0].set(handles0),
        losses=jnp.full((m,), jnp.nan, jnp.float32), failed=jnp.bool_(False), fail_it=jnp.int32(0),
        fail_what=jnp.int32(0))
    return inp, st


def _block_start(f, st: FreeDragState, inp: DragInputs, w: int):
    """At the first step of a block (``st.inner == 0``): close the previous block (its end loss,
    the per-point done signs, the adaptive template update), the stop test, and the line search
    for the block's sub-targets q. Returns (at_start, l_end, sign, tmpl, all points done, q, the
    line-search type per point); outside a block start the state's values."""
    hp = inp.hypers
    at_start = st.inner == 0
    hw = inp.sup_size
    l_end_c, sign_c, tmpl_c = close_block(f, st, inp.targets, inp.mask, w=w, l_expected=hp.l_expected, hw=hw)
    close = at_start & st.started
    l_end = jnp.where(close, l_end_c, st.l_end)
    sign = jnp.where(close, sign_c, st.sign)
    tmpl = jnp.where(close, tmpl_c, st.tmpl)
    all_done = jnp.all(sign)
    q_ls, lt_ls = jax.vmap(lambda q, tt, tm, li, le: line_search(
        f, q, tt, tm, li, le, w=w, l_expected=hp.l_expected, d_max=hp.d_max, hw=hw))(
        st.handles, inp.targets, tmpl, st.l_ini, l_end)
    search = at_start & ~sign & inp.mask
    q = jnp.where(search[:, None], q_ls, st.handles)
    ltype = jnp.where(at_start, search & lt_ls, st.ltype)
    return at_start, l_end, sign, tmpl, all_done, q, ltype


def step(nets: DragNetworks, cfg: DragConfig, shared, edit, inp: DragInputs, st: FreeDragState) -> FreeDragState:
    """One forward: close the previous block and line-search when a block starts, then one Adam
    step (module docstring). Frozen edits return ``st``."""
    hp = inp.hypers
    sched = cfg.schedule
    t = inp.t_star
    w = cfg.r_m
    (eps, f_lat), vjp = jax.vjp(lambda z, c: sized(nets.features, inp.sizes)(shared, edit, z, c, t), st.z, st.c)
    f = upsample_features(f_lat, cfg.sup_hw, map_sizes(inp.sizes, f_lat.shape, inp.z0.shape))
    fwd_ok = jnp.all(jnp.isfinite(eps)) & jnp.all(jnp.isfinite(f_lat))
    first = st.it == 0
    eps0 = jnp.where(first, jax.lax.stop_gradient(eps), st.eps0)
    hw = inp.sup_size
    tmpl0 = jnp.where(first, jax.vmap(lambda q: patch_features(f, q, w, hw))(inp.handles0), st.tmpl)
    st = st._replace(tmpl=tmpl0)

    # ---- block start: close the previous block, stop test, line search
    at_start, l_end, sign, tmpl, all_done, q, ltype = _block_start(f, st, inp, w)

    # ---- one Adam step on this forward
    lam = background_weight(cfg, hp.lam, inp.z0, inp.latent_size)

    def local_loss(z, e, fl):
        ell = point_losses(upsample_features(fl, cfg.sup_hw, map_sizes(inp.sizes, fl.shape, inp.z0.shape)), q,
                           jax.lax.stop_gradient(tmpl), w, hw)
        ms = jnp.sum(jnp.where(inp.mask, ell, 0.0))
        bg = background_loss(ddim_step(sched, z - inp.z0, e - eps0, t), inp.keep, lam)
        return ms + bg, (ms, ell)

    (loss, (ms, ell)), (gz, geps, gf) = jax.value_and_grad(local_loss, argnums=(0, 1, 2), has_aux=True)(
        st.z, eps, f_lat)
    pz, pc = vjp((geps, gf))
    g_loss_z = gz + pz
    upd, opt_z = ADAM.update(g_loss_z + st.stale, st.opt_z)
    z_new = st.z - hp.latent_lr * upd
    l_ini = jnp.where(at_start, ell, st.l_ini)
    conv = jnp.max(jnp.where(inp.mask, ell, -jnp.inf)) < 0.5 * hp.l_expected

    c_new, opt_c, acc = st.c, st.opt_c, st.acc_c
    stale = jnp.zeros_like(st.stale)
    if cfg.stale_latent_grad:
        stale = jnp.where(conv, stale, g_loss_z)  # the else branch's second backward of L
    if cfg.optimize_text:
        # ∇_ĉ L_text's motion part: the cotangent of Σℓ alone, which is ∂L/∂F = gf (the background
        # term does not depend on F)
        pz_t, pc_t = vjp((jnp.zeros_like(geps), gf))
        text_now = conv & jnp.any(ltype & inp.mask)
        g_c = text_gradient(acc + pc + pc_t, st.c, inp.c0, inp.token_mask, hp.text_lam)
        c_step, opt_step = text_step(st.c, st.opt_c, g_c, hp.text_lr)
        c_new = jnp.where(text_now, c_step, st.c)
        opt_c = jax.tree.map(lambda a, b: jnp.where(text_now, a, b), opt_step, st.opt_c)
        twice = 2.0 if cfg.stale_latent_grad else 1.0
        acc = jnp.where(text_now, jnp.zeros_like(acc), acc + jnp.where(conv, 1.0, twice) * pc)
        loss = loss + text_loss(st.c, inp.c0, inp.token_mask, hp.text_lam)
        if cfg.stale_latent_grad:
            stale = jnp.where(text_now, pz_t, stale)  # the text backward's ∇_z(Σℓ) left in z.grad
    inner = jnp.where(conv | (st.inner + 1 >= cfg.block_steps), 0, st.inner + 1)

    live = ~st.done & ~st.failed
    checks = jnp.stack([fwd_ok, jnp.isfinite(loss), jnp.all(jnp.isfinite(z_new)), jnp.all(jnp.isfinite(c_new))])
    fail_now = live & ~jnp.all(checks) & ~(at_start & all_done & fwd_ok)
    stop_now = live & ~fail_now & at_start & all_done
    update = live & ~fail_now & ~stop_now
    finish = stop_now | (update & (st.it + 1 >= cfg.max_iters))

    def pick(new, old, cond):
        return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)

    keep_bookkeeping = live & ~fail_now  # closing a block happens even when the run stops there
    traj = jnp.where(update, st.traj.at[st.it + 1].set(q), st.traj)  # [0]: handles, [k + 1]: q of update k
    return FreeDragState(
        z=pick(z_new, st.z, update), c=pick(c_new, st.c, update), eps0=pick(eps0, st.eps0, keep_bookkeeping),
        opt_z=pick(opt_z, st.opt_z, update), opt_c=pick(opt_c, st.opt_c, update), acc_c=pick(acc, st.acc_c, update),
        stale=pick(stale, st.stale, update), handles=pick(q, st.handles, keep_bookkeeping),
        tmpl=pick(tmpl, st.tmpl, keep_bookkeeping), sign=pick(sign, st.sign, keep_bookkeeping),
        l_ini=pick(l_ini, st.l_ini, update), l_end=pick(l_end, st.l_end, keep_bookkeeping),
        ltype=pick(ltype, st.ltype, update), inner=pick(inner, st.inner, update),
        started=st.started | update, it=st.it + update.astype(jnp.int32), done=st.done | finish,
        traj=traj, losses=jnp.where(update, st.losses.at[st.it].set(loss), st.losses),
        **failure_update(st, fail_now, checks))


def run(nets: DragNetworks, cfg: DragConfig, shared, edits, inputs, state: FreeDragState,
        progress: Callable[[Any, Any], None] | None = None) -> FreeDragState:
    """``lax.while_loop`` of the batched step until every edit is done or at ``max_iters``."""
    return while_live(lambda e, i, s: step(nets, cfg, shared, e, i, s), lambda st: ~st.done & ~st.failed,
                      edits, inputs, state, progress)


def _reached(cfg: DragConfig, state: FreeDragState) -> Array:
    """(B,) bool: every pair's line search has reached its target (all signs set)."""
    return jnp.all(state.sign, axis=-1)


HOST = Host("freedrag", "FreeDrag", prepare, run, _reached, max_iters_budget, pair_plan)
