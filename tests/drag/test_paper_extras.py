"""What the papers show beyond the default method: DragText's embedding interpolation (§6) and
feature-block ablation (App. H), iteration-cap snapshots in one run (CLIPDrag Tables 1–2), drags
on generated images (DragDiffusion's generated-image mode). Fusion rules: test_drag_losses.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdrag
from jaxdrag import EditRequest, EditSettings, Generation, LoRASettings, RequestError
from jaxdrag.data import write_result
from jaxdrag.drag import DragHypers, make_runner
from jaxdrag.drag.methods import resolve
from jaxdrag.errors import SettingsError
from helpers import synthetic_image

FAST = EditSettings(lora=LoRASettings(steps=2))
PTS = [(20, 20), (40, 30)]


def image(seed=0, hw=(64, 64)):
    return synthetic_image(*hw, seed)


# ------------------------------------------------------------------ DragText §6 interpolation

@pytest.mark.parametrize("method", ["dragtext", pytest.param("dragnoise+dragtext", marks=pytest.mark.slow)])  # the DragNoise host: -m slow
def test_interpolation_endpoints(tiny_pipe, method, tmp_path):
    """α = 1 is the edit itself (bit for bit), α = 0 the result of a drag that moves nothing (the
    reconstruction; DragNoise: its bottleneck at (z*, c)), α in between and beyond differs from
    both; the strip and the report are written."""
    # the suite's standard setting (96×128, 4 LoRA steps, 4 iterations, one pair: test_pipeline's
    # programs; the interpolated images reuse the edit's denoise program)
    st = EditSettings(lora=LoRASettings(steps=4), interpolation=(0, 0.5, 1, 1.5))
    img = image(1, (96, 128))
    r = jaxdrag.edit(tiny_pipe, img, PTS, "x", method=method, settings=st, max_iters=4)
    assert [a for a, _ in r.interpolation] == [0.0, 0.5, 1.0, 1.5]
    ims = dict(r.interpolation)
    assert r.iterations == 4
    np.testing.assert_array_equal(ims[1.0], r.image)
    noop = jaxdrag.edit(tiny_pipe, img, [(20, 20), (20, 20)], "x", method=method,
                        settings=EditSettings(lora=LoRASettings(steps=4)), max_iters=4)
    assert noop.iterations == 0
    np.testing.assert_array_equal(ims[0.0], noop.image)
    for a in (0.5, 1.5):
        assert ims[a].shape == img.shape and ims[a].dtype == np.uint8
        assert np.abs(ims[a].astype(int) - r.image).mean() > 0.05
        assert np.abs(ims[a].astype(int) - noop.image).mean() > 0.05
    write_result(r, tmp_path)
    from PIL import Image
    strip = np.asarray(Image.open(tmp_path / "interpolation.png"))
    assert strip.shape == (96 + 16, 4 * 128 + 3 * 4, 3)
    np.testing.assert_array_equal(strip[:96, 2 * 132:2 * 132 + 128], r.image)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["interpolation"] == {"alphas": [0.0, 0.5, 1.0, 1.5], "strip": "interpolation.png"}


def test_interpolation_setting_checked():
    with pytest.raises(SettingsError, match="setting interpolation = 'abc'"):
        EditSettings(interpolation="abc")
    with pytest.raises(SettingsError, match="setting interpolation = nan: must be a finite number"):
        EditSettings(interpolation=(0, float("nan")))


# ------------------------------------------------------------------ iteration-cap snapshots

@pytest.mark.slow  # compiles a snapshot loop and two capped loops; ≈ 190 s on 2 cores (run with -m slow)
def test_snapshots_equal_separate_runs(tiny_pipe, tmp_path):
    """CLIPDrag+DragText with caps (1, 4) in one run: each snapshot's image, update count,
    handles and reached flag equal a separate run with that max_iters, for an edit that runs to
    the cap and one that stops early (its handle starts 2.2 px from its target)."""
    reqs = [EditRequest(image(2), PTS, "x", name="far"), EditRequest(image(3), [(20, 20), (22, 21)], "x", name="near")]
    both = jaxdrag.edit_batch(tiny_pipe, reqs, "clipdrag+dragtext", settings=FAST, snapshots=(1, 4))
    assert both[0].config["drag"]["max_iters"] == 4  # the largest cap
    for cap in (1, 4):
        sep = jaxdrag.edit_batch(tiny_pipe, reqs, "clipdrag+dragtext", settings=FAST, max_iters=cap)
        for one, ref in zip(both, sep):
            sn = next(s for s in one.snapshots if s["max_iters"] == cap)
            np.testing.assert_array_equal(sn["image"], ref.image)
            assert sn["iterations"] == ref.iterations and sn["reached"] == ref.reached
            np.testing.assert_allclose(sn["handles"], ref.handles)
    assert [s["iterations"] for s in both[0].snapshots] == [1, 4]
    near = both[1].snapshots
    assert near[0]["iterations"] == near[1]["iterations"] == 1 and near[1]["reached"]
    np.testing.assert_array_equal(near[0]["image"], near[1]["image"])
    write_result(both[0], tmp_path)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["iters_0001.png", "iters_0004.png"]
    rep = json.loads((tmp_path / "report.json").read_text())
    assert [s["max_iters"] for s in rep["snapshots"]] == [1, 4]


def test_snapshot_settings_checked():
    assert resolve("clipdrag", snapshots="10,20,40,80,160")[0].max_iters == 160
    assert resolve("dragdiffusion", snapshots=(10, 20), max_iters=80)[0].max_iters == 80
    with pytest.raises(SettingsError, match=r"snapshots must lie in 1..max_iters = 80, got \[10, 90\]"):
        resolve("dragtext", snapshots=(10, 90), max_iters=80)
    with pytest.raises(SettingsError, match=r"increasing without repeats, got \[20, 10\]"):
        resolve("dragtext", snapshots="20,10")
    with pytest.raises(SettingsError, match="setting snapshots = '10,x'"):
        resolve("dragtext", snapshots="10,x")
    with pytest.raises(SettingsError, match=r"not used by method 'gooddrag' \['snapshots'\]"):
        resolve("gooddrag", snapshots=(10,))


# ------------------------------------------------------------------ DragText App. H feature block

def _one_step(pipe, method, hw=(64, 64), **over):
    """(c0, ĉ after one loop iteration, inputs) of a DragText run on the tiny pipeline's networks."""
    cfg, hyp = resolve(method, max_iters=1, **over)
    from dataclasses import replace
    cfg = replace(cfg, sup_hw=(hw[0] // 2, hw[1] // 2))
    nets = pipe.drag_networks(text_block=cfg.text_feature_block)
    shared = pipe.shared_params(False)
    lora = jax.tree.map(lambda x: x[None], jaxdrag.pipeline.zeros_lora(pipe.sd.unet.lora))
    ids = pipe.tokenizer.ids(["a photo"])
    c0 = pipe.encode_text_ids(ids)
    z0 = jax.random.normal(jax.random.PRNGKey(0), (1, hw[0] // 8, hw[1] // 8, 4))
    tm = jnp.asarray(np.arange(ids.shape[1])[None] < 3, jnp.float32)
    h, t = jnp.array([[[10.0, 10.0]]]), jnp.array([[[14.0, 20.0]]])
    hp = DragHypers(*(jnp.asarray([hyp[k]], jnp.float32) for k in DragHypers._fields))
    prep, loop = make_runner(nets, cfg, donate=False)
    args = (lora, z0, c0, h, t, jnp.ones((1, 1), bool), jnp.zeros((1, hw[0] // 8, hw[1] // 8, 1)), tm,
            jnp.zeros((1, 1)), jnp.full((1,), 501, jnp.int32), hp)
    inputs, state = prep(shared, *args)
    out = loop(shared, lora, inputs, state)
    return cfg, nets, shared, lora, args, out


@pytest.mark.slow  # the App. H ablation; the split-text step compiles twice; ≈ 130 s on 2 cores (run with -m slow)
def test_text_feature_block_gradient(tiny_pipe):
    """ĉ's step with the text's motion term on up_blocks[1] (App. H "Block #2") is an Adam step on
    ∇_ĉ[L(F_3) + L_ms(F_2) + n·λ_t·reg] computed directly with jax.grad; with the latent's own block
    it equals the default run bit for bit; another block changes ĉ."""
    from jaxdrag.drag.losses import motion_supervision, text_regularizer, upsample_features

    cfg, nets, shared, lora, args, out = _one_step(tiny_pipe, "dragtext", text_feature_block=1)
    _, z0, c0, h, t, mask, keep, tm = (a[0] if a is not lora else a for a in args[:8])
    hp_lr, lam_t = 0.004, 0.1
    assert out.it[0] == 1

    def total(c):
        eps, f3, f2 = nets.features(shared, jax.tree.map(lambda x: x[0], lora), z0, c, jnp.int32(501))
        ms = lambda f: motion_supervision(upsample_features(f, cfg.sup_hw), h, t, mask, r=cfg.r_m,  # noqa: E731
                                          max_step=cfg.max_step)
        return ms(f3) + ms(f2) + text_regularizer(c, c0, tm, lam_t)

    g = jax.grad(total)(c0)
    expect = c0 - hp_lr * g / (jnp.abs(g) + 1e-8)  # Adam's first step: m̂/√v̂ = g/|g|
    np.testing.assert_allclose(out.c[0], expect, atol=2e-6)
    moved = np.asarray(jnp.abs(out.c[0] - c0) > 1e-3)
    assert moved.sum() > 1000

    base = _one_step(tiny_pipe, "dragtext")[-1]
    same = _one_step(tiny_pipe, "dragtext", text_feature_block=2)[-1]
    np.testing.assert_array_equal(same.c, base.c)
    np.testing.assert_array_equal(same.z, base.z)
    assert float(jnp.abs(out.c - base.c).max()) > 1e-3
    np.testing.assert_array_equal(out.z, base.z)  # the latent's gradient does not see the text block


def test_text_feature_block_checked(tiny_pipe):
    with pytest.raises(SettingsError, match=r"not used by method 'dragdiffusion' \['text_feature_block'\]"):
        resolve("dragdiffusion", text_feature_block=1)
    with pytest.raises(SettingsError, match=r"not used by method 'freedrag\+dragtext'"):
        resolve("freedrag+dragtext", text_feature_block=1)
    with pytest.raises(SettingsError, match="text_feature_block = 7: this UNet has up blocks 0..3"):
        tiny_pipe.drag_networks(text_block=7)


# ------------------------------------------------------------------ generated images

def test_drag_on_generated_image(tiny_pipe):
    """Generate (seed, guidance 3, DDIM-50), then drag on the generation's latent at t*: a drag
    that moves nothing gives the generated image back (to float rounding of another batch
    shape: ≤ 1 level); a real drag moves its handle with no LoRA and no inversion; the generated
    image draws the same noise in any batch."""
    gen = Generation(seed=5, guidance_scale=3.0, height=64, width=64)
    imgs, _ = tiny_pipe.generate(["a cat"], seed=[5], guidance_scale=3.0, hw=(64, 64))
    imgs2, _ = tiny_pipe.generate(["a dog", "a cat"], seed=[1, 5], guidance_scale=3.0, hw=(64, 64))
    assert np.abs(np.asarray(imgs2[1], int) - np.asarray(imgs[0])).max() <= 1  # same noise, another batch
    reqs = [EditRequest(None, [(20, 20), (20, 20)], "a cat", generation=gen, name="noop"),
            EditRequest(None, PTS, "a cat", generation=gen, name="drag")]
    noop, drag = jaxdrag.edit_batch(tiny_pipe, reqs, "dragtext", max_iters=3)
    diff = np.abs(noop.image.astype(int) - np.asarray(imgs[0]))
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert noop.iterations == 0 and drag.iterations == 3
    assert noop.config["lora"] is None and noop.config["generation"]["guidance_scale"] == 3.0
    assert "lora" not in drag.timings and "invert" not in drag.timings
    assert np.abs(drag.image.astype(int) - noop.image).mean() > 0.05
    with pytest.raises(SettingsError, match="guidance_scale ≠ 1 are not available for DragNoise"):
        jaxdrag.edit(tiny_pipe, None, PTS, "a cat", method="dragnoise", generation=gen, max_iters=2)


@pytest.mark.slow  # compiles the unguided generation and a DragNoise edit; ≈ 45 s on 2 cores (run with -m slow)
def test_dragnoise_on_an_unguided_generation(tiny_pipe):
    """Guidance 1: the plain (unguided) networks, which DragNoise needs; a drag that moves nothing
    gives the generated image back."""
    g1 = Generation(seed=5, guidance_scale=1.0, height=64, width=64)
    im1, _ = tiny_pipe.generate(["a cat"], seed=[5], guidance_scale=1.0, hw=(64, 64))
    r = jaxdrag.edit(tiny_pipe, None, [(20, 20), (20, 20)], "a cat", method="dragnoise", generation=g1, max_iters=2)
    assert np.abs(r.image.astype(int) - np.asarray(im1[0])).max() <= 1


@pytest.mark.parametrize("gen, prompt, msg", [
    (Generation(guidance_scale=0.5), "a cat", "g: generation guidance_scale must be a number ≥ 1, got 0.5"),
    (Generation(height=60), "a cat", "g: generation height must be a multiple of 8, ≥ 64, got 60"),
    (Generation(seed=-1), "a cat", r"g: generation seed must be an integer in \[0, 2\^32\), got -1"),
    (Generation(), "", "g: a generated image needs its prompt"),
    ({"seed": 1}, "a cat", "g: generation must be a jaxdrag.Generation, got dict"),
])
def test_generation_spec_checked(tiny_pipe, gen, prompt, msg):
    with pytest.raises(RequestError, match=msg):
        jaxdrag.edit_batch(tiny_pipe, [EditRequest(None, PTS, prompt, generation=gen, name="g")], "dragdiffusion")
