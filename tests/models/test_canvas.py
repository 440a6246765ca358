"""Masked canvases (``models.canvas``): each network run on a canvas holding edits of different
sizes gives, inside every edit's valid region, the numbers of the unpadded run (fp32, ≤ 1e-5),
whatever the padding holds; odd sizes exercise diffusers' size-forwarded upsampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdrag.models.canvas import decoder_canvas, encoder_canvas, nearest_sources, unet_canvas
from jaxdrag.data.geometry import nearest_indices

TOL = 1e-5


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


def _on_canvas(parts, canvas_hw, rs, fill=50.0):
    """Arrays (h, w, C) at the top left of a (B, H, W, C) canvas whose padding is loud noise."""
    H, W = canvas_hw
    out = (fill * rs.randn(len(parts), H, W, parts[0].shape[-1])).astype(np.float32)
    for i, p in enumerate(parts):
        out[i, : p.shape[0], : p.shape[1]] = p
    return out


def test_nearest_sources_are_pytorchs_rule():
    for n_in, n_out in ((22, 43), (6, 11), (19, 37), (32, 64), (1, 3)):
        got = np.asarray(nearest_sources(jnp.array([n_in]), jnp.array([n_out]), n_out))[0]
        np.testing.assert_array_equal(got, nearest_indices(n_in, n_out))


def test_canvas_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="multiples of 8"):
        unet_canvas([[43, 64]], (44, 64))
    with pytest.raises(ValueError, match=r"do not fit the canvas 48×64"):
        unet_canvas([[43, 65]], (48, 64))


@pytest.fixture(scope="module")
def unet(tiny_pipe):
    m = nnx.merge(tiny_pipe.sd.unet.graphdef,
                  jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tiny_pipe.sd.unet.lora),
                  tiny_pipe.sd.unet.params)
    run = jax.jit(lambda x, t, c, canvas, ref: m(x, t, c, canvas=canvas, reference_attention=ref),
                  static_argnums=(4,))
    return run, tiny_pipe.sd.unet.cfg.cross_attention_dim


@pytest.mark.parametrize("canvas_hw,sizes,reference", [
    ((48, 64), [(43, 64), (40, 37)], False),   # two sizes in one batch, odd at every level
    ((64, 48), [(64, 37), (64, 37)], True),    # reference attention: row 0's keys, masked
])
def test_unet_on_a_canvas_equals_each_edit_alone(unet, canvas_hw, sizes, reference):
    run, d = unet
    rs = np.random.RandomState(0)
    lat = [rs.randn(h, w, 4).astype(np.float32) for h, w in sizes]
    ctx = rs.randn(len(sizes), 77, d).astype(np.float32)
    t = jnp.array([701, 261][: len(sizes)])
    canvas = unet_canvas(np.array(sizes), canvas_hw)
    eps, taps = run(_on_canvas(lat, canvas_hw, rs), t, ctx, canvas, reference)
    groups = [[0, 1]] if reference else [[0], [1]]  # reference attention: the batch as it is
    for idx in groups:
        h, w = sizes[idx[0]]
        e1, t1 = run(np.stack([lat[i] for i in idx]), t[np.array(idx)], ctx[idx], None, reference)
        for j, i in enumerate(idx):
            assert _err(eps[i, :h, :w], e1[j]) < TOL
            assert float(jnp.abs(eps[i, h:]).max(initial=0)) == 0.0 and float(jnp.abs(eps[i, :, w:]).max(initial=0)) == 0.0
            for k, (a, b) in enumerate(zip(taps["up"], t1["up"])):
                assert a.shape[1] * b.shape[2] != 0
                hh, ww = b.shape[1:3]
                assert _err(a[i, :hh, :ww], b[j]) < TOL, f"up block {k}"
            hh, ww = t1["mid"].shape[1:3]
            assert _err(taps["mid"][i, :hh, :ww], t1["mid"][j]) < TOL


def test_unet_gradient_on_a_canvas_equals_the_unpadded_gradient(unet, tiny_pipe):
    """The drag loop differentiates a loss of the features with respect to the latent: on the
    canvas the valid cells' gradient is the unpadded gradient, the padding's is zero."""
    m = nnx.merge(tiny_pipe.sd.unet.graphdef,
                  jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tiny_pipe.sd.unet.lora),
                  tiny_pipe.sd.unet.params)
    _, d = unet
    rs = np.random.RandomState(1)
    h, w = 43, 37
    z = rs.randn(h, w, 4).astype(np.float32)
    ctx = rs.randn(1, 77, d).astype(np.float32)
    proj = rs.randn(64).astype(np.float32)

    def loss(x, canvas):
        _, taps = m(x, jnp.array([701]), ctx, canvas=canvas)
        f = taps["up"][2]
        return jnp.sum(jnp.tanh(f[0, :h // 2, : w // 2] @ proj[: f.shape[-1]]))

    canvas = unet_canvas(np.array([[h, w]]), (48, 40))
    g_c = jax.jit(jax.grad(loss))(_on_canvas([z], (48, 40), rs), canvas)
    g_1 = jax.jit(jax.grad(loss))(z[None], None)
    assert _err(g_c[0, :h, :w], g_1[0]) < TOL
    assert float(jnp.abs(g_c[0, h:]).max()) == 0.0 and float(jnp.abs(g_c[0, :, w:]).max()) == 0.0


def test_vae_on_a_canvas_equals_each_image_alone(tiny_pipe):
    vae = nnx.merge(tiny_pipe.sd.vae.graphdef, tiny_pipe.sd.vae.params)
    enc = jax.jit(lambda x, c: vae.encode(x, c)[0])
    dec = jax.jit(lambda z, c: vae.decode(z, c))
    rs = np.random.RandomState(2)
    sizes = [(341, 256), (200, 296)]     # not multiples of 8: latents ⌊h/8⌋ × ⌊w/8⌋
    canvas_px = (344, 296)
    imgs = [np.tanh(rs.randn(h, w, 3)).astype(np.float32) for h, w in sizes]
    z = enc(_on_canvas(imgs, canvas_px, rs), encoder_canvas(np.array(sizes), canvas_px))
    lat_sizes = np.array(sizes) // 8
    alone = [enc(im[None], None)[0] for im in imgs]
    for i, (hl, wl) in enumerate(lat_sizes):
        assert alone[i].shape[:2] == (hl, wl)
        assert _err(z[i, :hl, :wl], alone[i]) < TOL
        assert float(jnp.abs(z[i, hl:]).max(initial=0)) == 0.0
    lat_canvas = (canvas_px[0] // 8, canvas_px[1] // 8)
    lats = [np.asarray(a) for a in alone]
    x = dec(_on_canvas(lats, lat_canvas, rs), decoder_canvas(lat_sizes, lat_canvas))
    for i, (hl, wl) in enumerate(lat_sizes):
        ref = dec(lats[i][None], None)[0]
        assert ref.shape[:2] == (8 * hl, 8 * wl)
        assert _err(x[i, : 8 * hl, : 8 * wl], ref) < TOL
