"""GoodDrag, FreeDrag and DragNoise (with and without DragText) batched over edits: a batch of
different edits (own latents, prompts, point counts padded to one slot count, masks and
hyperparameters) equals the edits run one by one, and a hyperparameter sweep run as one batch
equals separate runs. Same stand-in networks as the torch parity tests (``jaxdrag.testing.standins``)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdrag.drag import DragHypers, make_runner, resolve
from jaxdrag.testing.standins import FEATURE_NETS as NETS
from jaxdrag.testing.standins import FREE, GOOD, LAT, NOISE_NETS, SUP, T, noise_weights, standin_weights

SHORT = {"gooddrag": dict(GOOD, drag_end_step=1, track_per_step=1), "freedrag": dict(FREE, max_iters=2),
         "dragnoise": dict(max_iters=2)}
LONG = {"gooddrag": GOOD, "freedrag": dict(FREE, l_expected=1.0), "dragnoise": dict(max_iters=8)}


def _nets(method):
    return (NOISE_NETS, noise_weights()) if method.startswith("dragnoise") else (NETS, standin_weights())


def _edit(seed, handles, targets, n_slots, masked):
    rs = np.random.RandomState(seed)
    h, t, m = np.zeros((n_slots, 2), np.float32), np.zeros((n_slots, 2), np.float32), np.zeros(n_slots, bool)
    h[:len(handles)], t[:len(targets)], m[:len(handles)] = handles, targets, True
    keep = np.zeros(LAT + (1,), np.float32)
    if masked:
        keep[:, 9:] = 1.0
    return dict(z0=rs.randn(*LAT, 4).astype(np.float32), c0=rs.randn(T, 8).astype(np.float32), h0=h, tg=t, mask=m,
                keep=keep, tm=(np.arange(T) < 2 + seed % 3).astype(np.float32))


EDITS = [([[9, 9]], [[9, 17]], True), ([[9, 9], [14, 18]], [[9, 18], [10, 13]], False),
         ([[12, 8], [8, 19], [15, 10]], [[12, 14], [12, 19], [11, 14]], True)]


def _run(method, edits, hyps, **over):
    cfg, _ = resolve(method, **over)
    cfg = dataclasses.replace(cfg, sup_hw=SUP)
    nets, w = _nets(method)
    shared = {k: jnp.asarray(v) for k, v in w.items()}
    prep, loop = make_runner(nets, cfg)
    st = lambda k: jnp.asarray(np.stack([e[k] for e in edits]))  # noqa: E731
    hy = DragHypers(*(jnp.asarray([h[k] for h in hyps], jnp.float32) for k in DragHypers._fields))
    b = len(edits)
    inp, s0 = prep(shared, {}, st("z0"), st("c0"), st("h0"), st("tg"), st("mask"), st("keep"), st("tm"),
                   jnp.zeros((b, 1), jnp.float32), jnp.full((b,), 681, jnp.int32), hy)
    return jax.tree.map(np.asarray, loop(shared, {}, inp, s0))


def _hyps(method, n):
    _, hyp = resolve(method)
    vary = {"gooddrag": "latent_lr", "freedrag": "d_max", "dragnoise": "lam"}[method.split("+")[0]]
    return [{**hyp, vary: hyp[vary] * (1 + 0.5 * i), "text_lr": hyp["text_lr"] * (1 + i)} for i in range(n)]


METHODS6 = ["gooddrag", "gooddrag+dragtext", "freedrag", "freedrag+dragtext", "dragnoise", "dragnoise+dragtext"]


@pytest.mark.parametrize("method", METHODS6)
def test_batch_equals_one_by_one(method):
    host = method.split("+")[0]
    edits = [_edit(i, h, t, 4, m) for i, (h, t, m) in enumerate(EDITS)]
    hyps = _hyps(method, len(edits))
    # discrete outcome over the whole (longer) run; continuous state over a short run (Adam turns
    # last-bit differences of near-zero gradients between batch sizes into visible steps later)
    for over, exact in ((LONG[host], False), (SHORT[host], True)):
        batch = _run(method, edits, hyps, **over)
        for i, e in enumerate(edits):
            n = int(e["mask"].sum())
            alone_e = {k: (v[:n] if k in ("h0", "tg", "mask") else v) for k, v in e.items()}
            one = _run(method, [alone_e], [hyps[i]], **over)
            assert int(batch.it[i]) == int(one.it[0]) > 0 and bool(batch.done[i]) == bool(one.done[0])
            np.testing.assert_allclose(batch.handles[i, :n], one.handles[0], atol=1e-4)
            if exact:
                np.testing.assert_allclose(batch.z[i], one.z[0], atol=1e-5)
                np.testing.assert_allclose(batch.c[i], one.c[0], atol=1e-5)
                if host == "gooddrag":
                    assert int(batch.j[i]) == int(one.j[0])
                    np.testing.assert_allclose(batch.c_out[i], one.c_out[0], atol=1e-5)


@pytest.mark.parametrize("method", ["gooddrag+dragtext", "freedrag", "dragnoise+dragtext"])
def test_sweep_as_a_batch_equals_separate_runs(method):
    host = method.split("+")[0]
    e = _edit(5, *EDITS[1][:2], 2, True)
    hyps = _hyps(method, 3)
    sweep = _run(method, [e] * 3, hyps, **SHORT[host])
    for i in range(3):
        one = _run(method, [e], [hyps[i]], **SHORT[host])
        np.testing.assert_allclose(sweep.z[i], one.z[0], atol=1e-5)
        np.testing.assert_allclose(sweep.c[i], one.c[0], atol=1e-5)
        assert int(sweep.it[i]) == int(one.it[0])
    z = sweep.z.reshape(3, -1)
    assert all(np.abs(z[i] - z[j]).max() > 1e-4 for i in range(3) for j in range(i))  # the values mattered
