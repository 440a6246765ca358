"""The engine's pure pieces on constructed inputs: loss values computed by hand, tracking on
planted patterns, fusion on parallel / orthogonal / opposite / zero gradient pairs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdrag.drag import (background_loss, clip_loss, fuse, motion_supervision, reference_patches,
                          templates, text_regularizer, track)

H, W, C = 20, 24, 5
A_COEF = np.array([0.3, -1.0, 2.0, 0.5, 0.0], np.float32)
B_COEF = np.array([1.0, 0.25, -0.5, 0.0, 2.0], np.float32)


def ramp(offset=0.0):
    """F[r, c, :] = a·r + b·c + offset: bilinear sampling is exact on it."""
    r, c = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    return jnp.asarray(r[..., None] * A_COEF + c[..., None] * B_COEF + offset, jnp.float32)


def pts(*rc):
    return jnp.asarray(np.array(rc, np.float32).reshape(-1, 2))


def test_motion_supervision_unit_step_on_ramp():
    f = ramp()
    m = jnp.array([True])
    # horizontal unit step: B − A = b  →  9 · mean|b|
    got = motion_supervision(f, pts(8, 8), pts(8, 14), m, r=1, max_step=1.0)
    np.testing.assert_allclose(got, 9 * np.abs(B_COEF).mean(), rtol=1e-6)
    # oblique: d = (3, 4)/5, exact bilinear on a ramp  →  9 · mean|0.6a + 0.8b|
    got = motion_supervision(f, pts(8, 8), pts(11, 12), m, r=1, max_step=1.0)
    np.testing.assert_allclose(got, 9 * np.abs(0.6 * A_COEF + 0.8 * B_COEF).mean(), rtol=1e-5)
    # negative fractional shift (floor-based weights): d = (−4, −3)/5
    got = motion_supervision(f, pts(9, 9), pts(5, 6), m, r=2, max_step=1.0)
    np.testing.assert_allclose(got, 25 * np.abs(-0.8 * A_COEF - 0.6 * B_COEF).mean(), rtol=1e-5)


def test_motion_supervision_skip_rule_mask_and_sum():
    f = ramp()
    h, t = pts(8, 8, 3, 3, 10, 10), pts(8, 14, 3, 4, 15, 10)  # second pair 1 px apart: skipped
    one = 9 * np.abs(B_COEF).mean()
    vert = 9 * np.abs(A_COEF).mean()
    got = motion_supervision(f, h, t, jnp.array([True, True, True]), r=1, max_step=1.0)
    np.testing.assert_allclose(got, one + vert, rtol=1e-6)
    got = motion_supervision(f, h, t, jnp.array([True, True, False]), r=1, max_step=1.0)
    np.testing.assert_allclose(got, one, rtol=1e-6)


def test_information_preserving_variant():
    """A = F0 at the initial handle, B = F at the current handle + min(β, dist)·unit."""
    f0, f = ramp(), ramp(offset=1.5)
    p0, p, t = pts(6, 6), pts(8, 8), pts(8, 18)  # dist 10 → step 4 along +col
    ref = reference_patches(f0, p0, 4)
    got = motion_supervision(f, p, t, jnp.array([True]), r=4, max_step=4.0, ref_patches=ref, ref_points=p0)
    # B − A = F(8+i, 12+j) + 1.5 − F0(6+i, 6+j) = 2a + 6b + 1.5
    np.testing.assert_allclose(got, 81 * np.abs(2 * A_COEF + 6 * B_COEF + 1.5).mean(), rtol=1e-5)
    # a short pair takes the whole distance: dist 3 < β
    got = motion_supervision(f, p, pts(8, 11), jnp.array([True]), r=1, max_step=4.0,
                             ref_patches=reference_patches(f0, p0, 1), ref_points=p0)
    np.testing.assert_allclose(got, 9 * np.abs(2 * A_COEF + 5 * B_COEF + 1.5).mean(), rtol=1e-5)


def _border_reference(f, f0, p, p0, t, r, beta):
    """Straight loops: a pixel counts iff its reference position is in the map and its sample
    position p + δ + d is within [0, H−1]×[0, W−1]; bilinear sampling by hand."""
    f, f0 = np.asarray(f, np.float64), np.asarray(f0, np.float64)
    d = np.asarray(t, np.float64) - p
    dist = np.linalg.norm(d)
    d = d / dist * min(beta, dist)
    tot, n = 0.0, 0
    for i, j in itertools.product(range(-r, r + 1), repeat=2):
        qy, qx = int(p0[0]) + i, int(p0[1]) + j
        sy, sx = p[0] + i + d[0], p[1] + j + d[1]
        if not (0 <= qy < H and 0 <= qx < W and 0 <= sy <= H - 1 and 0 <= sx <= W - 1):
            continue
        y0, x0 = int(np.floor(sy)), int(np.floor(sx))
        wy, wx = sy - y0, sx - x0
        g = lambda y, x: f[min(y, H - 1), min(x, W - 1)]  # noqa: E731 (zero weight when clamped)
        b = (1 - wy) * (1 - wx) * g(y0, x0) + (1 - wy) * wx * g(y0, x0 + 1) + wy * (1 - wx) * g(y0 + 1, x0) \
            + wy * wx * g(y0 + 1, x0 + 1)
        tot += np.abs(f0[qy, qx] - b).mean()
        n += 1
    return (2 * r + 1) ** 2 * tot / n, n


@pytest.mark.parametrize("p0,p,t", [((0, 0), (0, 0), (7, 5)), ((19, 23), (19, 23), (12, 15)),
                                    ((5, 20), (6, 21), (6, 23)), ((2, 1), (1, 0), (1, 9))])
def test_border_handles_count_only_valid_pixels(p0, p, t):
    f0 = jnp.asarray(np.random.RandomState(0).randn(H, W, C), jnp.float32)
    f = jnp.asarray(np.random.RandomState(1).randn(H, W, C), jnp.float32)
    r, beta = 4, 4.0
    want, n = _border_reference(f, f0, np.array(p, float), np.array(p0, float), t, r, beta)
    assert 0 < n < 81
    pp = jnp.asarray([p], jnp.float32)
    got = motion_supervision(f, pp, jnp.asarray([t], jnp.float32), jnp.array([True]), r=r, max_step=beta,
                             ref_patches=reference_patches(f0, jnp.asarray([p0], jnp.float32), r),
                             ref_points=jnp.asarray([p0], jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    g = jax.grad(lambda x: motion_supervision(x, pp, jnp.asarray([t], jnp.float32), jnp.array([True]), r=r,
                                              max_step=beta, ref_patches=reference_patches(
                                                  f0, jnp.asarray([p0], jnp.float32), r),
                                              ref_points=jnp.asarray([p0], jnp.float32)))(f)
    assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0


def test_background_text_and_clip_losses():
    rs = np.random.RandomState(0)
    phi, phi0 = rs.randn(4, 6, 4).astype(np.float32), rs.randn(4, 6, 4).astype(np.float32)
    keep = (rs.rand(4, 6, 1) > 0.5).astype(np.float32)
    np.testing.assert_allclose(background_loss(phi - phi0, keep, 0.1), 0.1 * (np.abs(phi - phi0) * keep).sum(),
                               rtol=1e-6)
    assert float(background_loss(phi - phi0, np.zeros_like(keep), 0.1)) == 0.0  # no mask, no term
    # PyTorch's subgradient: nothing changed → zero gradient (jnp.abs would give ±λ everywhere)
    g = jax.grad(lambda d: background_loss(d, keep, 0.1))(jnp.zeros_like(jnp.asarray(phi)))
    assert float(jnp.abs(g).max()) == 0.0
    c, c0 = rs.randn(77, 8).astype(np.float32), rs.randn(77, 8).astype(np.float32)
    tm = (np.arange(77) < 5).astype(np.float32)
    np.testing.assert_allclose(text_regularizer(c, c0, tm, 0.1), 0.1 * np.abs(c[:5] - c0[:5]).sum(), rtol=1e-6)
    e1, e2 = np.array([3.0, 0, 4.0]), np.array([0, 2.0, 0])
    np.testing.assert_allclose(clip_loss(jnp.asarray(e1), jnp.asarray(e2), 300.0), 300.0, rtol=1e-6)
    np.testing.assert_allclose(clip_loss(jnp.asarray(e1), jnp.asarray(2 * e1), 300.0), 0.0, atol=1e-4)


# ------------------------------------------------------------------------------ tracking


def test_tracking_recovers_planted_displacement():
    rs = np.random.RandomState(0)
    f0 = rs.randn(H, W, C).astype(np.float32)
    shift = (2, -1)
    f = np.roll(f0, shift, axis=(0, 1))
    h0 = pts(10, 10, 4, 15)
    tm = templates(jnp.asarray(f0), h0)
    new = track(jnp.asarray(f), tm, h0, pts(16, 3, 4, 20), jnp.array([True, True]), r=3)
    np.testing.assert_array_equal(new, [[12, 9], [6, 14]])
    # a padded slot keeps its position
    new = track(jnp.asarray(f), tm, h0, pts(16, 3, 4, 20), jnp.array([True, False]), r=3)
    np.testing.assert_array_equal(new, [[12, 9], [4, 15]])


def test_tracking_border_handle_and_window_clipping():
    rs = np.random.RandomState(1)
    f0 = rs.randn(H, W, C).astype(np.float32)
    f = np.roll(f0, (1, 1), axis=(0, 1))
    f[0, :] = 100.0  # rolled-in rows/cols are junk
    f[:, 0] = 100.0
    h0 = pts(0, 0, 19, 23)
    tm = templates(jnp.asarray(f0), h0)
    new = track(jnp.asarray(f), tm, h0, pts(5, 5, 10, 10), jnp.array([True, True]), r=3)
    assert new.tolist()[0] == [1, 1]
    assert all(0 <= v[0] < H and 0 <= v[1] < W for v in new.tolist())


def test_fast_tracking_never_increases_distance():
    rs = np.random.RandomState(2)
    for trial in range(30):
        f0 = rs.randn(H, W, C).astype(np.float32)
        f = rs.randn(H, W, C).astype(np.float32)  # unrelated map: the plain argmin wanders
        h = jnp.asarray(rs.randint(0, [H, W], size=(3, 2)), jnp.float32)
        t = jnp.asarray(rs.randint(0, [H, W], size=(3, 2)), jnp.float32)
        tm = templates(jnp.asarray(f0), h)
        new = track(jnp.asarray(f), tm, h, t, jnp.ones(3, bool), r=3, fast=True)
        before = np.linalg.norm(np.asarray(t - h), axis=-1)
        after = np.linalg.norm(np.asarray(t - new), axis=-1)
        assert (after <= before + 1e-6).all()
        moved = (np.asarray(new) != np.asarray(h)).any(-1)
        assert (after[moved] < before[moved]).all()  # any move is strictly closer
    # a handle on its target has no strictly closer position: it stays put
    h = pts(5, 5)
    new = track(jnp.asarray(f), templates(jnp.asarray(f0), h), h, pts(5, 5), jnp.array([True]), r=3, fast=True)
    np.testing.assert_array_equal(new, [[5, 5]])


def test_fast_tracking_takes_best_closer_candidate():
    rs = np.random.RandomState(3)
    f0 = rs.randn(H, W, C).astype(np.float32)
    f = rs.randn(H, W, C).astype(np.float32)
    h, t = pts(10, 10), pts(10, 18)
    tm = templates(jnp.asarray(f0), h)
    f[10, 8] = f0[10, 10]  # perfect match, but farther from the target
    f[11, 12] = f0[10, 10] + 0.01  # near-perfect and closer
    plain = track(jnp.asarray(f), tm, h, t, jnp.array([True]), r=3)
    fast = track(jnp.asarray(f), tm, h, t, jnp.array([True]), r=3, fast=True)
    np.testing.assert_array_equal(plain, [[10, 8]])
    np.testing.assert_array_equal(fast, [[11, 12]])


# ------------------------------------------------------------------------------ fusion

GL = jnp.array([[3.0, 4.0], [0.0, 0.0]])  # ‖G_l‖ = 5


@pytest.mark.parametrize("rule", ["paper", "code", "project", "prograd"])
def test_fusion_parallel(rule):
    np.testing.assert_allclose(fuse(GL, 2 * GL, 0.7, rule), GL, atol=1e-6)  # sin 0, no identity part


def test_fusion_baselines_of_the_ablation():
    """CLIPDrag Fig. 7a: ``add`` = G_l + λ·G_g at every angle; ``prograd`` keeps G_l when the two
    agree and removes λ× its conflicting component otherwise (no identity component)."""
    gl = np.asarray(GL).ravel()
    for gg in (2 * GL, -2 * GL, jnp.array([[-4.0, 3.0], [0.0, 0.0]]), jnp.array([[-4.0, 1.0], [1.0, 0.0]])):
        np.testing.assert_allclose(fuse(GL, gg, 0.7, "add"), GL + 0.7 * gg, atol=1e-6)
    np.testing.assert_allclose(fuse(GL, -2 * GL, 0.7, "prograd"), 0.3 * GL, atol=1e-6)  # cos −1
    ortho = jnp.array([[-4.0, 3.0], [0.0, 0.0]])  # cos 0: agreeing, G_l unchanged
    np.testing.assert_allclose(fuse(GL, ortho, 0.7, "prograd"), GL, atol=1e-6)
    agree = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(fuse(GL, agree, 0.7, "prograd"), GL, atol=1e-6)
    conflict = jnp.array([[-4.0, 1.0], [1.0, 0.0]])  # cos < 0: G_l − λ(G_l·ĝ_g)ĝ_g
    g = np.asarray(conflict).ravel()
    ug = g / np.linalg.norm(g)
    expect = gl - 0.5 * (gl @ ug) * ug  # = [3, 4, 0, 0] − 0.5·(−8/√18)·[−4, 1, 1, 0]/√18
    np.testing.assert_allclose(expect, [3 - 16 / 18, 4 + 4 / 18, 4 / 18, 0], rtol=1e-6)
    np.testing.assert_allclose(fuse(GL, conflict, 0.5, "prograd").ravel(), expect, rtol=1e-5)
    # θ undefined: prograd keeps G_l; add still adds the global gradient
    np.testing.assert_array_equal(fuse(GL, jnp.zeros_like(GL), 0.7, "prograd"), GL)
    np.testing.assert_allclose(fuse(jnp.zeros_like(GL), ortho, 0.7, "add"), 0.7 * ortho, atol=1e-7)


@pytest.mark.parametrize("rule", ["paper", "code", "project", "add"])
def test_fusion_orthogonal(rule):
    gg = jnp.array([[-4.0, 3.0], [0.0, 0.0]])  # cos 0 → agreeing branch, sin 1, all identity
    np.testing.assert_allclose(fuse(GL, gg, 0.7, rule), GL + 0.7 * gg, atol=1e-6)


def test_fusion_opposite():
    gg = -2.0 * GL  # cos −1
    # paper: G_l − λ·cos θ·G_g with cos θ = −1
    np.testing.assert_allclose(fuse(GL, gg, 0.7, "paper"), GL + 0.7 * gg, atol=1e-6)
    np.testing.assert_allclose(fuse(GL, gg, 0.7, "code"), GL - 0.7 * gg, atol=1e-6)
    np.testing.assert_allclose(fuse(GL, gg, 0.7, "project"), 0.3 * GL, atol=1e-6)  # conflicting part removed ×λ


def test_fusion_general_angle_and_zero():
    gg = jnp.array([[4.0, -3.0], [5.0, 0.0]])
    gl, g = np.asarray(GL).ravel(), np.asarray(gg).ravel()
    cos = gl @ g / (np.linalg.norm(gl) * np.linalg.norm(g))  # = 0: use a conflicting one too
    gg2 = jnp.array([[-4.0, 1.0], [1.0, 0.0]])
    g2 = np.asarray(gg2).ravel()
    cos2 = gl @ g2 / (np.linalg.norm(gl) * np.linalg.norm(g2))
    assert cos2 < 0
    np.testing.assert_allclose(fuse(GL, gg2, 0.5, "paper").ravel(), gl - 0.5 * cos2 * g2, rtol=1e-5)
    np.testing.assert_allclose(fuse(GL, gg2, 0.5, "code").ravel(), gl + 0.5 * cos2 * g2, rtol=1e-5)
    ug = g2 / np.linalg.norm(g2)
    np.testing.assert_allclose(fuse(GL, gg2, 0.5, "project").ravel(), gl - 0.5 * (gl @ ug) * ug, rtol=1e-5)
    gg3 = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    g3 = np.asarray(gg3).ravel()
    c3 = gl @ g3 / (np.linalg.norm(gl) * np.linalg.norm(g3))
    ul = gl / np.linalg.norm(gl)
    np.testing.assert_allclose(fuse(GL, gg3, 0.5, "paper").ravel(), gl + 0.5 * np.sqrt(1 - c3 ** 2) * g3, rtol=1e-5)
    np.testing.assert_allclose(fuse(GL, gg3, 0.5, "project").ravel(), gl + 0.5 * (g3 - (g3 @ ul) * ul), rtol=1e-5)
    assert cos == 0
    for rule in ("paper", "code", "project"):
        np.testing.assert_array_equal(fuse(GL, jnp.zeros_like(GL), 0.7, rule), GL)  # θ undefined
        np.testing.assert_array_equal(fuse(jnp.zeros_like(GL), gg, 0.7, rule), jnp.zeros_like(GL))
    with pytest.raises(ValueError, match="unknown fusion rule 'sum'"):
        fuse(GL, gg, 0.7, "sum")
