"""The drag loop: one jitted step over a state pytree, one ``lax.while_loop``, batched over edits.

The engine is written against two pure network functions (``DragNetworks``), so it runs on a
small differentiable stand-in in tests and unchanged on the SD-1.5 UNet:

  features(shared, edit, z, c, t) -> (eps (h, w, 4), f_lat (h', w', C))
      one UNet forward: ε and the supervision feature map (``up_blocks[2]`` output for SD-1.5)
  clip_image(shared, x0) -> (P,)
      CLIP image embedding of the decoded x̂0 (only for CLIPDrag)

(each also takes ``sizes=``: the edit's valid sizes in a masked canvas, ``DragInputs.sizes``)

``shared`` (the base weights, one copy) is broadcast; ``edit`` (per-edit LoRA), the inputs and
the state carry a leading batch axis. All hyperparameters that are continuous (learning rates,
λ, λ_text, fusion weight, κ) are per-edit arrays in ``DragHypers``: a sweep is just a batch.

One iteration (ALGORITHMS.md §2, §3.3, §4), for every edit that is still live:
  1. one forward (ε_k, F_k) = features(z_k, ĉ_k)  — the only network forward of the iteration;
     at k = 0 (z = z*, ĉ = c) it also provides F0 (tracking templates, the information-preserving
     reference patches) and ε(z*) for Φ(z*), which the reference computes with a separate forward;
  2. tracking (not at k = 0): handles ← nearest neighbour of the templates in F_k;
  3. stop test: every valid pair within 2 px → the edit is done (no update);
  4. losses on that forward: motion supervision + background (local), DragText's text loss,
     CLIPDrag's global loss; their gradients are VJPs of the same forward, one per
     cotangent;
  5. CLIPDrag: fuse the local and global latent gradients; Adam steps on z (and ĉ).
Finished (or capped) edits are frozen by mask while the others continue. An edit whose forward,
loss, latent or text embedding becomes non-finite is frozen too and flagged (``failed``,
``fail_it``, ``fail_what``), so one diverging learning rate in a sweep spoils nothing else.

DragNoise (§7, ``host="dragnoise"``) is this loop with the UNet bottleneck h (the mid-block
output at (z*, c), computed once in ``prepare``) as the optimised variable instead of z: every
forward is ``features_mid(z*, ĉ, t*, h)``, Φ uses ε(h) with z = z*, and its background term is
always applied (``background="always"``). GoodDrag and FreeDrag have their own loops
(``gooddrag.py``, ``freedrag.py``); ``hosts.make_runner`` picks the one of ``cfg.host``. This
module provides two hosts (``DRAGDIFFUSION``, ``DRAGNOISE``; CLIPDrag is DragDiffusion with CLIP).

DragText gradients (§3.3): the latent gets ∇_z L with L = L_ms + L_bg; the text embedding gets
∇_ĉ(L + L_text), L_text = L_ms + n_active·λ_t·reg, as the reference computes them. The reference
also leaks ∇_z L_ms of iteration k into the latent step of k+1 (a stale gradient never cleared,
flagged QUIRK); by default we do not (the paper's update), ``stale_latent_grad=True`` reproduces it.

Ablations of the papers on this loop: ``text_feature_block`` (DragText App. H) takes ĉ's motion
term from another decoder block (a third network output, its own cotangent; the latent's gradient
is unchanged); ``snapshots`` (CLIPDrag Tables 1–2) keeps (z, ĉ, handles, it) at each iteration cap
inside the while_loop, each equal to the final state of a run with ``max_iters`` = that cap.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ..schedule import ddim_step, predict_x0
from .engine import (DragConfig, DragHypers, DragInputs, DragNetworks, Host, failure_update, max_iters_budget,
                     pair_plan, sized, while_live)
from .fusion import fuse
from .losses import (STOP_DISTANCE, background_loss, background_weight, clip_loss, map_sizes, motion_supervision,
                     reference_patches, upsample_features)
from .text import ADAM as _ADAM
from .text import text_cotangent, text_gradient, text_loss, text_step
from .tracking import templates, track

Array = jax.Array


class DragState(NamedTuple):
    z: Array
    c: Array
    eps0: Array          # (h, w, 4) ε(z*): Φ(z*) = Φ(z*, ε*) for the background term
    tmpl: Array          # (N, C) tracking templates F0[⌊p0⌋]
    ref: Array           # (N, 2r1+1, 2r1+1, C) F0 patches at p0 ("initial" reference) or (N, 0)
    opt_z: Any
    opt_c: Any
    handles: Array       # (N, 2) current handles (integer-valued)
    it: Array            # () int32 latent updates applied
    done: Array          # () bool every valid handle within 2 px of its target
    traj: Array          # (max_iters + 1, N, 2) handles after tracking at each iteration
    losses: Array        # (max_iters,) total loss at each update (NaN where none)
    stale: Array         # (h, w, 4) ∇_z L_ms of the previous iteration (stale_latent_grad only)
    failed: Array        # () bool the edit diverged (frozen, reported; the batch goes on)
    fail_it: Array       # () int32 the iteration at which it diverged
    fail_what: Array     # () int32 what became non-finite: index into FAILURES
    ref_text: Array      # (N, 2r1+1, 2r1+1, C_t): F0 patches of the text block ("initial" + text block) or (N, 0)
    snap_z: Array        # (S, *z.shape) the variable at each cap of cfg.snapshots (S = 0: none)
    snap_c: Array        # (S, T, D) ĉ at each cap
    snap_it: Array       # (S,) int32 updates made by each cap
    snap_handles: Array  # (S, N, 2) the handles at each cap


def prepare(nets: DragNetworks, cfg: DragConfig, shared, edit, z0: Array, c0: Array, handles0: Array,
            targets: Array, mask: Array, keep: Array, token_mask: Array, clip_text: Array,
            t_star: Array, hypers: DragHypers, sizes: Array | None = None) -> tuple[DragInputs, DragState]:
    """The loop's constants and initial state for one edit (no network call: F0 and Φ(z*) are
    filled in by the first iteration's forward). ``sizes``: see ``DragInputs.sizes``."""
    outs = jax.eval_shape(lambda: sized(nets.features, sizes)(shared, edit, z0, c0, t_star))
    eps_s, f_s = outs[0], outs[1]
    if cfg.text_feature_block is not None and len(outs) != 3:
        raise ValueError("text_feature_block is set but the networks return no text-block feature map "
                         "(build them with Pipeline.drag_networks(text_block=…))")
    # the optimised variable: z* itself, or DragNoise's bottleneck h = mid-block output at (z*, c)
    v0 = sized(nets.bottleneck, sizes)(shared, edit, z0, c0, t_star) if cfg.host == "dragnoise" else z0
    n = handles0.shape[0]
    ch = f_s.shape[-1]
    ref_shape = (n, 2 * cfg.r_m + 1, 2 * cfg.r_m + 1, ch) if cfg.ms_reference == "initial" else (n, 0)
    ref_text_shape = (n, 0)
    if cfg.text_feature_block is not None and cfg.ms_reference == "initial":
        ref_text_shape = (n, 2 * cfg.r_m + 1, 2 * cfg.r_m + 1, outs[2].shape[-1])
    s = len(cfg.snapshots)
    inputs = DragInputs(z0, c0, handles0, targets, mask, keep, token_mask, clip_text,
                        jnp.asarray(t_star, jnp.int32), hypers,
                        None if sizes is None else jnp.asarray(sizes, jnp.int32))
    state = DragState(
        z=v0, c=c0, eps0=jnp.zeros(eps_s.shape, jnp.float32), tmpl=jnp.zeros((n, ch), jnp.float32),
        ref=jnp.zeros(ref_shape, jnp.float32), opt_z=_ADAM.init(v0), opt_c=_ADAM.init(c0),
        handles=handles0, it=jnp.int32(0), done=jnp.bool_(False),
        traj=jnp.zeros((cfg.max_iters + 1, n, 2), jnp.float32).at[0].set(handles0),
        losses=jnp.full((cfg.max_iters,), jnp.nan, jnp.float32), stale=jnp.zeros_like(v0),
        failed=jnp.bool_(False), fail_it=jnp.int32(0), fail_what=jnp.int32(0),
        ref_text=jnp.zeros(ref_text_shape, jnp.float32),
        snap_z=jnp.broadcast_to(v0, (s,) + v0.shape), snap_c=jnp.broadcast_to(c0, (s,) + c0.shape),
        snap_it=jnp.zeros((s,), jnp.int32), snap_handles=jnp.broadcast_to(handles0, (s,) + handles0.shape))
    return inputs, state


class _Seen(NamedTuple):
    """What one iteration's forward saw: the pullback, ε and the features (latent block, the text
    block's or None), the first-iteration references, the tracked handles and which pairs are live."""
    vjp: Callable
    eps: Any
    f_lat: Any
    f_txt: Any
    fwd_ok: Any
    eps0: Any
    tmpl: Any
    ref_p: Any
    ref_t: Any
    handles: Any
    active: Any
    reached: Any


def _see(nets: DragNetworks, cfg: DragConfig, shared, edit, inp: DragInputs, st: DragState) -> _Seen:
    """The forward at (z or h, ĉ) with its pullback, the references taken at k = 0, and point
    tracking (from k = 1) of the handles on this forward's supervision features."""
    t = inp.t_star
    if cfg.host == "dragnoise":  # the variable is the bottleneck h; z stays z*
        def forward(v, c):
            return sized(nets.features_mid, inp.sizes)(shared, edit, inp.z0, c, t, v)
    else:
        def forward(v, c):
            return sized(nets.features, inp.sizes)(shared, edit, v, c, t)
    outs, vjp = jax.vjp(forward, st.z, st.c)
    eps, f_lat = outs[0], outs[1]
    split = cfg.text_feature_block is not None  # DragText App. H: ĉ's motion term on another block
    f_txt = outs[2] if split else None
    f = upsample_features(f_lat, cfg.sup_hw, map_sizes(inp.sizes, f_lat.shape, inp.z0.shape))
    fwd_ok = jnp.all(jnp.isfinite(eps)) & jnp.all(jnp.isfinite(f_lat))
    if split:
        fwd_ok = fwd_ok & jnp.all(jnp.isfinite(f_txt))

    first = st.it == 0  # z = z*, ĉ = c: this forward is the reference's F0 / Φ(z*) forward
    eps0 = jnp.where(first, jax.lax.stop_gradient(eps), st.eps0)
    tmpl = jnp.where(first, templates(f, inp.handles0), st.tmpl)
    ref_p, ref_t = st.ref, st.ref_text
    if cfg.ms_reference == "initial":
        ref_p = jnp.where(first, reference_patches(f, inp.handles0, cfg.r_m), st.ref)
        if split:
            ref_t = jnp.where(first, reference_patches(
                upsample_features(f_txt, cfg.sup_hw, map_sizes(inp.sizes, f_txt.shape, inp.z0.shape)),
                inp.handles0, cfg.r_m),
                              st.ref_text)
    tracked = track(f, tmpl, st.handles, inp.targets, inp.mask, r=cfg.r_p, fast=cfg.tracking == "fast",
                    hw=inp.sup_size)
    handles = jnp.where((st.it > 0) & fwd_ok, tracked, st.handles)
    dist = jnp.linalg.norm(inp.targets - handles, axis=-1)
    active = inp.mask & (dist >= STOP_DISTANCE)
    return _Seen(vjp, eps, f_lat, f_txt, fwd_ok, eps0, tmpl, ref_p, ref_t, handles, active, ~jnp.any(active))


def _gradients(nets: DragNetworks, cfg: DragConfig, shared, inp: DragInputs, st: DragState, s: _Seen):
    """The losses and their gradients for this iteration: the local (motion + background) loss,
    DragText's text term, CLIPDrag's global term and its fusion. Returns (loss, g_z, g_text or
    None, the stale latent gradient carried to the next iteration)."""
    hp, sched, t = inp.hypers, cfg.schedule, inp.t_star
    dragnoise = cfg.host == "dragnoise"
    split = s.f_txt is not None

    def ct(geps, gf, gtxt=None):
        """A cotangent of the forward's outputs (the text block's part zero unless given)."""
        if not split:
            return geps, gf
        return geps, gf, jnp.zeros_like(s.f_txt) if gtxt is None else gtxt

    ref = dict(ref_patches=s.ref_p, ref_points=inp.handles0) if cfg.ms_reference == "initial" else {}
    lam = background_weight(cfg, hp.lam, inp.z0, inp.latent_size)
    sup = inp.sup_size

    def local_loss(v, e, fl):
        ms = motion_supervision(upsample_features(fl, cfg.sup_hw, map_sizes(inp.sizes, fl.shape, inp.z0.shape)),
                                s.handles, inp.targets, inp.mask, r=cfg.r_m, max_step=cfg.max_step,
                                weight=cfg.ms_weight, hw=sup, **ref)
        # Φ(z) − Φ(z*) = Φ(z − z*, ε − ε*) (Φ is linear): exactly 0 where nothing changed,
        # in particular everywhere at k = 0, as in the reference (DragNoise: z = z*)
        dz = jnp.zeros_like(inp.z0) if dragnoise else v - inp.z0
        return ms + background_loss(ddim_step(sched, dz, e - s.eps0, t), inp.keep, lam)

    loss, (gz_local, geps_local, gf_local) = jax.value_and_grad(local_loss, argnums=(0, 1, 2))(
        st.z, s.eps, s.f_lat)
    cotangents = [ct(geps_local, gf_local)]
    if cfg.optimize_text:
        # ∇_ĉ(L + L_text) with L_text = L_ms + n·λ_t·reg; ∂L/∂F = ∂L_ms/∂F
        if split:  # L_text's motion term on the text block's features (App. H)
            ref_txt = dict(ref_patches=s.ref_t, ref_points=inp.handles0) if cfg.ms_reference == "initial" else {}

            def text_motion(ft):
                return motion_supervision(
                    upsample_features(ft, cfg.sup_hw, map_sizes(inp.sizes, ft.shape, inp.z0.shape)), s.handles,
                    inp.targets, inp.mask, r=cfg.r_m, max_step=cfg.max_step, weight=cfg.ms_weight, hw=sup,
                    **ref_txt)

            cotangents.append(ct(geps_local, gf_local, jax.grad(text_motion)(s.f_txt)))
        else:
            cotangents.append(text_cotangent(geps_local, gf_local, gf_local))
    if cfg.use_clip:
        def global_loss(z, e):
            return clip_loss(sized(nets.clip_image, inp.sizes)(shared, predict_x0(sched, z, e, t)), inp.clip_text,
                             hp.clip_coef)

        gloss, (gz_global, geps_global) = jax.value_and_grad(global_loss, argnums=(0, 1))(st.z, s.eps)
        cotangents.append(ct(geps_global, jnp.zeros_like(s.f_lat)))
        loss = loss + gloss
    # one pullback per cotangent (2–3 backward passes through the one forward). Not vmapped over
    # the stacked cotangents: JAX's batching rule for cuDNN attention's backward fails on the JAX
    # we pin (jax-ml/jax#38495), so a vmapped VJP would crash DragText and CLIPDrag on GPUs.
    pulled = [s.vjp(c) for c in cotangents]
    vz = [p[0] for p in pulled]
    vc = [p[1] for p in pulled]

    g_local = gz_local + vz[0]
    stale, g_text = st.stale, None
    if cfg.optimize_text:
        n_active = jnp.sum(s.active).astype(jnp.float32)
        g_text = text_gradient(vc[1], st.c, inp.c0, inp.token_mask, n_active * hp.text_lam)
        loss = loss + text_loss(st.c, inp.c0, inp.token_mask, n_active * hp.text_lam)
        if cfg.stale_latent_grad:
            g_local = g_local + st.stale
            stale = vz[1] - vz[0]  # ∇_z L_ms of this iteration, left in z.grad by the reference
    g_z = g_local
    if cfg.use_clip:
        g_z = fuse(g_local, gz_global + vz[-1], hp.fuse_weight, cfg.fusion)
    return loss, g_z, g_text, stale


def step(nets: DragNetworks, cfg: DragConfig, shared, edit, inp: DragInputs, st: DragState) -> DragState:
    """One iteration for one edit (see the module docstring): see and track (``_see``), the
    gradients (``_gradients``), the Adam updates, the divergence checks; frozen edits return ``st``."""
    hp = inp.hypers
    s = _see(nets, cfg, shared, edit, inp, st)
    loss, g_z, g_text, stale = _gradients(nets, cfg, shared, inp, st, s)
    handles, reached, fwd_ok = s.handles, s.reached, s.fwd_ok

    upd_z, opt_z = _ADAM.update(g_z, st.opt_z)
    z_new = st.z - hp.latent_lr * upd_z
    if cfg.optimize_text:
        c_new, opt_c = text_step(st.c, st.opt_c, g_text, hp.text_lr)
    else:
        opt_c, c_new = st.opt_c, st.c

    live = ~st.done & ~st.failed & (st.it < cfg.max_iters)
    # divergence: a non-finite forward, loss, latent or text embedding freezes the edit
    checks = jnp.stack([fwd_ok, jnp.isfinite(loss), jnp.all(jnp.isfinite(z_new)),
                        jnp.all(jnp.isfinite(c_new))])
    fail_now = live & ~jnp.all(checks) & ~(reached & fwd_ok)
    update = live & ~reached & ~fail_now
    live = live & ~fail_now

    def pick(new, old, cond):
        return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)

    it_new = st.it + update.astype(jnp.int32)
    z_out, c_out, h_out = pick(z_new, st.z, update), pick(c_new, st.c, update), pick(handles, st.handles, live)
    # a cap's snapshot follows the state through every step that a run with max_iters = cap would
    # also take (those begun with it < cap): it ends as exactly that run's final state
    at_cap = jnp.asarray(cfg.snapshots, jnp.int32).reshape(-1) > st.it

    def snap(new, old):
        return jnp.where(at_cap.reshape((-1,) + (1,) * new.ndim), new[None], old)

    return DragState(
        z=z_out, c=c_out,
        eps0=pick(s.eps0, st.eps0, live), tmpl=pick(s.tmpl, st.tmpl, live), ref=pick(s.ref_p, st.ref, live),
        opt_z=pick(opt_z, st.opt_z, update), opt_c=pick(opt_c, st.opt_c, update),
        handles=h_out,
        it=it_new,
        done=st.done | (live & reached),
        traj=jnp.where(live, st.traj.at[st.it].set(handles), st.traj),
        losses=jnp.where(update, st.losses.at[st.it].set(loss), st.losses),
        stale=pick(stale, st.stale, update),
        **failure_update(st, fail_now, checks),
        ref_text=pick(s.ref_t, st.ref_text, live),
        snap_z=snap(z_out, st.snap_z), snap_c=snap(c_out, st.snap_c),
        snap_it=jnp.where(at_cap, it_new, st.snap_it), snap_handles=snap(h_out, st.snap_handles))


def run(nets: DragNetworks, cfg: DragConfig, shared, edits, inputs: DragInputs, state: DragState,
        progress: Callable[[Any, Any], None] | None = None) -> DragState:
    """``lax.while_loop`` of the batched step until every edit is done or at ``max_iters``.

    Batched: ``edits``, ``inputs`` and ``state`` have a leading edit axis; ``shared`` does not.
    ``progress(it, done)`` (host callback, optional) is called once per iteration."""
    return while_live(lambda e, i, s: step(nets, cfg, shared, e, i, s),
                      lambda st: ~st.done & ~st.failed & (st.it < cfg.max_iters), edits, inputs, state, progress)


def prepare_batch(nets, cfg, shared, edits, *args):
    """``prepare`` vmapped over edits (every argument after ``shared`` has a leading edit axis)."""
    return jax.vmap(lambda e, *a: prepare(nets, cfg, shared, e, *a))(edits, *args)


def _done(cfg: DragConfig, state) -> Array:
    """(B,) bool: the stop flag (every handle within 2 px of its target)."""
    return state.done


def _dragnoise_plan(cfg: DragConfig, zt, c0, inputs, state, strength: float, reference: bool, steps: int) -> dict:
    """DragNoise's denoise (§7): from [z*, z*] with the optimised bottleneck in both rows for the
    first K − end_step steps, without mutual self-attention."""
    k = round(strength * steps)
    return dict(z_src=zt, z_edit=zt, c_src=c0, c_edit=state.c, strength=strength, reference=False,
                mid=state.z, mid_steps=max(0, k - cfg.end_step))


def _bottleneck(nets: DragNetworks, shared, edit, z0, c0, t, sizes=None):
    """DragNoise's variable before the drag: the mid-block output at (z*, c)."""
    return sized(nets.bottleneck, sizes)(shared, edit, z0, c0, t)


DRAGDIFFUSION = Host("dragdiffusion", "DragDiffusion", prepare, run, _done, max_iters_budget, pair_plan,
                     splits=True)
DRAGNOISE = Host("dragnoise", "DragNoise", prepare, run, _done, max_iters_budget, _dragnoise_plan,
                 variable="mid", variable_start=_bottleneck, splits=True, reference_attention=False,
                 guided_generation=False)
