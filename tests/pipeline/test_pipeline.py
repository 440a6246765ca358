"""End-to-end editing on the tiny model: every method, odd and non-square sizes, DragBench samples,
batches vs single edits, request validation and the reference geometry."""

import dataclasses
import json
import pickle

import numpy as np
import pytest

import jaxdrag
from conftest import shared_data
from helpers import short_run
from jaxdrag import EditRequest, EditSettings, LoRASettings, RequestError
from jaxdrag.data import SafeUnpickler, find_samples, prepare, report, safe_load_pickle, write_result
from helpers import synthetic_image

# One working shape (96×128: latent 12×16, supervision 48×64) and one drag setting for most tests,
# so the compiled stage programs are shared (XLA compile dominates CPU time); one odd-size case.
FAST = EditSettings(lora=LoRASettings(steps=4))
ITERS = 4


def synthetic(h=77, w=100, seed=0):
    return synthetic_image(h, w, seed)


def _check(res, img, method, n_pairs):
    h, w = img.shape[:2]
    assert res.image.shape == img.shape and res.image.dtype == np.uint8
    assert res.handles.shape == (n_pairs, 2)
    assert ((res.handles >= 0) & (res.handles < [w, h])).all()
    assert 0 <= res.iterations <= ITERS and len(res.losses) == res.iterations
    assert res.trajectory.shape[1:] == (n_pairs, 2)
    np.testing.assert_allclose(res.trajectory[0], res.initial_handles)
    assert res.config["method"] == method
    assert res.config["t_star"] == (741 if method.startswith("gooddrag") else 681)
    for stage in ("lora", "invert", "drag", "denoise", "decode"):
        assert res.timings[stage] > 0


@pytest.mark.parametrize("method", [m for m in jaxdrag.METHODS if m != "dragdiffusion"])
def test_every_method_end_to_end(tiny_pipe, method, tmp_path):
    img = synthetic(96, 128)
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[10:80, 20:110] = 1
    res = jaxdrag.edit(tiny_pipe, img, [(40, 30), (60, 35), (80, 60), (70, 50)], "a colourful gradient",
                       mask=mask, method=method, settings=FAST, **short_run(method, ITERS))
    _check(res, img, method, 2)
    # every host runs its budget of ITERS updates on this drag, but FreeDrag, whose stop test at the
    # start of its second block ends these edits after 2 (measured; deterministic)
    assert res.iterations == (2 if method.startswith("freedrag") else ITERS)
    assert np.isfinite(res.losses).all()
    assert res.config["reference_attention"] == (not method.startswith("dragnoise"))
    if "dragtext" in method or method.startswith("clipdrag"):
        assert res.config["hypers"]["text_lr"] == 0.004 or not method.endswith("dragtext")
    assert res.config["working_size"] == [96, 128] and res.config["supervision_size"] == [48, 64]
    write_result(res, tmp_path / "r")
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["config"]["drag"]["use_clip"] == method.startswith("clipdrag")
    assert (tmp_path / "r" / "overlay.png").exists()


def test_odd_size_input(tiny_pipe):
    """100×77 input: not a multiple of 8, not square → working 128×98 (the reference's resize to
    the native width), latent 12×16 (VAE floor arithmetic), supervision 49×64; output at 100×77."""
    img = synthetic(77, 100)
    res = jaxdrag.edit(tiny_pipe, img, [(40, 30), (60, 35)], "a gradient", method="dragdiffusion",
                       settings=FAST, max_iters=ITERS)
    _check(res, img, "dragdiffusion", 1)
    assert res.config["working_size"] == [98, 128] and res.config["supervision_size"] == [49, 64]


def test_batch_of_three_equals_three_alone(tiny_pipe):
    """Same LoRA seeds, so the only differences are float rounding between a batch-3 and a
    batch-1 program: identical handles and iteration counts, images within 1 grey level."""
    img = synthetic(96, 128, 1)
    reqs = [EditRequest(img, [(30, 40), (50, 45)], "a gradient", name="a"),
            EditRequest(synthetic(96, 128, 2), [(20, 20), (30, 35), (100, 70), (90, 60)], "noise", name="b", seed=3),
            EditRequest(img[::-1].copy(), [(64, 20), (64, 40)], "", name="c", hypers={"latent_lr": 0.02})]
    st = FAST
    batch = jaxdrag.edit_batch(tiny_pipe, reqs, "dragtext", settings=st, max_iters=ITERS)
    assert [r.name for r in batch] == ["a", "b", "c"]
    for r, b in zip(reqs, batch):
        a = jaxdrag.edit_batch(tiny_pipe, [r], "dragtext", settings=st, max_iters=ITERS)[0]
        np.testing.assert_array_equal(a.handles, b.handles)
        assert a.iterations == b.iterations
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
    assert batch[2].config["hypers"]["latent_lr"] == 0.02 and batch[0].config["hypers"]["latent_lr"] == 0.01


def test_dragbench_samples(tiny_pipe):
    """Real DragBench samples (512×384, the working shape of the other tests at the tiny model's
    128-px native width): outputs at the input size, handles inside the image."""
    root = shared_data("data", "DragBench")
    samples = find_samples(root)
    assert len(samples) == 205
    # two of the four 512×384 samples: one pair and two pairs (point counts the other tests compile)
    reqs = [r for r in (s.load() for s in samples) if r.image.shape[:2] == (384, 512) and len(r.points) <= 4][:2]
    assert len(reqs) == 2 and len(reqs[0].points) != len(reqs[1].points)
    one_by_one = dataclasses.replace(FAST, batch_size=1)
    out = jaxdrag.edit_batch(tiny_pipe, reqs, "dragtext", settings=one_by_one, max_iters=ITERS)
    for r, o in zip(reqs, out):
        assert o.image.shape == (384, 512, 3)
        assert ((o.handles >= 0) & (o.handles < [512, 384])).all()
        assert o.config["prompt"] == r.prompt and o.config["working_size"] == [96, 128]


def test_validation_names_the_problem():
    img = synthetic(64, 64)
    with pytest.raises(RequestError, match="3 points given; .* must be even"):
        prepare(EditRequest(img, [(1, 1), (2, 2), (3, 3)], name="x"), None, 128)
    with pytest.raises(RequestError, match=r"point 1 \(target of pair 0\) at \(x=70, y=5\) is outside the 64×64 image"):
        prepare(EditRequest(img, [(1, 1), (70, 5)], name="x"), None, 128)
    with pytest.raises(RequestError, match=r"mask shape \(32, 64\) does not match the image \(64, 64\)"):
        prepare(EditRequest(img, [(1, 1), (5, 5)], mask=np.ones((32, 64)), name="x"), None, 128)
    with pytest.raises(RequestError, match="no points given"):
        prepare(EditRequest(img, [], name="x"), None, 128)
    with pytest.raises(RequestError, match=r"point 0 \(handle of pair 0\) is \[1\], expected \[x, y\]"):
        prepare(EditRequest(img, [[1], (5, 5)], name="x"), None, 128)
    with pytest.raises(RequestError, match="image must be uint8"):
        prepare(EditRequest(img.astype(np.int32), [(1, 1), (5, 5)], name="x"), None, 128)
    with pytest.raises(RequestError, match="at least 16×16"):
        prepare(EditRequest(img[:8], [(1, 1), (5, 5)], name="x"), None, 128)


def test_unknown_per_request_hyperparameter(tiny_pipe):
    with pytest.raises(RequestError, match=r"x: hyperparameter\(s\) \['lr'\] not used by method 'dragtext'; "
                                           r"valid: latent_lr, lam, text_lr, text_lam$"):
        jaxdrag.edit_batch(tiny_pipe, [EditRequest(synthetic(), [(1, 1), (5, 5)], name="x", hypers={"lr": 1})])


def test_reference_geometry():
    """512×341 DragBench-style image at native width 512: supervision 170×256,
    p = round(y·170/341, x·256/512); mask → nearest to 170×256 → nearest to latent 42×64."""
    img = synthetic(341, 512)
    mask = np.zeros((341, 512), np.uint8)
    mask[100:200, 300:400] = 1
    p = prepare(EditRequest(img, [(100, 200), (301, 3)], mask=mask), 512, 512)
    assert p.sup_hw == (170, 256) and p.latent_hw == (42, 64) and p.image.shape == (341, 512, 3)
    np.testing.assert_array_equal(p.handles, [[round(200 * 170 / 341), 50]])
    np.testing.assert_array_equal(p.targets, [[1, round(301 * 256 / 512)]])
    assert p.keep.shape == (42, 64, 1)
    # PyTorch nearest: src = ⌊i·n_in/n_out⌋. Rows 100..199 of 341 → supervision rows 50..99 of 170
    # (⌊50·341/170⌋ = 100, ⌊99·341/170⌋ = 198) → latent rows 13..24 of 42 (⌊13·170/42⌋ = 52,
    # ⌊12·170/42⌋ = 48 < 50); columns 300..399 of 512 → 150..199 of 256 → 38..49 of 64.
    rows, cols = np.where(p.keep[..., 0] == 0)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (13, 24, 38, 49)
    assert p.lora_image.shape == (512, 768, 3)  # Resize(512) on the shorter side, then random crops
    # back to input pixels: within one supervision pixel (2 px) of the given point
    np.testing.assert_allclose(p.to_pixels(p.handles), [[100, 200]], atol=2.01)
    # no mask drawn: no background term at all
    assert not prepare(EditRequest(img, [(1, 1), (9, 9)]), 512, 512).keep.any()
    # a 1024-wide image is resized to the native width, keeping the aspect ratio
    big = prepare(EditRequest(synthetic(300, 1024), [(1000, 10), (500, 290)]), 512, 512)
    assert big.image.shape == (150, 512, 3) and big.in_hw == (300, 1024)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler(tmp_path):
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"prompt": "p", "points": [[1, 2], [3, 4]], "mask": np.eye(3, dtype=np.uint8)}))
    d = safe_load_pickle(ok)
    assert d["points"] == [[1, 2], [3, 4]] and d["mask"].dtype == np.uint8
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(RequestError, match=r"refused: global '(posix|os|nt)\.system' is not allowed"):
        safe_load_pickle(bad)
    trunc = tmp_path / "trunc.pkl"
    trunc.write_bytes(ok.read_bytes()[:30])
    with pytest.raises(RequestError, match="cannot read"):
        safe_load_pickle(trunc)
    assert issubclass(SafeUnpickler, pickle.Unpickler)


def test_report_contents(tiny_pipe):
    res = jaxdrag.edit(tiny_pipe, synthetic(96, 128), [(20, 20), (40, 30)], "x", method="dragtext",
                       settings=FAST, max_iters=ITERS)
    rep = report(res)
    assert set(rep) >= {"points", "final_handles", "iterations", "trajectory", "timings_s", "config"}
    assert rep["config"]["lora"]["steps"] == 4 and rep["config"]["drag"]["max_iters"] == ITERS
    assert all(v >= 0 for v in rep["timings_s"].values())
    json.dumps(rep)


def test_stage_cache_keys_on_the_function():
    """Two stage programs with equal input shapes but different static settings are compiled
    separately (and each compile is timed once)."""
    import jax
    import jax.numpy as jnp

    from jaxdrag.pipeline import Stages

    st = Stages()
    f2, f3 = jax.jit(lambda x: x * 2), jax.jit(lambda x: x * 3)
    x = jnp.ones(3)
    assert float(st("s", f2, x)[0]) == 2 and float(st("s", f3, x)[0]) == 3
    assert len(st._cache) == 2
    st.last_compile_s = {}
    st("s", f2, x)
    assert st.last_compile_s == {}  # cached: no compile


def test_method_defaults_for_pipeline_settings():
    """LoRA steps / lr and inversion strength left unset take the method's reference defaults
    (ALGORITHMS.md §8); set ones are kept."""
    for method, want in [("dragtext", (80, 5e-4, 0.7)), ("clipdrag", (80, 5e-4, 0.7)),
                         ("gooddrag+dragtext", (70, 5e-4, 0.75)), ("freedrag", (200, 2e-4, 0.7)),
                         ("dragnoise+dragtext", (200, 2e-4, 0.7))]:
        s = EditSettings().for_method(method)
        assert (s.lora.steps, s.lora.lr, s.inversion_strength) == want and s.method == method
    s = EditSettings(lora=LoRASettings(steps=5), inversion_strength=0.5).for_method("gooddrag")
    assert (s.lora.steps, s.lora.lr, s.inversion_strength) == (5, 5e-4, 0.5)


def test_denoise_from_a_later_step_and_with_an_injected_bottleneck(tiny_pipe):
    """GoodDrag's final denoise starts where its drag phase stopped: starting at step s of the K
    steps equals denoising with the strength of the remaining K − s steps. DragNoise's injected
    bottleneck: injecting the UNet's own mid-block output of the first step for that step only
    changes nothing."""
    import jax
    import jax.numpy as jnp

    p = tiny_pipe
    rs = np.random.RandomState(0)
    z = jnp.asarray(rs.randn(2, 6, 8, 4), jnp.float32)
    c = p.encode_prompt(["a red disc", "a blue square"])
    lora = jax.tree.map(lambda s: jnp.zeros((2,) + s.shape, jnp.float32), p.lora_template())
    full = p.denoise(lora, z, z[::-1], c, c[::-1], 0.7, True, start=jnp.array([3, 0]))
    rest = p.denoise(lora, z, z[::-1], c, c[::-1], 0.64, True)  # 32 = 35 − 3 steps
    whole = p.denoise(lora, z, z[::-1], c, c[::-1], 0.7, True)
    np.testing.assert_allclose(full[0], rest[0], atol=1e-5)
    np.testing.assert_allclose(full[1], whole[1], atol=1e-5)
    t_star = int(p.schedule.timesteps[p.schedule.start_index(0.7)])
    h = jax.vmap(lambda zz, cc: p.unet_apply(p.sd.unet.params, jax.tree.map(lambda a: a[0], lora), zz[None], t_star,
                                             cc[None])[1]["mid"][0])(z, c)
    plain = p.denoise(lora, z, z, c, c, 0.7, False)
    injected = p.denoise(lora, z, z, c, c, 0.7, False, mid=h, mid_steps=1)
    np.testing.assert_allclose(injected, plain, atol=1e-5)
    moved = p.denoise(lora, z, z, c, c, 0.7, False, mid=h * 1.5, mid_steps=35)
    assert float(jnp.abs(moved - plain).max()) > 1e-3
