"""GoodDrag, FreeDrag and DragNoise (each with and without DragText) equal PyTorch statements of the
reference algorithms (ALGORITHMS.md §3.4, §5, §6, §7), written here from the reference code's
structure: its loops, slicing, autograd with the reference's backward calls, torch.optim.Adam.

The networks are the small differentiable stand-ins of ``test_drag_step_vs_torch`` (DragNoise adds
a bottleneck h = 2×2 average pool of z feeding the features and ε). Compared in float32 without a
background mask (where the L1 subgradient of a term that crosses zero makes any two
implementations part by a whole Adam step): final variables and text embeddings to 1e-4 relative,
losses per update, handle / sub-target positions and the schedule counts exactly. With a mask, the
first updates are compared tightly and the rest statistically (as in the engine's test).
"""

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from jaxdrag.drag import DragHypers, DragNetworks, make_runner, resolve  # noqa: E402
from jaxdrag.schedule import DDIM  # noqa: E402
from test_drag_step_vs_torch import LAT, SUP, T, TorchRef, _rel, _weights, jax_features  # noqa: E402

T_STAR = 681
AC = torch.from_numpy(DDIM().alphas_cumprod)
H0 = np.array([[9, 9], [14, 18]], np.float32)
TG = np.array([[9, 18], [10, 13]], np.float32)
TOKEN_P = 3


def t_alpha(t):
    return AC[t] if t >= 0 else AC[0]


def t_step(z, eps, t):
    """DDIM η = 0 from t to t − 20 (ᾱ_final = ᾱ_0 below 0)."""
    a, ap = t_alpha(t), t_alpha(t - 20)
    x0 = (z - (1 - a).sqrt() * eps) / a.sqrt()
    return ap.sqrt() * x0 + (1 - ap).sqrt() * eps


def nchw(a):
    return torch.from_numpy(np.asarray(a, np.float32)).permute(2, 0, 1)[None].contiguous()


def hwc(t):
    return t.detach()[0].permute(1, 2, 0).numpy()


def _inputs(seed=7):
    rs = np.random.RandomState(seed)
    return rs.randn(*LAT, 4).astype(np.float32), rs.randn(T, 8).astype(np.float32)


def _mask(with_mask):
    m = np.ones(LAT, np.float32)  # 1 = editable everywhere: no background term
    if with_mask:
        m[:] = 0.0
        m[1:6, 2:8] = 1.0
    return m


def run_jax(nets, method, z0, c0, mask_lat, weights=None, **over):
    cfg, hyp = resolve(method, **over)
    cfg = dataclasses.replace(cfg, sup_hw=SUP)
    prep, loop = make_runner(nets, cfg)
    shared = {k: jnp.asarray(v) for k, v in (weights or _weights()).items()}
    b = lambda a: jnp.asarray(a)[None]  # noqa: E731
    hy = DragHypers(*(jnp.full((1,), hyp[k], jnp.float32) for k in DragHypers._fields))
    with jax.default_matmul_precision("highest"):
        inp, st = prep(shared, {}, b(z0), b(c0), b(H0), b(TG), b(np.ones(2, bool)),
                       b((1 - mask_lat)[..., None]), b((np.arange(T) < TOKEN_P).astype(np.float32)),
                       b(np.zeros(1, np.float32)), jnp.array([T_STAR], jnp.int32), hy)
        out = loop(shared, {}, inp, st)
    return cfg, hyp, jax.tree.map(lambda a: np.asarray(a)[0], out)._asdict()


def torch_forward(w, z, c):
    return TorchRef.forward(SimpleNamespace(w=w), z, c)


def torch_weights():
    return {k: torch.from_numpy(v) for k, v in _weights().items()}


def interp_patch(feat, y, x, r):
    """GoodDrag's ``interpolate_feature_patch``: the (2r+1)² patch centred at (y, x), one set of
    bilinear weights."""
    x0, y0 = int(np.floor(float(x))), int(np.floor(float(y)))
    x1, y1 = x0 + 1, y0 + 1
    wts = [(x1 - x) * (y1 - y), (x1 - x) * (y - y0), (x - x0) * (y1 - y), (x - x0) * (y - y0)]
    patches = [feat[:, :, y0 - r:y0 + r + 1, x0 - r:x0 + r + 1], feat[:, :, y1 - r:y1 + r + 1, x0 - r:x0 + r + 1],
               feat[:, :, y0 - r:y0 + r + 1, x1 - r:x1 + r + 1], feat[:, :, y1 - r:y1 + r + 1, x1 - r:x1 + r + 1]]
    return sum(float(wt) * p for wt, p in zip(wts, patches))


def gd_track(f0, f1, handles, handles_init, r2):
    """GoodDrag's ``point_tracking``: L1 argmin in the (2r2+1)² window (no boundary clipping)."""
    out = []
    for pi0, pi in zip(handles_init, handles):
        q = f0[:, :, int(pi0[0]), int(pi0[1])][..., None, None]
        win = f1[:, :, int(pi[0]) - r2:int(pi[0]) + r2 + 1, int(pi[1]) - r2:int(pi[1]) + r2 + 1]
        dist = (q - win).abs().sum(1)[0]
        row, col = divmod(int(dist.argmin()), dist.shape[-1])
        out.append(torch.tensor([pi[0] - r2 + row, pi[1] - r2 + col]))
    return out


# ----------------------------------------------------------------------------- GoodDrag


def torch_gooddrag(cfg, hyp, z0, c0, mask_lat):
    """The drag phase of ``GoodDragger.good_drag`` (DragText's copy) on the stand-in network.
    Returns the latent and ĉ where the MasaCtrl denoising would take over, the timestep index
    there, the handles, the losses of every update and a log of the schedule."""
    w = torch_weights()
    m = torch.from_numpy(mask_lat)[None, None]
    c0t = torch.from_numpy(c0)[None]
    r1, r2, beta, t2 = cfg.r_m, cfg.r_p, cfg.max_step, cfg.drag_end_step
    ts = [T_STAR - 20 * j for j in range(t2 + 1)]
    feats, prev_out = {}, {}
    with torch.no_grad():  # get_original_features: i ≤ t2
        z = nchw(z0)
        for j, t in enumerate(ts):
            eps, f = torch_forward(w, z, c0t)
            z = t_step(z, eps, t)
            feats[j], prev_out[j] = f, z
    h_init = [torch.from_numpy(p) for p in H0]
    handles = [p.clone() for p in h_init]
    targets = [torch.from_numpy(p) for p in TG]
    init, orig = nchw(z0), nchw(z0)
    target_emb = c0t
    log, losses = [], []
    state = dict(do_drag=True, no_change=0)

    def reached(hs):
        return all(float((p - q).norm()) < 2.0 for p, q in zip(hs, targets))

    def gooddrag_step(j, init, handles):
        t = ts[j]
        z = init.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=hyp["latent_lr"])
        if cfg.optimize_text:
            ce = c0t.clone().requires_grad_(True)
            opt_c = torch.optim.Adam([ce], lr=hyp["text_lr"])
        else:
            ce = c0t
        first, track_num, cur = True, 0, 0
        while track_num < cfg.track_per_step:
            opt.zero_grad()
            if cfg.optimize_text:
                opt_c.zero_grad()
            # the forward sees a copy of z (the reference's fp16 autocast makes one), so the
            # in-place Adam step between the two backward passes leaves the graph valid
            eps, f1 = torch_forward(w, z.clone(), ce)
            x_prev = t_step(z, eps, t)
            if first:
                first = False
                handles = gd_track(feats[j], f1.detach(), handles, h_init, r2)
                log.append(("track", j))
            if reached(handles):
                state["do_drag"] = False
                break
            if state["no_change"] == cfg.max_track_no_change:
                state["do_drag"] = False
                break
            drag = 0.0
            for i in range(len(handles)):
                pi, ti = handles[i], targets[i]
                if float((ti - pi).norm()) < 2.0:
                    continue
                di = (ti - pi) / (ti - pi).norm() * min(beta, float((ti - pi).norm()))
                q = h_init[i]
                a = feats[j][:, :, int(q[0]) - r1:int(q[0]) + r1 + 1, int(q[1]) - r1:int(q[1]) + r1 + 1].detach()
                b = interp_patch(f1, pi[0] + di[0], pi[1] + di[1], r1)
                drag = drag + (2 * r1) ** 2 * F.l1_loss(a, b)
            loss = drag + hyp["lam"] * ((x_prev - prev_out[j]) * (1.0 - m)).abs().sum()
            total = float(loss.detach())
            if cfg.optimize_text:
                reg = hyp["text_lam"] * (c0t[:, :TOKEN_P] - ce[:, :TOKEN_P]).abs().sum()
                loss_text = drag + reg  # the motion term on a clone of F1: same value and graph
                total += float(reg.detach())
                loss.backward(retain_graph=True)
                opt.step()
                loss_text.backward()
                opt_c.step()
            else:
                loss.backward()
                opt.step()
            losses.append(total)
            log.append(("update", j))
            cur += 1
            if cur == cfg.max_drag_per_track or float(drag.detach()) <= hyp["drag_loss_threshold"] * (2 * r1) ** 2:
                track_num += 1
                old = [p.clone() for p in handles]
                handles = gd_track(feats[j], f1.detach(), handles, h_init, r2)
                log.append(("track", j))
                moved = any(not torch.equal(p, q) for p, q in zip(handles, old))
                state["no_change"] = 0 if moved else state["no_change"] + 1
                cur = 0
        return z.detach(), handles, ce.detach()

    j_end = None
    for j, t in enumerate(ts[:t2] + [None]):
        if j < t2 and state["do_drag"] and state["no_change"] != cfg.max_track_no_change:
            init, handles, target_emb = gooddrag_step(j, init, handles)
        else:
            j_end = j  # MasaCtrl would be registered here: the drag phase is over
            break
        with torch.no_grad():
            eps_pair = torch_forward(w, torch.cat([orig, init]), torch.cat([c0t, target_emb]))[0]
            init = t_step(init, eps_pair[1:], t)
            orig = t_step(orig, eps_pair[:1], t)
        log.append(("denoise", j))
    return dict(z=hwc(init), c=target_emb[0].numpy(), j=j_end, handles=torch.stack(handles).numpy(),
                losses=np.array(losses), log=log, orig=hwc(orig))


GOOD = dict(r_m=2, r_p=3, drag_end_step=2, track_per_step=3, max_drag_per_track=2)
NETS = DragNetworks(jax_features)


@pytest.mark.parametrize("method", ["gooddrag", "gooddrag+dragtext"])
@pytest.mark.parametrize("no_change", [5, 1])
def test_gooddrag_equals_torch_reference(method, no_change):
    z0, c0 = _inputs()
    mask = _mask(False)
    cfg, hyp, out = run_jax(NETS, method, z0, c0, mask, max_track_no_change=no_change, **GOOD)
    ref = torch_gooddrag(cfg, hyp, z0, c0, mask)
    n = len(ref["losses"])
    assert int(out["it"]) == n and int(out["j"]) == ref["j"]
    np.testing.assert_array_equal(out["handles"], ref["handles"])
    assert _rel(out["z"], ref["z"]) < 1e-4
    assert _rel(out["c_out"], ref["c"]) < 1e-4
    assert _rel(out["losses"][:n], ref["losses"]) < 1e-4 and np.isnan(out["losses"][n:]).all()
    np.testing.assert_array_equal(out["traj"][0], H0)  # initial handles, then after each update
    np.testing.assert_array_equal(out["traj"][n], ref["handles"])
    if no_change == 5:  # nothing stops early: 2 timesteps × 3 trackings × 2 steps, a denoise each
        assert n == 12 and ref["j"] == 2
        assert [e for e, _ in ref["log"]].count("track") == 2 * (3 + 1)
    else:  # one tracking that moved nothing ends the drag phase
        assert n < 12
    if method.endswith("dragtext"):
        assert np.abs(out["c_out"] - c0).max() > 1e-4


def test_gooddrag_with_mask_equals_torch_reference():
    z0, c0 = _inputs()
    mask = _mask(True)
    cfg, hyp, out = run_jax(NETS, "gooddrag+dragtext", z0, c0, mask, **GOOD)
    ref = torch_gooddrag(cfg, hyp, z0, c0, mask)
    n = len(ref["losses"])
    assert int(out["it"]) == n and int(out["j"]) == ref["j"]
    np.testing.assert_array_equal(out["handles"], ref["handles"])
    d = np.abs(out["z"] - ref["z"])
    assert np.mean(d < 1e-4 * np.abs(ref["z"]).max()) >= 0.99
    assert _rel(out["losses"][:n], ref["losses"]) < 1e-3


# ----------------------------------------------------------------------------- FreeDrag


def fd_sample(feature, position):
    """FreeDrag's ``get_features_plus``: bilinear samples (N, C) at (N, 2) (row, col) points."""
    y, x = position[:, 0], position[:, 1]
    x0, y0 = x.long(), y.long()
    x1, y1 = x0 + 1, y0 + 1
    wa = ((x1.float() - x) * (y1.float() - y))[:, None]
    wb = ((x1.float() - x) * (y - y0.float()))[:, None]
    wc = ((x - x0.float()) * (y1.float() - y))[:, None]
    wd = ((x - x0.float()) * (y - y0.float()))[:, None]
    f = feature[0]
    return (f[:, y0, x0].T * wa + f[:, y1, x0].T * wb + f[:, y0, x1].T * wc + f[:, y1, x1].T * wd)


def fd_offsets(win_r):
    k = torch.linspace(-win_r, win_r, steps=2 * win_r + 1)
    return torch.stack([k.repeat_interleave(2 * win_r + 1), k.repeat(2 * win_r + 1)], 1)


def fd_each_point(current, target, L, fmap, d_max, tmpl, l_ini, l_end, local, thr):
    """FreeDrag's ``get_each_point``: the line search of one pair → (new sub-target, ltype, branch)."""
    s = torch.arange(1, 11, dtype=torch.float32)[:, None] / 10

    def cands(start, reach):
        d = (start - target).pow(2).sum().sqrt()
        end = start + min(float(reach / (d + 1e-8)), 1.0) * (target - start)
        pts = (1 - s) * start[None] + s * end[None]
        feats = fd_sample(fmap, (pts.repeat_interleave(local.shape[0], 0) + local.repeat(10, 1))).reshape(10, -1)
        return pts, (feats - tmpl.flatten()[None]).abs().mean(1)

    if l_end < thr:
        pts, dif = cands(current, d_max)
        return pts[torch.argmin((dif - L).abs())], True, "normal"
    if l_end < l_ini:
        return current, True, "stay"
    d = (current - target).pow(2).sum().sqrt()
    back = current - min(float(d_max / (d + 1e-8)), 1.0) * (target - current)
    pts, dif = cands(back, 2 * d_max)
    return pts[torch.argmin(dif)], False, "backtrack"


def torch_freedrag(cfg, hyp, z0, c0, mask_lat, code=False):
    """``freedrag_update`` (DragText's copy) on the stand-in network. ``code``: with the code's
    second backward in the non-converged branch and the text backward's latent gradient left
    for the next step (the QUIRK); without, the paper's update."""
    w = torch_weights()
    m = torch.from_numpy(mask_lat)[None, None]
    L, d_max = hyp["l_expected"], hyp["d_max"]
    text_emb = torch.from_numpy(c0)[None]
    if cfg.optimize_text:
        target_emb = text_emb.clone().requires_grad_(True)
        text_opt = torch.optim.Adam([target_emb], lr=hyp["text_lr"])
    else:
        target_emb = text_emb
    z = nchw(z0)
    with torch.no_grad():
        eps, F0 = torch_forward(w, z, target_emb)
        x_prev_0 = t_step(z, eps, T_STAR)
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=hyp["latent_lr"])
    n = len(H0)
    sign = torch.zeros(n)
    thr_d, thr_l = 2, 0.5 * L
    aa, bb = np.log(9.0) / (0.6 * L), 0.2 * L
    local = fd_offsets(cfg.r_m)
    loss_ini, loss_end = torch.zeros(n), torch.zeros(n)
    cur = torch.from_numpy(H0).clone()
    targets = torch.from_numpy(TG)
    current_F = F0.clone()
    tmpl = [fd_sample(F0, cur[k] + local) for k in range(n)]
    step_idx, losses, branches, blocks = 0, [], [], []
    while True:
        if torch.all(sign == 1) or step_idx > cfg.max_iters:
            break
        ltype = torch.zeros(n, dtype=torch.bool)
        for k in range(n):
            if sign[k] == 0:
                cur[k], ltype[k], br = fd_each_point(cur[k].clone(), targets[k], L, current_F, d_max, tmpl[k],
                                                     loss_ini[k], loss_end[k], local, thr_l)
                branches.append(br)
        steps_in_block = 0
        for step in range(cfg.block_steps):
            step_idx += 1
            if step_idx > cfg.max_iters:
                break
            eps, F1 = torch_forward(w, z.clone(), target_emb)
            x_prev = t_step(z, eps, T_STAR)
            sup = torch.zeros(n)
            feats = []
            for k in range(n):
                feats.append(fd_sample(F1, cur[k] + local))
                sup[k] = F.l1_loss(feats[k], tmpl[k].detach())
            loss = sup.sum()
            if torch.any(m != 0):
                loss = loss + hyp["lam"] * ((x_prev - x_prev_0) * (1.0 - m)).abs().mean()
            total = float(loss.detach())
            if cfg.optimize_text:
                loss_text = torch.stack([F.l1_loss(fk.clone(), tk.clone()) for fk, tk in zip(feats, tmpl)]).sum()
                reg = hyp["text_lam"] * (text_emb[:, :TOKEN_P] - target_emb[:, :TOKEN_P]).abs().sum()
                loss_text = loss_text + reg
                total += float(reg.detach())
            loss.backward(retain_graph=True)
            opt.step()
            opt.zero_grad()
            losses.append(total)
            steps_in_block += 1
            if step == 0:
                loss_ini = sup.detach().clone()
            conv = float(sup.max().detach()) < thr_l
            if conv and not cfg.optimize_text:
                break
            elif conv and not torch.any(ltype):
                break
            elif conv:
                loss_text.backward()
                text_opt.step()
                text_opt.zero_grad()
                if not code:
                    opt.zero_grad()
                break
            elif code:
                loss.backward()
        blocks.append(steps_in_block)
        with torch.no_grad():
            _, F1 = torch_forward(w, z, target_emb)
            feats = [fd_sample(F1, cur[k] + local) for k in range(n)]
            for k in range(n):
                loss_end[k] = F.l1_loss(feats[k], tmpl[k])
        dist = (cur - targets).pow(2).sum(1).sqrt()
        sign = ((dist < thr_d) & (loss_end <= thr_l)).float()
        for k in range(n):
            g = 1.0 if sign[k] == 1 else float(1 / (1 + np.exp(aa * (float(loss_end[k]) - bb))))
            tmpl[k] = g * feats[k] + (1 - g) * tmpl[k]
        current_F = F1
    return dict(z=hwc(z), c=target_emb.detach()[0].numpy(), q=cur.numpy(), losses=np.array(losses),
                branches=branches, blocks=blocks, sign=sign.numpy())


FREE = dict(r_m=2, max_iters=14, block_steps=3)


# cases: every run ends with both pairs done (sign = 1) or at the cap; text steps happen in the
# DragText cases (one per converged block with a non-backtrack line search)
FREE_CASES = [("freedrag", False, 1.0, 0.01), ("freedrag", True, 1.0, 0.05), ("freedrag", False, 0.5, 0.05),
              ("freedrag+dragtext", False, 1.0, 0.05), ("freedrag+dragtext", True, 0.8, 0.01),
              ("freedrag+dragtext", False, 0.5, 0.05)]


@pytest.mark.parametrize("method,stale,l_exp,lr", FREE_CASES)
def test_freedrag_equals_torch_reference(method, stale, l_exp, lr):
    z0, c0 = _inputs()
    mask = _mask(False)
    cfg, hyp, out = run_jax(NETS, method, z0, c0, mask, stale_latent_grad=stale, l_expected=l_exp,
                            latent_lr=lr, **FREE)
    ref = torch_freedrag(cfg, hyp, z0, c0, mask, code=stale)
    n = len(ref["losses"])
    assert int(out["it"]) == n and bool(out["done"])
    np.testing.assert_allclose(out["handles"], ref["q"], atol=1e-4)
    np.testing.assert_array_equal(out["traj"][0], H0)
    np.testing.assert_allclose(out["traj"][n], ref["q"], atol=1e-4)
    np.testing.assert_array_equal(out["sign"], ref["sign"] == 1)
    assert _rel(out["z"], ref["z"]) < 1e-4
    assert _rel(out["c"], ref["c"]) < 1e-4
    assert _rel(out["losses"][:n], ref["losses"]) < 1e-4
    if method.endswith("dragtext") and l_exp > 0.5:
        assert np.abs(out["c"] - c0).max() > 1e-3  # at least one text step
    if not method.endswith("dragtext"):
        np.testing.assert_array_equal(out["c"], c0)


def test_freedrag_quirk_changes_the_latent():
    z0, c0 = _inputs()
    outs = [run_jax(NETS, "freedrag", z0, c0, _mask(False), stale_latent_grad=s, **FREE)[2] for s in (False, True)]
    assert _rel(outs[0]["z"], outs[1]["z"]) > 1e-3


def test_freedrag_with_mask_equals_torch_reference():
    z0, c0 = _inputs()
    mask = _mask(True)
    cfg, hyp, out = run_jax(NETS, "freedrag+dragtext", z0, c0, mask, l_expected=1.0, latent_lr=0.05, **FREE)
    ref = torch_freedrag(cfg, hyp, z0, c0, mask)
    n = len(ref["losses"])
    assert int(out["it"]) == n
    np.testing.assert_allclose(out["handles"], ref["q"], atol=1e-4)
    d = np.abs(out["z"] - ref["z"])
    assert np.mean(d < 1e-4 * np.abs(ref["z"]).max()) >= 0.99
    assert _rel(out["losses"][:n], ref["losses"]) < 1e-3


@pytest.mark.parametrize("l_ini,l_end,branch", [(0.0, 0.1, "normal"), (0.9, 0.6, "stay"), (0.5, 0.7, "backtrack")])
def test_freedrag_line_search_equals_torch(l_ini, l_end, branch):
    """One pair's line search on a random feature map and template, each branch, against
    ``get_each_point``: the same sub-target (to rounding) and ltype."""
    from jaxdrag.drag.freedrag import line_search

    rs = np.random.RandomState(3)
    f = rs.rand(*SUP, 5).astype(np.float32)
    tmpl = rs.rand(25, 5).astype(np.float32)
    q, t = np.array([11.0, 9.0], np.float32), np.array([13.5, 21.0], np.float32)
    L, d_max = 0.3, 5.0
    new, ltype = line_search(jnp.asarray(f), jnp.asarray(q), jnp.asarray(t), jnp.asarray(tmpl), jnp.float32(l_ini),
                             jnp.float32(l_end), w=2, l_expected=L, d_max=d_max)
    ref, ref_ltype, ref_branch = fd_each_point(torch.from_numpy(q), torch.from_numpy(t), L,
                                               torch.from_numpy(f).permute(2, 0, 1)[None], d_max,
                                               torch.from_numpy(tmpl), torch.tensor(l_ini), torch.tensor(l_end),
                                               fd_offsets(2), 0.5 * L)
    assert ref_branch == branch and bool(ltype) == ref_ltype
    np.testing.assert_allclose(np.asarray(new), ref.numpy(), atol=1e-5)
    if branch != "stay":
        assert np.abs(np.asarray(new) - q).max() > 0.1


def test_freedrag_template_update_equals_formula():
    """T ← γ·S(F, q + Q) + (1 − γ)·T with γ = 1/(1 + exp(a(ℓ_end − b))) (1 for a done pair),
    a = ln 9/(0.6 L), b = 0.2 L: γ = 3/4, 1/2, 1/4 at ℓ_end = b − 0.3L, b, b + 0.3L; then ℓ_end, the
    signs and the new templates on a random map against the formula with FreeDrag's sampler."""
    from jaxdrag.drag.freedrag import close_block, template_weight

    L = 1.0
    g = np.asarray(template_weight(jnp.array([0.2 - 0.3, 0.2, 0.2 + 0.3, 5.0]), jnp.array([False] * 3 + [True]), L))
    np.testing.assert_allclose(g, [0.75, 0.5, 0.25, 1.0], atol=1e-6)  # e^{±a·0.3} = 9^{±1/2} = 3
    rs = np.random.RandomState(4)
    f = rs.rand(*SUP, 3).astype(np.float32)
    q = np.array([[6.0, 7.0], [12.0, 20.5]], np.float32)
    tg = np.array([[6.0, 8.0], [20.0, 20.5]], np.float32)
    tmpl = rs.rand(2, 9, 3).astype(np.float32)
    st = SimpleNamespace(handles=jnp.asarray(q), tmpl=jnp.asarray(tmpl))
    l_end, sign, new = close_block(jnp.asarray(f), st, jnp.asarray(tg), jnp.ones(2, bool), w=1, l_expected=L)
    ft = torch.from_numpy(f).permute(2, 0, 1)[None]
    for k in range(2):
        cur = fd_sample(ft, torch.from_numpy(q[k]) + fd_offsets(1)).numpy()
        le = np.abs(cur - tmpl[k]).mean()
        done = np.linalg.norm(q[k] - tg[k]) < 2 and le <= 0.5 * L
        gk = 1.0 if done else 1 / (1 + np.exp(np.log(9) / (0.6 * L) * (le - 0.2 * L)))
        assert abs(float(l_end[k]) - le) < 1e-6 and bool(sign[k]) == done
        np.testing.assert_allclose(np.asarray(new[k]), gk * cur + (1 - gk) * tmpl[k], atol=1e-6)
    assert bool(sign[0]) and not bool(sign[1])


# ----------------------------------------------------------------------------- DragNoise


def noise_weights():
    rs = np.random.RandomState(1)
    return {**_weights(), "Wh": rs.randn(4, 6).astype(np.float32) * 0.5, "Wk": rs.randn(4, 4).astype(np.float32)}


def jax_bottleneck(shared, edit, z, c, t):
    """The stand-in's bottleneck h: z average-pooled 2×2, (6, 7, 4)."""
    return z.reshape(LAT[0] // 2, 2, LAT[1] // 2, 2, 4).mean((1, 3))


def jax_features_mid(shared, edit, z, c, t, h):
    k = jnp.transpose(shared["W1"], (2, 3, 1, 0))
    u = jax.lax.conv_general_dilated(z[None], k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)[0]
    hu = jnp.repeat(jnp.repeat(h, 2, 0), 2, 1)
    f = jnp.tanh(u + jnp.mean(c, 0) @ shared["Wc"] + hu @ shared["Wh"])
    g = jnp.mean(z, (0, 1)) @ shared["Wg"] + jnp.mean(h, (0, 1)) @ shared["Wk"]
    eps = 0.5 * jnp.tanh(z @ shared["W2"] + c[0] @ shared["We"] + g)
    return eps, f


NOISE_NETS = DragNetworks(lambda s, e, z, c, t: jax_features_mid(s, e, z, c, t, jax_bottleneck(s, e, z, c, t)),
                          features_mid=jax_features_mid, bottleneck=jax_bottleneck)


class TorchNoise(TorchRef):
    """DragNoise on the stand-in: DragDiffusion's iteration (and DragText's two backward passes)
    with the bottleneck h as the optimised variable, z fixed at z*, the background term always."""

    def __init__(self, zstar, *args, **kw):
        self.zs = nchw(zstar)
        super().__init__(*args, **kw)

    def forward(self, h, c):
        z, w = self.zs, self.w
        hu = F.interpolate(h, scale_factor=2, mode="nearest")
        u = (F.conv2d(z, w["W1"], padding=1) + (c.mean(1) @ w["Wc"])[:, :, None, None]
             + (hu.permute(0, 2, 3, 1) @ w["Wh"]).permute(0, 3, 1, 2))
        g = (z.mean((2, 3)) @ w["Wg"] + h.mean((2, 3)) @ w["Wk"])[:, None, None]
        eps = 0.5 * torch.tanh((z.permute(0, 2, 3, 1) @ w["W2"] + (c[:, 0] @ w["We"])[:, None, None] + g)
                               ).permute(0, 3, 1, 2)
        return eps, F.interpolate(torch.tanh(u), SUP, mode="bilinear", align_corners=False)

    def step(self, h, eps):
        return TorchRef.step(self, self.zs, eps)


@pytest.mark.parametrize("method,stale", [("dragnoise", False), ("dragnoise+dragtext", False),
                                          ("dragnoise+dragtext", True)])
def test_dragnoise_equals_torch_reference(method, stale):
    z0, c0 = _inputs()
    mask = _mask(False)
    w = noise_weights()
    iters = 4
    cfg, hyp, out = run_jax(NOISE_NETS, method, z0, c0, mask, weights=w, max_iters=iters,
                            **({"stale_latent_grad": stale} if "dragtext" in method else {}))
    h0 = np.array(jax_bottleneck(None, None, jnp.asarray(z0), None, None))
    ref = TorchNoise(z0, w, method, dataclasses.replace(cfg, stale_latent_grad=stale), hyp, h0, c0, H0, TG, mask,
                     TOKEN_P, np.zeros(1, np.float32), stale)
    ran = sum(1 for k in range(iters) if ref.iterate(k))
    assert ran == iters == int(out["it"])
    assert out["z"].shape == (6, 7, 4)  # the variable is the bottleneck
    np.testing.assert_array_equal(out["handles"], ref.h.numpy())
    assert _rel(out["z"], hwc(ref.z)) < 1e-4
    assert _rel(out["c"], ref.c.detach()[0].numpy()) < 1e-4
    assert _rel(out["losses"], ref.losses) < 1e-4
    assert _rel(out["z"], h0) > 1e-3  # h moved
