"""The while_loop: the stop rule, the iteration cap, frozen edits, batches equal one-by-one runs,
a learning-rate sweep as a batch, the trajectory buffer, and no recompilation for new values."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdrag.drag import DragHypers, DragNetworks, make_runner, resolve, step

HW = (24, 24)


def toy_features(shared, edit, z, c, t):
    """A pointwise 'network': ε = 0.1 z (+ text), features tanh(z W) (scaled per edit)."""
    eps = 0.1 * z + 0.01 * jnp.mean(c)
    return eps, jnp.tanh(z @ shared) * edit["gain"]


NETS = DragNetworks(toy_features)
W = jnp.asarray(np.random.RandomState(0).randn(4, 8).astype(np.float32))


def _cfg(method="dragdiffusion", **over):
    cfg, hyp = resolve(method, **over)
    return dataclasses.replace(cfg, sup_hw=HW), {**hyp, "latent_lr": 0.1}


def _edit(seed, handles, targets, n_slots=None, keep=False):
    rs = np.random.RandomState(seed)
    n = n_slots or len(handles)
    h = np.zeros((n, 2), np.float32)
    t = np.zeros((n, 2), np.float32)
    m = np.zeros(n, bool)
    h[:len(handles)], t[:len(targets)], m[:len(handles)] = handles, targets, True
    kp = np.zeros(HW + (1,), np.float32)
    if keep:
        kp[:, :4] = 1.0
    return dict(z0=rs.randn(*HW, 4).astype(np.float32), c0=rs.randn(3, 5).astype(np.float32), h0=h, tg=t, mask=m,
                keep=kp, tm=np.array([1, 1, 0], np.float32), ct=np.ones(1, np.float32))


def _run(cfg, edits, hyps, gains=None, runner=None):
    prep, loop = runner or make_runner(NETS, cfg)
    st = lambda k: jnp.asarray(np.stack([e[k] for e in edits]))  # noqa: E731
    hy = DragHypers(*(jnp.asarray([h[k] for h in hyps], jnp.float32) for k in DragHypers._fields))
    ed = {"gain": jnp.asarray(gains if gains is not None else [1.0] * len(edits), jnp.float32)}
    inp, s0 = prep(W, ed, st("z0"), st("c0"), st("h0"), st("tg"), st("mask"), st("keep"), st("tm"), st("ct"),
                   jnp.full((len(edits),), 681, jnp.int32), hy)
    return loop(W, ed, inp, s0), (ed, inp, s0)


def test_reaches_target_and_stops_by_rule():
    cfg, hyp = _cfg(max_iters=200)
    out, _ = _run(cfg, [_edit(0, [[10, 8]], [[10, 14]])], [hyp])
    it = int(out.it[0])
    assert bool(out.done[0]) and 0 < it < 200
    final = np.asarray(out.handles[0, 0])
    assert np.linalg.norm(final - [10, 14]) < 2.0  # the rule: every handle within 2 px
    traj = np.asarray(out.traj[0, :it + 1, 0])
    # before the last iteration no handle was within 2 px (else it would have stopped there)
    assert (np.linalg.norm(traj[:-1] - [10, 14], axis=-1) >= 2.0).all()
    np.testing.assert_array_equal(traj[-1], final)
    losses = np.asarray(out.losses[0])
    assert np.isfinite(losses[:it]).all() and np.isnan(losses[it:]).all()


def test_iteration_cap_and_already_done_edit_is_frozen():
    cfg, hyp = _cfg(max_iters=5)
    far = _edit(1, [[3, 3]], [[20, 20]])
    near = _edit(2, [[10, 10]], [[11, 11]])  # within 2 px already: done at iteration 0
    out, (_, inp, s0) = _run(cfg, [far, near], [hyp, hyp])
    assert out.it.tolist() == [5, 0] and out.done.tolist() == [False, True]
    np.testing.assert_array_equal(out.z[1], near["z0"])  # never updated
    assert np.isfinite(np.asarray(out.losses[0])).all()
    assert np.isnan(np.asarray(out.losses[1])).all()
    np.testing.assert_array_equal(out.traj[1, 0], [[10, 10]])


def test_batch_equals_one_by_one():
    """Three different edits (own latents, text, point counts padded to 3, masks, hyperparameters
    and per-edit network parameters) in one batch equal the same edits run alone."""
    cfg, hyp = _cfg(method="dragtext", max_iters=25)
    edits = [_edit(3, [[10, 8]], [[10, 14]], n_slots=3, keep=True),
             _edit(4, [[5, 5], [18, 18]], [[9, 12], [14, 12]], n_slots=3),
             _edit(5, [[12, 3], [3, 20], [20, 3]], [[12, 9], [8, 20], [15, 8]], n_slots=3, keep=True)]
    hyps = [hyp, {**hyp, "latent_lr": 0.05, "lam": 0.3}, {**hyp, "text_lr": 0.01}]
    gains = [1.0, 0.7, 1.3]
    # Over the whole run the discrete outcome (iterations, stop flag, every tracked handle) is
    # identical. The continuous state is compared over the first two updates: XLA's programs for
    # batch sizes 3 and 1 may round differently in the last bit, and Adam turns a near-zero
    # gradient component into a full ±lr step (its update is m/√v), so on this toy network — whose
    # background and text gradients hover at zero — an ulp becomes 0.06 in z after three updates.
    short = dataclasses.replace(cfg, max_iters=2)
    batch, _ = _run(cfg, edits, hyps, gains)
    batch2, _ = _run(short, edits, hyps, gains)
    for i, e in enumerate(edits):
        n = int(e["mask"].sum())
        alone_e = {k: (v[:n] if k in ("h0", "tg", "mask") else v) for k, v in e.items()}  # unpadded
        alone, _ = _run(cfg, [alone_e], [hyps[i]], [gains[i]])
        assert int(batch.it[i]) == int(alone.it[0]) and bool(batch.done[i]) == bool(alone.done[0])
        np.testing.assert_array_equal(batch.handles[i, :n], alone.handles[0])
        np.testing.assert_array_equal(batch.traj[i, :, :n], alone.traj[0])
        alone2, _ = _run(short, [alone_e], [hyps[i]], [gains[i]])
        assert int(batch2.it[i]) == int(alone2.it[0]) == 2
        np.testing.assert_allclose(batch2.z[i], alone2.z[0], atol=1e-5)
        np.testing.assert_allclose(batch2.c[i], alone2.c[0], atol=1e-5)
        assert not np.array_equal(batch2.z[i], e["z0"])  # the two updates did move the latent


def test_lr_sweep_as_a_batch_equals_separate_runs():
    cfg, hyp = _cfg(max_iters=30)
    e = _edit(6, [[10, 8]], [[10, 14]])
    lrs = [0.02, 0.05, 0.1, 0.2]
    sweep, _ = _run(cfg, [e] * 4, [{**hyp, "latent_lr": lr} for lr in lrs])
    its = []
    for i, lr in enumerate(lrs):
        one, _ = _run(cfg, [e], [{**hyp, "latent_lr": lr}])
        np.testing.assert_allclose(sweep.z[i], one.z[0], atol=1e-5)
        assert int(sweep.it[i]) == int(one.it[0])
        its.append(int(one.it[0]))
    z = np.asarray(sweep.z).reshape(4, -1)
    assert all(np.abs(z[i] - z[j]).max() > 1e-3 for i in range(4) for j in range(i))  # the lrs mattered


def test_trajectory_records_every_handle_move():
    """The buffer equals the handles observed by stepping the same state by hand."""
    cfg, hyp = _cfg(max_iters=60)
    runner = make_runner(NETS, cfg, donate=False)  # s0 is reused below
    out, (ed, inp, s0) = _run(cfg, [_edit(0, [[10, 8]], [[10, 14]])], [hyp], runner=runner)
    one = jax.jit(lambda e, i, s: step(NETS, cfg, W, e, i, s))
    take = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
    e1, i1, s = take(ed), take(inp), take(s0)
    seen = [np.asarray(s.handles)]
    for _ in range(cfg.max_iters):
        s = one(e1, i1, s)
        seen.append(np.asarray(s.handles))
        if bool(s.done):
            break
    n = int(out.it[0]) + int(out.done[0])
    np.testing.assert_array_equal(np.asarray(out.traj[0, :n]), np.stack(seen[1:n + 1]))
    assert len({tuple(h[0]) for h in seen}) > 2  # the handle actually moved, several times
    np.testing.assert_array_equal(np.asarray(out.traj[0, n:]), 0)  # nothing written past the end


def test_no_recompilation_for_new_values():
    cfg, hyp = _cfg(max_iters=4)
    runner = make_runner(NETS, cfg)
    _run(cfg, [_edit(7, [[10, 8]], [[10, 14]])], [hyp], runner=runner)
    _run(cfg, [_edit(8, [[3, 3]], [[12, 20]])], [{**hyp, "latent_lr": 0.5, "lam": 2.0}], [0.5], runner=runner)
    assert runner[0]._cache_size() == 1 and runner[1]._cache_size() == 1


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="unknown method 'dragnose'; choose one of dragdiffusion, dragtext"):
        resolve("dragnose")
    with pytest.raises(ValueError, match=r"unknown drag setting\(s\) \['lr'\]; valid for dragtext: r_m, r_p"):
        resolve("dragtext", lr=0.1)
    # a setting of another method: named, with the method's own list
    with pytest.raises(ValueError, match=r"setting\(s\) not used by method 'dragdiffusion' \['text_lam'\]; "
                                         r"valid for dragdiffusion: r_m, r_p, max_step, ms_reference, ms_weight, "
                                         r"tracking, max_iters, background, bg_reduction, latent_lr, lam, snapshots$"):
        resolve("dragdiffusion", text_lam=0.2)
    with pytest.raises(ValueError, match=r"not used by method 'gooddrag' \['max_iters'\].*track_per_step"):
        resolve("gooddrag", max_iters=10)
    with pytest.raises(ValueError, match=r"not used by method 'freedrag\+dragtext' \['fuse_weight'\]"):
        resolve("freedrag+dragtext", fuse_weight=0.3)
    with pytest.raises(ValueError, match=r"setting d_max = -1: must be > 0"):
        resolve("freedrag", d_max=-1)
    with pytest.raises(ValueError, match="tracking must be 'nearest' or 'fast'"):
        resolve("dragtext", tracking="slow")
    cfg, hyp = resolve("clipdrag", max_iters=800, fuse_weight=0.3, fusion="code")
    assert (cfg.max_iters, cfg.fusion, cfg.r_m, cfg.r_p, hyp["fuse_weight"]) == (800, "code", 4, 12, 0.3)
