"""Tokenizer ids, the DDIM schedule and primitive layers against their references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdrag.tokenizer import Tokenizer

# ids from OpenAI's original SimpleTokenizer (ftfy + html cleanup), computed once offline
ORIGINAL_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "“Curly” quotes &amp; entities &lt;3": [49406, 257, 20795, 257, 5808, 261, 38134, 283, 274, 49407],
    "  multiple   spaces\tand\nnewlines ": [49406, 6470, 9006, 537, 1218, 3418, 49407],
    "café naïve résumé": [49406, 15304, 1097, 35689, 563, 29106, 7054, 4166, 49407],
    "Fish &amp;amp; chips": [49406, 2759, 261, 8855, 49407],
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_tokenizer_matches_original_clip(tok):
    ids = tok.ids(list(ORIGINAL_IDS))
    assert ids.shape == (5, 77) and ids.dtype == np.int32
    for row, (prompt, ref) in zip(ids, ORIGINAL_IDS.items()):
        assert row[:len(ref)].tolist() == ref, prompt
        assert (row[len(ref):] == 49407).all()  # padded with <|endoftext|>
    # without the cleanup, transformers' tokenizer differs on entities and curly quotes
    raw = tok.tok(["“Curly” quotes &amp; entities &lt;3"])["input_ids"][0]
    assert raw != ORIGINAL_IDS["“Curly” quotes &amp; entities &lt;3"]


def test_prompt_lengths_and_truncation(tok):
    # P = BOS + prompt tokens (index of the first EOS)
    assert tok.prompt_lengths(["a photo of a cat", "", "Fish &amp;amp; chips"]).tolist() == [6, 1, 4]
    long = " ".join(["cat"] * 200)
    ids = tok.ids([long])[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and (ids[1:76] == 2368).all()
    assert tok.prompt_lengths([long]).tolist() == [76]


def test_ddim_schedule_matches_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers import DDIMScheduler

    from jaxdrag.schedule import DDIM, ddim_step, inversion_step, predict_x0

    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(50)
    s = DDIM()
    # float32 cumprod accumulation order differs between numpy and torch: ≤ 2e-6 relative
    np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-6)
    assert s.timesteps.tolist() == ref.timesteps.tolist()
    assert s.timesteps[0] == 981 and s.timesteps[-1] == 1
    # strength 0.7 → 35 steps → t* = 681; 0.75 → Python round(37.5) = 38 → 741 (GoodDrag)
    assert s.inversion_timesteps(0.7).tolist() == list(range(1, 682, 20))
    assert s.denoise_timesteps(0.7)[0] == 681 and s.timesteps[s.start_index(0.75)] == 741
    rs = np.random.RandomState(0)
    z, eps = rs.randn(1, 4, 8, 8).astype(np.float32), rs.randn(1, 4, 8, 8).astype(np.float32)
    for t in (681, 21, 1):
        want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(z)).prev_sample.numpy()
        np.testing.assert_allclose(ddim_step(s, z, eps, t), want, atol=1e-5)
    # inversion from t-20 to t written out by hand (ALGORITHMS.md §1.2)
    ac = s.alphas_cumprod
    a_cur, a_next = ac[661], ac[681]
    x0 = (z - np.sqrt(1 - a_cur) * eps) / np.sqrt(a_cur)
    np.testing.assert_allclose(inversion_step(s, z, eps, 681), np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps,
                               atol=1e-5)
    a0 = ac[0]  # first inversion step (t = 1): source alpha is ᾱ_final = ᾱ_0
    x0 = (z - np.sqrt(1 - a0) * eps) / np.sqrt(a0)
    np.testing.assert_allclose(inversion_step(s, z, eps, 1), np.sqrt(ac[1]) * x0 + np.sqrt(1 - ac[1]) * eps,
                               atol=1e-5)
    np.testing.assert_allclose(predict_x0(s, z, eps, 681), (z - np.sqrt(1 - a_next) * eps) / np.sqrt(a_next),
                               rtol=1e-5, atol=1e-5)


def test_timestep_embedding_matches_diffusers():
    pytest.importorskip("torch")
    import torch
    from diffusers.models.embeddings import get_timestep_embedding

    from jaxdrag.models.layers import timestep_embedding

    # exp() differs by 1 float32 ulp between torch and XLA on some frequencies; times t ≈ 1000
    # that moves sin/cos by up to ~6e-5 (the UNet parity tests show it does not reach ε)
    t = np.array([1, 21, 681, 999])
    for dim in (320, 33):
        ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=True, freq_shift=0),
                                   ref.numpy(), atol=1e-4)


def test_resizes_match_torch():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from jaxdrag.drag.losses import upsample_features
    from jaxdrag.models.layers import nearest_resize
    from jaxdrag.pipeline import bilinear_resize

    x = np.random.RandomState(0).randn(1, 6, 5, 3).astype(np.float32)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2)
    for size in [(12, 10), (11, 9), (13, 7)]:
        ref = F.interpolate(tx, size=size, mode="nearest").permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(nearest_resize(jnp.asarray(x), size), ref)
        ref = F.interpolate(tx, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(bilinear_resize(jnp.asarray(x), size), ref, atol=1e-6)
    # the ×4 feature upsampling of DragDiffusion (latent → supervision resolution)
    ref = F.interpolate(tx, size=(24, 20), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(upsample_features(jnp.asarray(x[0]), (24, 20)), ref, atol=1e-6)


def test_norms_two_pass_with_large_mean():
    """One-pass variance loses precision on large-mean inputs (Flax's default; torch's CPU
    GroupNorm is also 2e-3 off on this input). Ours matches float64 two-pass statistics."""
    from jaxdrag.models.layers import GroupNorm, LayerNorm

    x = (30 + 0.5 * np.random.RandomState(0).randn(2, 8, 8, 32)).astype(np.float32)
    xd = x.astype(np.float64).reshape(2, 64, 8, 4)
    m = xd.mean((1, 3), keepdims=True)
    v = ((xd - m) ** 2).mean((1, 3), keepdims=True)
    truth = ((xd - m) / np.sqrt(v + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(GroupNorm(8, 32, eps=1e-5)(jnp.asarray(x)), truth, atol=1e-4)
    xl = x.astype(np.float64)
    m, v = xl.mean(-1, keepdims=True), xl.var(-1, keepdims=True)
    np.testing.assert_allclose(LayerNorm(32, eps=1e-5)(jnp.asarray(x)), (xl - m) / np.sqrt(v + 1e-5), atol=1e-4)


def test_blocked_attention_matches_plain_values_and_gradients():
    from jaxdrag.models.attention import _xla_attention, attention, blocked_attention

    rs = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rs.randn(2, 1024, 3, 8).astype(np.float32)) for _ in range(3))
    k2, v2 = k[:, :200], v[:, :200]  # cross-attention-like: fewer keys than queries

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    for kk, vv in ((k, v), (k2, v2)):
        want = _xla_attention(q, kk, vv, False)
        got = blocked_attention(q, kk, vv, 128)
        np.testing.assert_allclose(got, want, atol=2e-6)
        gw = jax.grad(loss(lambda *a: _xla_attention(*a, False)), (0, 1, 2))(q, kk, vv)
        gg = jax.grad(loss(lambda *a: blocked_attention(*a, 128)), (0, 1, 2))(q, kk, vv)
        for a, b in zip(gg, gw):
            np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()))
    # the CPU dispatcher takes it for long sequences
    np.testing.assert_allclose(attention(q, k, v), _xla_attention(q, k, v, False), atol=2e-6)


@pytest.mark.parametrize("stride,padding,k,hw", [
    (1, ((1, 1), (1, 1)), 3, (9, 11)),
    (2, ((0, 1), (0, 1)), 3, (9, 11)),    # the VAE encoder's asymmetric downsampler
    (1, ((0, 0), (0, 0)), 1, (7, 7)),     # 1×1
    (2, ((1, 1), (1, 1)), 3, (40, 34)),   # strided, symmetric padding
])
@pytest.mark.parametrize("path", ["_conv_im2col", "_conv_explicit_transpose"])
def test_cpu_conv_paths_match_lax_conv(path, stride, padding, k, hw):
    from jaxdrag.models import layers

    fn = getattr(layers, path)
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(2, *hw, 5).astype(np.float32))
    w = jnp.asarray(rs.randn(k, k, 5, 7).astype(np.float32))
    want = layers._conv(x, w, stride, padding)
    got = fn(x, w, stride, padding)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.abs(want).max()))

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w, stride, padding)))
    for a, b in zip(jax.grad(loss(fn), (0, 1))(x, w), jax.grad(loss(layers._conv), (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, atol=2e-6 * float(jnp.abs(b).max()))


def test_cpu_conv_dispatch():
    """im2col for small outputs of wide layers only (SD's 8×8 / 16×16 levels), the convolution
    elsewhere; the public ``conv2d`` equals ``conv_general_dilated`` either way."""
    from jaxdrag.models import layers

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU dispatch rule")
    pad = ((1, 1), (1, 1))
    cases = {(16, 16, 320): False, (17, 16, 320): True, (8, 8, 64): True, (32, 32, 640): True}
    for (h, w_, c), uses_conv in cases.items():
        x = jnp.asarray(np.random.RandomState(1).randn(1, h, w_, c).astype(np.float32))
        w = jnp.asarray(np.random.RandomState(2).randn(3, 3, c, 8).astype(np.float32) * 0.05)
        jaxpr = str(jax.make_jaxpr(lambda x, w: layers.conv2d(x, w, 1, pad))(x, w))
        assert ("conv_general_dilated" in jaxpr) == uses_conv, (h, w_, c)
        np.testing.assert_allclose(layers.conv2d(x, w, 1, pad), layers._conv(x, w, 1, pad), atol=2e-5)


def test_conv_gradient_inside_a_loop_keeps_the_canonical_kernel_layout():
    """XLA:CPU runs convolutions with kernel labels other than 01io as a naive loop nest inside
    while/scan bodies (jax-ml/jax#12868); the conv's own VJP must not produce them there."""
    import re

    from jaxdrag.models.layers import conv2d

    if jax.default_backend() != "cpu":
        pytest.skip("a CPU code-generation property")
    x = jnp.ones((1, 24, 24, 16))
    w = jnp.full((3, 3, 16, 16), 0.01)
    g = jax.grad(lambda x, w: jnp.sum(jnp.tanh(conv2d(x, w, 1, ((1, 1), (1, 1))))))

    def body(i, c):
        return c[0] + 1e-3 * g(*c), c[1]
    hlo = jax.jit(lambda x, w: jax.lax.fori_loop(0, 3, body, (x, w))[0]).lower(x, w).compile().as_text()
    labels = re.findall(r"dim_labels=([^,\s]+)", hlo)
    assert labels and set(labels) == {"b01f_01io->b01f"}, labels
