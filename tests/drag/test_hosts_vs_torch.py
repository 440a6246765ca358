"""GoodDrag, FreeDrag and DragNoise (each with and without DragText) equal PyTorch statements of the
reference algorithms (ALGORITHMS.md §3.4, §5, §6, §7) in ``jaxdrag.testing.torch_reference``, from the reference code's
structure: its loops, slicing, autograd with the reference's backward calls, torch.optim.Adam.

The networks are the small differentiable stand-ins of that module (DragNoise adds
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
from jaxdrag.drag import DragHypers, make_runner, resolve  # noqa: E402
from jaxdrag.testing.standins import (  # noqa: E402
    FREE, GOOD, H0, LAT, NOISE_NETS, SUP, T, T_STAR, TG, TOKEN_P, jax_bottleneck, noise_weights, rel_error,
    standin_weights)
from jaxdrag.testing.standins import FEATURE_NETS as NETS  # noqa: E402
from jaxdrag.testing.torch_reference import (  # noqa: E402
    TorchNoise, fd_each_point, fd_offsets, fd_sample, hwc, torch_freedrag, torch_gooddrag)



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
    shared = {k: jnp.asarray(v) for k, v in (weights or standin_weights()).items()}
    b = lambda a: jnp.asarray(a)[None]  # noqa: E731
    hy = DragHypers(*(jnp.full((1,), hyp[k], jnp.float32) for k in DragHypers._fields))
    with jax.default_matmul_precision("highest"):
        inp, st = prep(shared, {}, b(z0), b(c0), b(H0), b(TG), b(np.ones(2, bool)),
                       b((1 - mask_lat)[..., None]), b((np.arange(T) < TOKEN_P).astype(np.float32)),
                       b(np.zeros(1, np.float32)), jnp.array([T_STAR], jnp.int32), hy)
        out = loop(shared, {}, inp, st)
    return cfg, hyp, jax.tree.map(lambda a: np.asarray(a)[0], out)._asdict()


# ----------------------------------------------------------------------------- GoodDrag




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
    assert rel_error(out["z"], ref["z"]) < 1e-4
    assert rel_error(out["c_out"], ref["c"]) < 1e-4
    assert rel_error(out["losses"][:n], ref["losses"]) < 1e-4 and np.isnan(out["losses"][n:]).all()
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
    assert rel_error(out["losses"][:n], ref["losses"]) < 1e-3


# ----------------------------------------------------------------------------- FreeDrag




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
    assert rel_error(out["z"], ref["z"]) < 1e-4
    assert rel_error(out["c"], ref["c"]) < 1e-4
    assert rel_error(out["losses"][:n], ref["losses"]) < 1e-4
    if method.endswith("dragtext") and l_exp > 0.5:
        assert np.abs(out["c"] - c0).max() > 1e-3  # at least one text step
    if not method.endswith("dragtext"):
        np.testing.assert_array_equal(out["c"], c0)


def test_freedrag_quirk_changes_the_latent():
    z0, c0 = _inputs()
    outs = [run_jax(NETS, "freedrag", z0, c0, _mask(False), stale_latent_grad=s, **FREE)[2] for s in (False, True)]
    assert rel_error(outs[0]["z"], outs[1]["z"]) > 1e-3


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
    assert rel_error(out["losses"][:n], ref["losses"]) < 1e-3


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
    assert rel_error(out["z"], hwc(ref.z)) < 1e-4
    assert rel_error(out["c"], ref.c.detach()[0].numpy()) < 1e-4
    assert rel_error(out["losses"], ref.losses) < 1e-4
    assert rel_error(out["z"], h0) > 1e-3  # h moved
