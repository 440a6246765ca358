"""The drag engine's geometry on a masked canvas: the supervision-map resize, motion supervision
(its value and latent-side gradient) and point tracking of an edit whose maps are (h, w) at the
top left of a larger array give the unpadded results, with handles at the edit's own borders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdrag.drag.losses import motion_supervision, upsample_features
from jaxdrag.models.canvas import bilinear_matrix
from jaxdrag.drag.tracking import templates, track


def _pad(a, shape, rs, fill=30.0):
    out = (fill * rs.randn(*shape)).astype(np.float32)
    out[: a.shape[0], : a.shape[1]] = a
    return out


@pytest.mark.parametrize("n_in,n_out", [(22, 43), (11, 85), (16, 64), (5, 5), (9, 37)])
def test_bilinear_matrix_equals_the_unpadded_resize(n_in, n_out):
    rs = np.random.RandomState(0)
    x = rs.randn(n_in, 3).astype(np.float32)
    ref = np.asarray(upsample_features(jnp.asarray(x[:, None, :].repeat(2, 1)), (n_out, 2)))[:, 0]
    m = np.asarray(bilinear_matrix(n_in, n_out, n_in + 3, n_out + 5))
    got = m @ np.concatenate([x, 99 * np.ones((3, 3), np.float32)])
    np.testing.assert_allclose(got[:n_out], ref, atol=1e-5)
    assert np.all(got[n_out:] == 0) and np.all(m[:, n_in:] == 0)


def test_upsample_features_on_a_canvas():
    rs = np.random.RandomState(1)
    f = rs.randn(11, 19, 4).astype(np.float32)       # a 22×37 latent's up_blocks map, say
    ref = upsample_features(jnp.asarray(f), (43, 37))
    got = upsample_features(jnp.asarray(_pad(f, (12, 24, 4), rs)), (48, 48), jnp.array([11, 19, 43, 37]))
    np.testing.assert_allclose(np.asarray(got[:43, :37]), np.asarray(ref), atol=1e-5)
    assert float(jnp.abs(got[43:]).max()) == 0.0 and float(jnp.abs(got[:, 37:]).max()) == 0.0


# handles at the edit's bottom/right border and inside; targets that pull patches past the border
HANDLES = np.array([[42.0, 20.0], [10.0, 36.0], [21.0, 9.0]], np.float32)
TARGETS = np.array([[30.0, 20.0], [10.0, 29.0], [28.0, 17.0]], np.float32)
MASK = np.array([True, True, True])


@pytest.mark.parametrize("reference", ["current", "initial"])
def test_motion_supervision_on_a_canvas(reference):
    rs = np.random.RandomState(2)
    h, w = 43, 37
    f = rs.randn(h, w, 8).astype(np.float32)
    fc = _pad(f, (48, 48, 8), rs)
    kw = dict(r=1, max_step=1.0 if reference == "current" else 4.0)
    if reference == "initial":
        from jaxdrag.drag.losses import reference_patches
        f0 = rs.randn(h, w, 8).astype(np.float32)
        kw.update(ref_patches=reference_patches(jnp.asarray(f0), jnp.asarray(HANDLES), 1),
                  ref_points=jnp.asarray(HANDLES))
    hw = jnp.array([h, w])

    def loss(x, hw_):
        return motion_supervision(x, jnp.asarray(HANDLES), jnp.asarray(TARGETS), jnp.asarray(MASK), hw=hw_, **kw)

    ref, g_ref = jax.value_and_grad(loss)(jnp.asarray(f), None)
    got, g = jax.value_and_grad(loss)(jnp.asarray(fc), hw)
    assert abs(float(got) - float(ref)) < 1e-5 * max(1.0, abs(float(ref)))
    np.testing.assert_allclose(np.asarray(g[:h, :w]), np.asarray(g_ref), atol=1e-6)
    assert float(jnp.abs(g[h:]).max()) == 0.0 and float(jnp.abs(g[:, w:]).max()) == 0.0
    # without the edit's size the border patches would read the padding
    assert abs(float(loss(jnp.asarray(fc), None)) - float(ref)) > 1e-2


@pytest.mark.parametrize("fast", [False, True])
def test_tracking_on_a_canvas_stays_inside_the_edit(fast):
    """A template planted just beyond the edit's border (in the canvas's padding) must not be
    found: the window is clipped to the edit's map, as the unpadded search is to its array."""
    rs = np.random.RandomState(3)
    h, w = 43, 37
    f0 = rs.randn(h, w, 8).astype(np.float32)
    tmpl = templates(jnp.asarray(f0), jnp.asarray(HANDLES))
    f = rs.randn(h, w, 8).astype(np.float32)
    fc = _pad(f, (48, 48, 8), rs)
    fc[43, 20] = np.asarray(tmpl[0])   # the exact template, one row below the edit
    fc[10, 37] = np.asarray(tmpl[1])   # one column right of it
    ref = track(jnp.asarray(f), tmpl, jnp.asarray(HANDLES), jnp.asarray(TARGETS), jnp.asarray(MASK), r=3, fast=fast)
    got = track(jnp.asarray(fc), tmpl, jnp.asarray(HANDLES), jnp.asarray(TARGETS), jnp.asarray(MASK), r=3,
                fast=fast, hw=jnp.array([h, w]))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    assert (np.asarray(got)[:, 0] < h).all() and (np.asarray(got)[:, 1] < w).all()
    if fast:  # fast tracking only looks closer to the target, which is inside the edit here
        return
    # without the edit's size the planted templates are found in the padding
    leak = track(jnp.asarray(fc), tmpl, jnp.asarray(HANDLES), jnp.asarray(TARGETS), jnp.asarray(MASK), r=3, fast=fast)
    assert not np.array_equal(np.asarray(leak), np.asarray(ref))
