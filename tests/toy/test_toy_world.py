"""The toy world's generator and ground truth, ToyBench's tasks and metrics on hand-made cases,
and the resumable training loop."""

import json

import numpy as np
import pytest

from jaxdrag.toy import bench, world


def test_scenes_are_deterministic_and_within_the_documented_ranges():
    a, b = world.random_scene(123), world.random_scene(123)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert a.image.shape == (128, 128, 3) and a.image.dtype == np.uint8
    counts = set()
    for seed in range(200):
        s = world.random_spec(seed)
        counts.add(len(s.objects))
        assert world.fits(s)
        assert len({o.colour for o in s.objects}) == len(s.objects)
        lo, hi = world.SIZE_RANGE if len(s.objects) == 1 else world.PAIR_SIZE_RANGE
        for o in s.objects:
            assert lo <= o.size <= hi
            assert o.shape in world.SHAPES and o.colour in world.PALETTE
    assert counts == {1, 2}
    assert world.check_palette() >= world.MIN_COLOUR_GAP


def test_a_crowded_seed_is_placed_again():
    """Seed 340154's first placement left no room for its second object: both are placed again."""
    s = world.random_spec(340154)
    assert len(s.objects) == 2 and world.fits(s)


def test_objects_are_apart_by_their_outlines():
    """Two squares side by side 6 px apart fit (their bounding circles overlap); 5 px apart do not."""
    a = world.Obj("square", "red", 40.0, 64.0, 40.0)
    for gap, ok in ((6.5, True), (5.0, False)):
        b = world.Obj("square", "blue", 40.0 + 40.0 + gap, 64.0, 40.0)
        assert world.fits(world.Spec(("white",), (a, b))) is ok


@pytest.mark.parametrize("shape", world.SHAPES)
def test_ground_truth_mask_centroid_and_area(shape):
    o = world.Obj(shape, "red", 60.3, 50.7, 40.0)
    sc = world.render(world.Spec(background=("white",), objects=(o,)))
    cov = sc.coverage[0]
    ys, xs = np.mgrid[0:128, 0:128]
    cx, cy = (cov * xs).sum() / cov.sum(), (cov * ys).sum() / cov.sum()
    assert abs(cx - 60.3) < 0.05 and abs(cy - 50.7) < 0.05  # centroid = the stated centre
    area = {"disc": np.pi * 20 ** 2, "square": 40.0 ** 2, "triangle": np.sqrt(3) / 4 * 40 ** 2}[shape]
    assert abs(cov.sum() - area) / area < 0.01
    assert abs(sc.masks[0].sum() - area) / area < 0.03
    # the spot: a disc of the documented radius at the documented offset, inside the body
    fx, fy, fr = world.SPOT[shape]
    spot = sc.spot_masks[0]
    assert sc.spot_centres[0] == pytest.approx([60.3 + 40 * fx, 50.7 + 40 * fy])
    assert abs(spot.sum() - np.pi * (40 * fr) ** 2) / (np.pi * (40 * fr) ** 2) < 0.06
    assert np.all(sc.masks[0][spot])
    sx, sy = (int(round(v)) for v in sc.spot_centres[0])
    assert np.all(sc.image[sy, sx] == world.SPOT_RGB)
    # the body's colour outside the spot (here: across the centre from it), the background far out
    bx, by = int(round(60.3 - 40 * fx * 0.8)), int(round(50.7 - 40 * fy * 0.8))
    assert np.all(sc.image[by, bx] == world.PALETTE["red"])
    assert np.all(sc.image[2, 2] == world.BACKGROUNDS["white"])
    # the spot keeps ≥ 0.06 × size of body around it (so it survives anti-aliasing)
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32)
    assert world.signed_distance(o, xx, yy)[spot].max() <= -0.06 * 40


def test_captions_name_colour_shape_position_and_background():
    spec = world.Spec(background=("beige", "dark gray"), angle=90.0,
                      objects=(world.Obj("disc", "orange", 20, 20, 20), world.Obj("square", "blue", 100, 64, 20)))
    assert world.caption(spec) == ("an orange disc with a black spot at the top left and a blue square "
                                   "with a black spot on the right on a beige and dark gray gradient "
                                   "background")
    assert world.caption(world.Spec(("white",), (world.Obj("triangle", "red", 64, 64, 20),))) == \
        "a red triangle with a black spot in the center on a white background"
    with pytest.raises(ValueError, match="unknown object colour 'pink'"):
        world.render(world.Spec(("white",), (world.Obj("disc", "pink", 64, 64, 20),)))


def test_tasks_are_held_out_deterministic_and_valid():
    tasks = bench.make_tasks(30)
    again = bench.make_tasks(30)
    assert [t.to_json() for t in tasks] == [t.to_json() for t in again]
    assert {t.kind for t in tasks} == {"single", "two-objects", "two-handles"}
    for t in tasks:
        assert t.seed >= bench.FIRST_SEED
        assert len(t.points) == 2 * (2 if t.kind != "single" else 1)
        for i, dx, dy in t.moves:
            assert dx % 2 == 0 and dy % 2 == 0
            assert bench.DRAG_RANGE[0] <= np.hypot(dx, dy) <= bench.DRAG_RANGE[1]
        assert world.fits(t.spec.moved(t.moves))
        # handle → target pairs encode the moves; every handle lies on its object, the first of
        # each object on its spot (within rounding)
        for h, g in zip(t.points[0::2], t.points[1::2]):
            d = (g[0] - h[0], g[1] - h[1])
            assert any(d == (dx, dy) for _, dx, dy in t.moves)
            assert any(t.scene.masks[i][h[1], h[0]] for i, _, _ in t.moves)
        first = t.points[0::4] if t.kind == "two-handles" else t.points[0::2]
        for h, (i, _, _) in zip(first, t.moves):
            assert np.hypot(*(np.asarray(h) - t.scene.spot_centres[i])) <= 0.71
        # the mask covers the old and the new footprint
        for i, _, _ in t.moves:
            assert np.all(t.mask[t.scene.masks[i]]) and np.all(t.mask[t.target.masks[i]])


def test_metrics_on_hand_made_cases():
    for t in bench.make_tasks(12):
        perfect = bench.measure(t, t.target.image)
        # a perfect edit: zero error up to the anti-aliased rim over a gradient background
        assert perfect["error"] == pytest.approx(0.0, abs=0.4)
        assert perfect["spot_error"] == pytest.approx(0.0, abs=0.4)
        assert perfect["iou"] > 0.97 and perfect["survived"]
        assert perfect["bg_psnr"] == float("inf")
        unchanged = bench.measure(t, t.image)
        for o in unchanged["objects"]:
            assert o["error"] == pytest.approx(o["length"], abs=1e-9)
            assert o["rel_error"] == pytest.approx(1.0)
    t = bench.make_tasks(1)[0]
    gone = t.image.copy()
    i = t.moves[0][0]
    gone[t.scene.coverage[i] > 0] = world.BACKGROUNDS[t.spec.background[0]]
    m = bench.measure(t, gone)
    assert m["error"] == float("inf") and not m["survived"] and m["iou"] == 0.0
    # an object moved perfectly but without its spot (painted over in the body colour) did not survive
    t = next(t for t in bench.make_tasks(12) if t.kind == "single")
    i, dx, dy = t.moves[0]
    nospot = t.target.image.copy()
    nospot[t.target.spot_masks[i]] = world.PALETTE[t.spec.objects[i].colour]
    m = bench.measure(t, nospot)
    assert m["error"] < 3 and not m["objects"][0]["spot_found"] and not m["survived"]  # the filled hole shifts the body centroid
    assert m["spot_error"] == float("inf")
    # background PSNR sees only pixels outside the mask
    noisy = t.target.image.copy()
    noisy[~t.mask] = np.clip(noisy[~t.mask].astype(int) + 10, 0, 255)
    assert 25 < bench.measure(t, noisy)["bg_psnr"] < 29


def test_summary_counts_vanished_objects_as_failures():
    rows = [{"error": 1.0, "rel_error": 0.1, "iou": 0.9, "survived": True, "bg_psnr": 40.0},
            {"error": float("inf"), "rel_error": float("inf"), "iou": 0.0, "survived": False, "bg_psnr": 35.0},
            {"error": 3.0, "rel_error": 0.3, "iou": 0.5, "survived": True, "bg_psnr": float("inf")}]
    s = bench.summarize(rows)
    assert s["median_error_px"] == 3.0 and s["survival"] == pytest.approx(2 / 3)
    assert s["within_25pct"] == pytest.approx(1 / 3) and s["median_bg_psnr"] == 40.0
    assert "| m | 3 |" in bench.table_markdown({"m": s})


def test_training_resumes_exactly(tmp_path):
    """An interrupted run resumed from its orbax checkpoint equals an uninterrupted run."""
    import jax
    import jax.numpy as jnp

    from jaxdrag.toy.train import Stage, train

    target = jnp.arange(6.0).reshape(2, 3)

    def loss(p, batch, key):
        noise = jax.random.normal(key, p["w"].shape) * 0.01
        v = jnp.sum((p["w"] + noise - batch) ** 2)
        return v, v

    def batch(k):
        return target + np.random.default_rng(k).normal(size=(2, 3)).astype(np.float32) * 0.1

    p0 = {"w": jnp.zeros((2, 3))}
    full, hist_full = train("t", tmp_path / "a", p0, loss, batch, Stage(steps=50, batch=1, lr=0.1, ckpt_every=20),
                            log=lambda s: None)
    train("t", tmp_path / "b", p0, loss, batch, Stage(steps=20, batch=1, lr=0.1, ckpt_every=20), log=lambda s: None)
    logs = []
    resumed, hist = train("t", tmp_path / "b", p0, loss, batch, Stage(steps=50, batch=1, lr=0.1, ckpt_every=20),
                          log=logs.append)
    assert any("resumed at step 20" in s for s in logs)
    # the learning-rate schedule depends on the total steps, so compare with the same total:
    # the first 20 steps ran under a 20-step schedule; rerun the reference the same way
    ref_dir = tmp_path / "c"
    train("t", ref_dir, p0, loss, batch, Stage(steps=20, batch=1, lr=0.1, ckpt_every=20), log=lambda s: None)
    ref, _ = train("t", ref_dir, p0, loss, batch, Stage(steps=50, batch=1, lr=0.1, ckpt_every=20),
                   log=lambda s: None)
    np.testing.assert_array_equal(np.asarray(resumed["w"]), np.asarray(ref["w"]))
    assert hist[-1][0] == 50 and hist_full[-1][1] < 0.5 * hist_full[0][1]  # it trains


def test_export_round_trip_loads_unchanged(tmp_path):
    """Toy-architecture networks written by the exporter load with ``load_pipeline`` and compute
    the same functions (up to the float16 storage)."""
    import jax.numpy as jnp

    import jaxdrag
    from jaxdrag.toy import export, models as M

    vae = M.init_params(M.build_vae(), 0)
    unet = M.init_params(M.build_unet(), 1)
    text = M.init_params(M.build_text(), 2)
    clip = M.init_params(M.build_clip(), 3)
    export.write_sd(tmp_path, vae, unet, text, 1.5, {"test": True})
    export.write_clip(tmp_path, clip, 2.0, {"test": True})
    cfg = json.loads((tmp_path / "toy-sd15" / "vae" / "config.json").read_text())
    assert cfg["scaling_factor"] == 1.5 and cfg["sample_size"] == 128
    pipe = jaxdrag.load_pipeline(tmp_path / "toy-sd15", clip=tmp_path / "toy-clip", dtype="float32")
    assert pipe.native_width == 128 and pipe.scaling_factor == 1.5
    ids = pipe.tokenizer.ids(["a red disc at the top left on a white background"])
    ours = pipe.encode_prompt(["a red disc at the top left on a white background"])
    ref = M.net(M.build_text()).module(text)(jnp.asarray(ids))[0]
    assert float(jnp.abs(ours - ref).max()) < 2e-2
    img = jnp.asarray(world.random_scene(5).image[None], jnp.float32) / 127.5 - 1
    ref_lat = M.net(M.build_vae()).module(vae).encode(img)[0] * 1.5
    assert float(jnp.abs(pipe.vae_encode(img) - ref_lat).max()) < 2e-2 * max(1.0, float(jnp.abs(ref_lat).max()))
    assert pipe.clip_image_embeds(img).shape == (1, M.CLIP_PROJ)


def test_training_can_freeze_parameters(tmp_path):
    """``trainable`` restricts the updates (the VAE decoder fine-tune keeps the encoder fixed)."""
    import jax.numpy as jnp

    from jaxdrag.toy.train import Stage, is_decoder, train

    p0 = {"decoder": {"w": jnp.ones(3)}, "encoder": {"w": jnp.ones(3)}}
    out, _ = train("f", tmp_path, p0, lambda p, b, k: (jnp.sum(p["decoder"]["w"] ** 2 + p["encoder"]["w"] ** 2),) * 2,
                   lambda k: None, Stage(steps=5, batch=1, lr=0.1), log=lambda s: None, trainable=is_decoder)
    assert np.all(np.asarray(out["encoder"]["w"]) == 1.0) and np.all(np.asarray(out["decoder"]["w"]) < 1.0)
    assert is_decoder(("post_quant_conv", "kernel")) and not is_decoder(("quant_conv", "kernel"))


def test_min_snr_weight_and_ema_on_hand_computed_values():
    import jax.numpy as jnp

    from jaxdrag.schedule import DDIM
    from jaxdrag.toy.train import ema_update, snr_weight

    sched = DDIM()
    ab = np.asarray(sched.alphas_cumprod, np.float64)
    t = jnp.asarray([0, 200, 500, 999])
    snr = ab[[0, 200, 500, 999]] / (1 - ab[[0, 200, 500, 999]])
    w = np.asarray(snr_weight(sched, t, 5.0))
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-5)
    assert w[0] < 0.01 and w[-1] == pytest.approx(1.0)  # clean timesteps down-weighted, noisy ones kept
    assert np.all(np.asarray(snr_weight(sched, t, 0.0)) == 1.0)
    # EMA with the (1 + k)/(10 + k) ramp: 0.1 at step 0, the decay itself late
    assert float(ema_update(jnp.zeros(()), jnp.ones(()), 0.999, 0.0)) == pytest.approx(0.9)
    assert float(ema_update(jnp.zeros(()), jnp.ones(()), 0.999, 1e6)) == pytest.approx(0.001, rel=1e-3)


def test_training_with_ema_resumes_exactly_and_returns_the_average(tmp_path):
    import jax.numpy as jnp

    from jaxdrag.toy.train import Stage, train

    def loss(p, batch, key):
        v = jnp.sum((p["w"] - batch) ** 2)
        return v, v

    batch = lambda k: np.full((2,), 3.0, np.float32) + np.float32(0.1) * np.sin(k)
    st = lambda n: Stage(steps=n, batch=1, lr=0.1, ckpt_every=10, ema=0.9, warmup=2)
    p0 = {"w": jnp.zeros((2,))}
    train("e", tmp_path / "a", p0, loss, batch, st(10), log=lambda s: None)
    resumed, _ = train("e", tmp_path / "a", p0, loss, batch, st(30), log=lambda s: None)
    train("e", tmp_path / "b", p0, loss, batch, st(10), log=lambda s: None)
    ref, _ = train("e", tmp_path / "b", p0, loss, batch, st(30), log=lambda s: None)
    np.testing.assert_array_equal(np.asarray(resumed["w"]), np.asarray(ref["w"]))
    raw, _ = train("r", tmp_path / "c", p0, loss, batch, Stage(steps=30, batch=1, lr=0.1, warmup=2),
                   log=lambda s: None)
    # the average lags the raw parameters on their way from 0 to 3
    assert 0 < float(resumed["w"][0]) < float(raw["w"][0])


def test_data_parallel_gradients_equal_one_device():
    """On two host devices the batch is split and the gradients averaged: the same gradient as one
    device for a loss that is a mean over examples (a subprocess, since the device count is fixed
    when JAX starts)."""
    import os
    import subprocess
    import sys

    code = """
import numpy as np, jax, jax.numpy as jnp
from jaxdrag.toy.train import _grad_fn
assert jax.device_count() == 2
loss = lambda p, b, key: (jnp.mean((b @ p['w']) ** 2), jnp.float32(0))
p = {'w': jnp.arange(3.0)}
b = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
(l2, _), g2 = jax.jit(_grad_fn(loss, 8))(p, b, jax.random.PRNGKey(0))
(l1, _), g1 = jax.value_and_grad(loss, has_aux=True)(p, b, None)
np.testing.assert_allclose(np.asarray(g2['w']), np.asarray(g1['w']), rtol=1e-5)
np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
print('ok')
"""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_tracking_diagnostic_on_constructed_feature_maps():
    """diagnose.match: a feature map moved by the drag is tracked exactly; a constant map has no
    contrast; the window search cannot be fooled by a decoy outside it."""
    from jaxdrag.toy.diagnose import match

    rng = np.random.default_rng(0)
    F0 = rng.normal(size=(32, 32, 8)).astype(np.float32)
    F1 = np.roll(F0, (3, -2), axis=(0, 1))  # content moved 3 sup px down, 2 left = (−4, +6) image px
    pts = [[20, 10], [16, 16]]
    a, w, c = match(F0, F1, pts)
    assert a == [0.0] and w == [0.0]
    assert c[1][0] > 0.5 and c[1][0] == pytest.approx(c[4][0], rel=0.5)  # white noise: contrast at every distance
    flat = np.ones((32, 32, 8), np.float32)
    assert match(flat, flat, pts)[2][2] == [0.0]
    F2 = F1.copy()
    F2[0, 0] = F0[5, 10]  # an exact decoy far away: found by the whole-map search, not in the window
    a, w, _ = match(F0, F2, pts)
    assert a[0] == pytest.approx(np.hypot(8, 8)) and w == [0.0]
