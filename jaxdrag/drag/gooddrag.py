"""GoodDrag: Alternating Drag and Denoising (ALGORITHMS.md §5), with DragText (§3.4), batched.

Preparation (``prepare``, one scan of ``drag_end_step`` = T2 forwards): the original trajectory
from z*: for j = 0..T2−1 at t_j = t* − 20·j, z^o_{j+1} = DDIM(z^o_j, ε^o_j); kept per j are the
tracking templates F^o_j[⌊p0_i⌋] and the motion-supervision reference patches F^o_j[⌊p0_i⌋ ± r1]
(the *original* features at the *initial* handle, "information preserving"), ε^o_j and z^o_j
(for the background term against X^o_j = Φ(z^o_j, ε^o_j)), and z^o_T2.

The drag phase is one ``lax.while_loop``; every iteration makes exactly one UNet forward
(ε, F) = features(z, ĉ, t_j) at the current timestep and then does one of two things:

* a drag iteration (the reference's ``gooddrag_step`` inner loop): on the first pass of a
  timestep, track at once (handles re-localised after the denoise); if every handle is within
  2 px or ``max_track_no_change`` trackings in a row moved nothing, stop dragging (→ denoise).
  Otherwise L = Σ_i (2r1)²·mean|A_i − B_i| (A = reference patch, B = F at p_i + d_i,
  d_i = unit·min(β, dist)) + λ·Σ|Φ(z, ε) − X^o_j|⊙(1 − m) (always applied), one Adam step on z
  (Adam reset every timestep); after every ``max_drag_per_track`` steps (or once L_drag ≤
  threshold·(2r1)²) track in F (the features *before* this step's update, as the reference),
  counting trackings that moved no handle. After ``track_per_step`` trackings the next
  iteration denoises.
* a denoise iteration: z ← DDIM(z, ε(z, ĉ), t_j), j += 1; the drag phase ends after T2
  timesteps or once dragging stopped. The reference's denoise of the pair [z^src, z] at t_j is
  this same forward for the edited branch; the source branch is the original trajectory.

DragText: ĉ starts from c at every timestep with a fresh Adam (the reference re-initialises it),
its gradient is ∇_ĉ(L + L_drag + λ_t·reg) (regulariser once per iteration); the denoise step uses
ĉ and the last ĉ is kept for the rest of the denoising (``c_out``).

The rest (steps j_end..K−1 with mutual self-attention, source branch from z^o_{j_end}) is the
pipeline's final denoise. Structure note: the reference needs one forward per drag iteration
plus one per timestep for the denoise; so does this loop (T2 extra forwards in ≤ 217).

Per edit: z (h, w, 4), ĉ (T, D), handles (N, 2) in supervision pixels; see ``loop.DragInputs``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ..schedule import ddim_step
from .engine import DragConfig, DragInputs, DragNetworks, Host, failure_update, sized, while_live
from .losses import (STOP_DISTANCE, background_loss, background_weight, map_sizes, motion_supervision,
                     reference_patches, upsample_features)
from .text import ADAM, text_cotangent, text_gradient, text_loss, text_step
from .tracking import templates, track

Array = jax.Array


class Trajectory(NamedTuple):
    """The original (un-dragged) trajectory over the drag timesteps, per edit."""

    zs: Array     # (T2 + 1, h, w, 4) z^o_j, j = 0..T2 (z^o_0 = z*)
    eps: Array    # (T2, h, w, 4) ε^o_j
    tmpl: Array   # (T2, N, C) F^o_j[⌊p0⌋]
    ref: Array    # (T2, N, 2r1+1, 2r1+1, C) F^o_j[⌊p0⌋ ± r1]


class GoodDragState(NamedTuple):
    z: Array            # (h, w, 4) the edited latent at timestep index j
    c: Array            # (T, D) ĉ of the current timestep
    c_out: Array        # (T, D) ĉ used by the last denoise (for the remaining steps)
    opt_z: Any
    opt_c: Any
    handles: Array      # (N, 2)
    j: Array            # () int32 timesteps denoised so far (the final denoise starts there)
    track_num: Array    # () int32 trackings in this timestep
    cur_drag: Array     # () int32 motion-supervision steps since the last tracking
    first: Array        # () bool first pass of this timestep (track before anything)
    pending: Array      # () bool track_per_step trackings done: the next forward denoises
    no_change: Array    # () int32 consecutive trackings that moved no handle (kept across timesteps)
    it: Array           # () int32 latent updates
    done: Array         # () bool drag phase over
    reached: Array      # () bool stopped because every handle reached its target
    traj: Array         # (budget + 1, N, 2) initial handles, then the handles after each update
    losses: Array       # (max_updates,)
    failed: Array
    fail_it: Array
    fail_what: Array


def update_budget(cfg: DragConfig) -> int:
    """The most latent updates of a drag phase: T2 timesteps × trackings × steps per tracking."""
    return cfg.drag_end_step * cfg.track_per_step * cfg.max_drag_per_track


def timestep(cfg: DragConfig, t_star: Array, j: Array) -> Array:
    """t_j = t* − j·(1000 / 50) (the DDIM timesteps after t*)."""
    s = cfg.schedule
    return (t_star - j * (s.num_train_timesteps // s.num_inference_steps)).astype(jnp.int32)


def original_trajectory(nets: DragNetworks, cfg: DragConfig, shared, edit, inp: DragInputs) -> Trajectory:
    """One scan of T2 forwards from z* with the original c (no gradient)."""
    def body(z, j):
        t = timestep(cfg, inp.t_star, j)
        eps, f_lat = sized(nets.features, inp.sizes)(shared, edit, z, inp.c0, t)
        f = upsample_features(f_lat, cfg.sup_hw, map_sizes(inp.sizes, f_lat.shape, inp.z0.shape))
        out = (z, eps, templates(f, inp.handles0), reference_patches(f, inp.handles0, cfg.r_m))
        return ddim_step(cfg.schedule, z, eps, t), out

    z_last, (zs, eps, tmpl, ref) = jax.lax.scan(body, inp.z0, jnp.arange(cfg.drag_end_step))
    zs = jnp.concatenate([zs, z_last[None]])
    return jax.tree.map(lambda a: jax.lax.stop_gradient(a.astype(jnp.float32)), Trajectory(zs, eps, tmpl, ref))


def prepare(nets: DragNetworks, cfg: DragConfig, shared, edit, z0, c0, handles0, targets, mask, keep,
            token_mask, clip_text, t_star, hypers, sizes=None) -> tuple[tuple[DragInputs, Trajectory], GoodDragState]:
    """Inputs, the original trajectory and the initial state for one edit (``sizes``: the edit's
    valid sizes in a masked canvas, ``DragInputs.sizes``)."""
    inp = DragInputs(z0, c0, handles0, targets, mask, keep, token_mask, clip_text,
                     jnp.asarray(t_star, jnp.int32), hypers, None if sizes is None else jnp.asarray(sizes, jnp.int32))
    pre = original_trajectory(nets, cfg, shared, edit, inp)
    n, m = handles0.shape[0], update_budget(cfg)
    st = GoodDragState(
        z=z0, c=c0, c_out=c0, opt_z=ADAM.init(z0), opt_c=ADAM.init(c0), handles=handles0,
        j=jnp.int32(0), track_num=jnp.int32(0), cur_drag=jnp.int32(0), first=jnp.bool_(True),
        pending=jnp.bool_(False), no_change=jnp.int32(0), it=jnp.int32(0), done=jnp.bool_(False),
        reached=jnp.bool_(False), traj=jnp.zeros((m + 1, n, 2), jnp.float32).at[0].set(handles0),
        losses=jnp.full((m,), jnp.nan, jnp.float32), failed=jnp.bool_(False), fail_it=jnp.int32(0),
        fail_what=jnp.int32(0))
    return (inp, pre), st


def _drag_update(cfg: DragConfig, inp, pre, st: GoodDragState, jj, t, eps, f_lat, vjp, handles):
    """GoodDrag's drag iteration on this forward: the motion loss against the step's reference
    patches, the background term against the step's source latent, their gradients (and
    DragText's), one Adam step of z (and ĉ). Returns (loss, L_ms, the motion weight, z, opt_z, ĉ,
    opt_c) after the update."""
    hp, sched = inp.hypers, cfg.schedule
    weight = float((2 * cfg.r_m) ** 2) if cfg.ms_weight is None else cfg.ms_weight
    lam = background_weight(cfg, hp.lam, inp.z0, inp.latent_size)
    ref = pre.ref[jj]

    # Before the first update z is the original trajectory's latent and this forward its ε: the
    # reference's two UNet calls on them are bit-identical, so |Φ − X^o_j| is exactly 0 and has no
    # gradient. Here the trajectory comes from another program (another fusion, another rounding),
    # and the L1's sign would turn that rounding noise into a full Adam step everywhere in the
    # background: the reference values are this very forward's until the first update.
    fresh = st.it == 0
    z_ref = jnp.where(fresh, jax.lax.stop_gradient(st.z), pre.zs[jj])
    eps_ref = jnp.where(fresh, jax.lax.stop_gradient(eps), pre.eps[jj])

    def local_loss(z, e, fl):
        ms = motion_supervision(upsample_features(fl, cfg.sup_hw, map_sizes(inp.sizes, fl.shape, inp.z0.shape)),
                                handles, inp.targets, inp.mask, r=cfg.r_m, max_step=cfg.max_step, weight=weight,
                                ref_patches=ref, ref_points=inp.handles0,
                                hw=inp.sup_size)
        # Φ(z, ε) − X^o_j = Φ(z − z^o_j, ε − ε^o_j): exactly 0 before the first update
        bg = background_loss(ddim_step(sched, z - z_ref, e - eps_ref, t), inp.keep, lam)
        return ms + bg, ms

    (loss, ms), (gz, geps, gf) = jax.value_and_grad(local_loss, argnums=(0, 1, 2), has_aux=True)(
        st.z, eps, f_lat)
    pulled = [vjp((geps, gf))]
    if cfg.optimize_text:
        pulled.append(vjp(text_cotangent(geps, gf, gf)))
    upd, opt_z = ADAM.update(gz + pulled[0][0], st.opt_z)
    z_drag = st.z - hp.latent_lr * upd
    c_drag, opt_c = st.c, st.opt_c
    if cfg.optimize_text:
        g_text = text_gradient(pulled[1][1], st.c, inp.c0, inp.token_mask, hp.text_lam)
        c_drag, opt_c = text_step(st.c, st.opt_c, g_text, hp.text_lr)
        loss = loss + text_loss(st.c, inp.c0, inp.token_mask, hp.text_lam)
    return loss, ms, weight, z_drag, opt_z, c_drag, opt_c


def step(nets: DragNetworks, cfg: DragConfig, shared, edit, inputs, st: GoodDragState) -> GoodDragState:
    """One forward and one drag or denoise iteration for one edit (module docstring)."""
    inp, pre = inputs
    hp = inp.hypers
    sched = cfg.schedule
    jj = jnp.minimum(st.j, cfg.drag_end_step - 1)
    t = timestep(cfg, inp.t_star, st.j)
    (eps, f_lat), vjp = jax.vjp(lambda z, c: sized(nets.features, inp.sizes)(shared, edit, z, c, t), st.z, st.c)
    f = upsample_features(f_lat, cfg.sup_hw, map_sizes(inp.sizes, f_lat.shape, inp.z0.shape))
    fwd_ok = jnp.all(jnp.isfinite(eps)) & jnp.all(jnp.isfinite(f_lat))
    tmpl = pre.tmpl[jj]

    def do_track(h):
        return track(f, tmpl, h, inp.targets, inp.mask, r=cfg.r_p, hw=inp.sup_size)

    handles = jnp.where(st.first & fwd_ok, do_track(st.handles), st.handles)
    dist = jnp.linalg.norm(inp.targets - handles, axis=-1)
    reached = ~jnp.any(inp.mask & (dist >= STOP_DISTANCE))
    stop = ~st.pending & (reached | (st.no_change >= cfg.max_track_no_change))
    denoise_now = st.pending | stop

    # ---- drag iteration: losses, gradients and the Adam updates on this forward
    loss, ms, weight, z_drag, opt_z, c_drag, opt_c = _drag_update(cfg, inp, pre, st, jj, t, eps, f_lat, vjp, handles)
    cur_drag = st.cur_drag + 1
    need_track = (cur_drag >= cfg.max_drag_per_track) | (ms <= hp.drag_loss_threshold * weight)
    tracked = jnp.where(need_track, do_track(handles), handles)  # F before this update
    moved = jnp.any(tracked != handles)
    no_change_drag = jnp.where(need_track, jnp.where(moved, 0, st.no_change + 1), st.no_change)
    track_num = st.track_num + need_track.astype(jnp.int32)

    # ---- denoise iteration
    z_den = ddim_step(sched, st.z, eps, t)
    j_next = st.j + 1
    finished = stop | (j_next >= cfg.drag_end_step) | (st.no_change >= cfg.max_track_no_change)

    live = ~st.done & ~st.failed
    checks = jnp.stack([fwd_ok, jnp.isfinite(loss) | denoise_now, jnp.all(jnp.isfinite(z_drag)) | denoise_now,
                        jnp.all(jnp.isfinite(c_drag)) | denoise_now])
    fail_now = live & ~jnp.all(checks)
    live = live & ~fail_now
    upd_now = live & ~denoise_now
    den_now = live & denoise_now

    def pick3(a_den, a_upd, old):
        return jax.tree.map(lambda d, u, o: jnp.where(den_now, d, jnp.where(upd_now, u, o)), a_den, a_upd, old)

    fresh_c = st.c if not cfg.optimize_text else inp.c0
    # traj[0] = initial handles, traj[k + 1] = the handles after update k (and its tracking); a
    # first-pass tracking that moves them after the last update overwrites the last entry
    traj = jnp.where(upd_now, st.traj.at[st.it + 1].set(tracked), st.traj)
    fin = den_now & finished
    traj = jnp.where(fin & (st.it > 0), traj.at[st.it].set(handles), traj)
    return GoodDragState(
        z=pick3(z_den, z_drag, st.z),
        c=pick3(fresh_c, c_drag, st.c),
        c_out=jnp.where(den_now, st.c, st.c_out),
        opt_z=pick3(ADAM.init(st.z), opt_z, st.opt_z),
        opt_c=pick3(ADAM.init(st.c), opt_c, st.opt_c),
        handles=pick3(handles, tracked, st.handles),
        j=jnp.where(den_now, j_next, st.j),
        track_num=pick3(jnp.int32(0), track_num, st.track_num),
        cur_drag=pick3(jnp.int32(0), jnp.where(need_track, 0, cur_drag), st.cur_drag),
        first=pick3(jnp.bool_(True), jnp.bool_(False), st.first),
        pending=pick3(jnp.bool_(False), track_num >= cfg.track_per_step, st.pending),
        no_change=pick3(st.no_change, no_change_drag, st.no_change),
        it=st.it + upd_now.astype(jnp.int32),
        done=st.done | fin,
        reached=st.reached | (den_now & stop & reached),
        traj=traj,
        losses=jnp.where(upd_now, st.losses.at[st.it].set(loss), st.losses),
        **failure_update(st, fail_now, checks))


def run(nets: DragNetworks, cfg: DragConfig, shared, edits, inputs, state: GoodDragState,
        progress: Callable[[Any, Any], None] | None = None) -> GoodDragState:
    """``lax.while_loop`` of the batched step until every edit's drag phase is over."""
    return while_live(lambda e, i, s: step(nets, cfg, shared, e, i, s), lambda st: ~st.done & ~st.failed,
                      edits, inputs, state, progress)


def _reached(cfg: DragConfig, state: GoodDragState) -> Array:
    """(B,) bool: the drag phase stopped because every handle reached its target."""
    return state.reached


def denoise_plan(cfg: DragConfig, zt, c0, inputs, state: GoodDragState, strength: float, reference: bool,
                 steps: int) -> dict:
    """The final denoise from where the drag phase stopped (timestep index j), the source branch
    from the original trajectory there, on [c, ĉ of the last denoise]."""
    _, pre = inputs
    z_src = jnp.take_along_axis(pre.zs, state.j[:, None, None, None, None], axis=1)[:, 0]
    return dict(z_src=z_src, z_edit=state.z, c_src=c0, c_edit=state.c_out, strength=strength,
                reference=reference, start=state.j)


HOST = Host("gooddrag", "GoodDrag", prepare, run, _reached, update_budget, denoise_plan)
