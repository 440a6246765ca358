"""``jaxdrag eval``: hand-made metric cases, the runner (layouts, batching, resume, per-sample
errors) and the command line, on tiny evaluation networks."""

import json
import pickle
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import shared_data
from jaxdrag import tiny
from jaxdrag.cli import main
from jaxdrag.errors import SettingsError
from jaxdrag.eval import EvalSettings, Networks, dai, evaluate, load_clip_image, load_dift, load_lpips
from jaxdrag.eval.metrics import match_distances
from jaxdrag.weights import WeightsError


# ----------------------------------------------------------------------------------------------
# hand-made cases


def test_unedited_features_match_at_the_handles():
    """Identical feature maps: every handle is found where it was, so the distances are the
    handle–target distances."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 8, 16)).astype(np.float32)
    handles = np.array([[20, 30], [100, 70], [64, 48]])
    targets = np.array([[26, 38], [90, 70], [64, 48]])
    d, matched = match_distances(jnp.asarray(f), jnp.asarray(f), jnp.asarray(handles),
                                 jnp.asarray(targets), hw=(96, 128), rows=32)
    np.testing.assert_array_equal(np.asarray(matched), handles)
    np.testing.assert_allclose(np.asarray(d), [10.0, 10.0, 0.0], atol=1e-6)


def test_shifted_features_are_found_at_the_shift():
    """The dragged map is the source map moved by whole feature cells: each handle is found moved
    by the same amount in pixels (16 px per cell at a 16× upsampling)."""
    rng = np.random.default_rng(1)
    f = rng.normal(size=(8, 8, 32)).astype(np.float32)
    g = np.roll(f, shift=(1, 2), axis=(0, 1))  # down 1 cell, right 2 cells
    handles = np.array([[40, 40], [56, 24]])
    d, matched = match_distances(jnp.asarray(f), jnp.asarray(g), jnp.asarray(handles),
                                 jnp.asarray(handles + [32, 16]), hw=(128, 128))
    np.testing.assert_array_equal(np.asarray(matched), handles + [32, 16])
    np.testing.assert_allclose(np.asarray(d), 0.0, atol=1e-6)


def test_dai_formula_on_constructed_patches():
    h, w = 40, 50
    orig = np.zeros((h, w, 3), np.float32)
    res = np.zeros((h, w, 3), np.float32)
    orig[8:13, 8:13] = 1.0         # a white 5×5 square at the handle (10, 10)
    res[18:23, 28:33] = 0.5        # half as bright at the target (30, 20)
    handles, targets = np.array([[10, 10]]), np.array([[30, 20]])
    # γ = 2: the patches are exactly the squares: Σ (1 − 0.5)² · 3 channels · 25 pixels / 25
    assert dai(orig, res, handles, targets, 2) == pytest.approx(0.75)
    # γ = 1: a 3×3 patch inside the square: the same mean
    assert dai(orig, res, handles, targets, 1) == pytest.approx(0.75)
    # γ = 5: 11×11 patches, 25 differing pixels: 0.75 · 25 / 121
    assert dai(orig, res, handles, targets, 5) == pytest.approx(0.75 * 25 / 121)
    # two pairs, the second perfect: mean over N = 2; the code's quirk divides by N again
    h2, t2 = np.array([[10, 10], [40, 30]]), np.array([[30, 20], [40, 30]])
    assert dai(orig, res, h2, t2, 2) == pytest.approx(0.75 / 2)
    assert dai(orig, res, h2, t2, 2, double_n=True) == pytest.approx(0.75 / 4)
    # unedited, handle = target: 0; at the border the patch repeats the edge pixels
    assert dai(orig, orig, np.array([[0, 0]]), np.array([[0, 0]]), 20) == 0.0
    # ones everywhere vs zeros: 3 per pixel at any position, border included
    assert dai(np.ones_like(orig), orig, np.array([[0, 39]]), np.array([[49, 0]]), 3) == pytest.approx(3.0)


def test_settings_errors_name_the_setting():
    with pytest.raises(SettingsError, match="unknown metric"):
        EvalSettings(metrics=("lpips", "fid"))
    with pytest.raises(SettingsError, match="ensemble"):
        EvalSettings(ensemble=0)
    with pytest.raises(SettingsError, match="setting t = 1000"):
        EvalSettings(t=1000)


def test_missing_weights_are_named(tmp_path):
    with pytest.raises(WeightsError, match="LPIPS weights not found"):
        load_lpips(tmp_path / "nope.safetensors")
    with pytest.raises(WeightsError, match="convert .pth"):
        (tmp_path / "alex.pth").write_bytes(b"x")
        load_lpips(tmp_path / "alex.pth")
    with pytest.raises(WeightsError, match="not a diffusers model folder"):
        (tmp_path / "sd").mkdir()
        load_dift(tmp_path / "sd")
    with pytest.raises(WeightsError, match="no such DIFT model"):
        load_dift(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# the runner on a small DragBench-layout dataset


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalnets")
    return Networks(lpips=load_lpips(tiny.write_random_lpips(root / "lpips.safetensors")),
                    dift=load_dift(tiny.write_tiny_sd21(root)),
                    clip=load_clip_image(tiny.write_tiny_clip_b32(root))), root


def _sample(root: Path, name: str, img: np.ndarray, points, prompt="a red square"):
    d = root / name
    d.mkdir(parents=True)
    Image.fromarray(img).save(d / "original_image.png")
    meta = {"prompt": prompt, "points": [list(p) for p in points],
            "mask": np.ones(img.shape[:2], np.uint8)}
    with open(d / "meta_data.pkl", "wb") as f:
        pickle.dump(meta, f)


@pytest.fixture()
def bench(tmp_path):
    """4 samples in 2 categories; results in three layouts; one result missing."""
    rng = np.random.default_rng(2)
    data, res = tmp_path / "data", tmp_path / "results"
    imgs = {}
    for name, (h, w), pts in [("animals/a1", (64, 64), [[10, 12], [20, 12]]),
                              ("animals/a2", (64, 96), [[30, 20], [40, 25], [5, 5], [5, 9]]),
                              ("art/b1", (64, 64), [[32, 32], [32, 40]]),
                              ("art/b2", (64, 64), [[1, 1], [2, 2]])]:
        img = rng.integers(0, 256, (h, w, 3), np.uint8)
        imgs[name] = img
        _sample(data, name, img, pts)
    # a1: jaxdrag run's layout, unedited; a2: the DragBench scripts' layout, edited;
    # b1: GoodDrag's file layout, unedited; b2: no result
    (res / "animals/a1").mkdir(parents=True)
    Image.fromarray(imgs["animals/a1"]).save(res / "animals/a1/edited.png")
    (res / "animals/a2").mkdir(parents=True)
    Image.fromarray(np.roll(imgs["animals/a2"], 3, axis=1)).save(res / "animals/a2/dragged_image.png")
    (res / "art").mkdir()
    Image.fromarray(imgs["art/b1"]).save(res / "art/b1.png")
    return data, res, imgs


def test_evaluate_layouts_categories_and_skips(nets, bench, tmp_path):
    networks, _ = nets
    data, res, _ = bench
    out = tmp_path / "eval"
    s = EvalSettings(ensemble=2, batch_size=2)
    summary = evaluate(res, data, out, networks, s, progress=False)
    assert sorted(summary["skipped"]) == ["art/b2"]
    assert "no result image" in summary["skipped"]["art/b2"]
    recs = {n: json.loads((out / "samples" / f"{n}.json").read_text())
            for n in ("animals/a1", "animals/a2", "art/b1")}
    assert recs["animals/a1"]["result"].endswith("edited.png")
    assert recs["animals/a2"]["result"].endswith("dragged_image.png")
    assert recs["art/b1"]["result"].endswith("b1.png")
    # unedited results: LPIPS 0, CLIP similarity 1, DAI of the drag of an unmoved image
    for n in ("animals/a1", "art/b1"):
        m = recs[n]["metrics"]
        assert abs(m["lpips"]) < 1e-9 and m["clip"] == pytest.approx(1.0, abs=1e-6)
    assert recs["animals/a2"]["metrics"]["lpips"] > 0.01
    # aggregates: MD is the mean over all pairs (1 + 2 + 1 = 4), not over images
    all_md = [d for r in recs.values() for d in r["metrics"]["md"]]
    assert summary["overall"]["pairs"] == 4
    assert summary["overall"]["md"] == pytest.approx(np.mean(all_md))
    assert summary["overall"]["lpips_x_md"] == pytest.approx(summary["overall"]["lpips"] * summary["overall"]["md"])
    assert summary["overall"]["image_fidelity"] == pytest.approx(1 - summary["overall"]["lpips"])
    assert set(summary["categories"]) == {"animals", "art"}
    assert summary["categories"]["art"]["samples"] == 1
    assert set(summary["overall"]["dai"]) == {"1", "5", "10", "20"}
    md = (out / "summary.md").read_text()
    assert "| **all** |" in md and "| animals |" in md and "art/b2: " in md


def test_evaluate_resumes_and_recomputes_only_what_changed(nets, bench, tmp_path, monkeypatch):
    from jaxdrag.eval import runner

    networks, _ = nets
    data, res, _ = bench
    out = tmp_path / "eval"
    s = EvalSettings(metrics=("lpips", "dai"), batch_size=4)
    first = evaluate(res, data, out, networks, s, progress=False)
    calls = []
    real = runner._compute
    monkeypatch.setattr(runner, "_compute", lambda items, n, st: (calls.append(
        {it.name: list(it.todo) for it in items}), real(items, n, st)))
    again = evaluate(res, data, out, networks, s, progress=False)
    assert calls == [] and again["overall"] == first["overall"]
    (out / "samples" / "animals" / "a1.json").unlink()
    evaluate(res, data, out, networks, s, progress=False)
    assert calls == [{"animals/a1": ["lpips", "dai"]}]
    calls.clear()
    s2 = EvalSettings(metrics=("lpips", "dai"), dai_double_n=True)
    evaluate(res, data, out, networks, s2, progress=False)
    assert calls == [{"animals/a1": ["dai"], "animals/a2": ["dai"], "art/b1": ["dai"]}]


def test_bad_samples_are_reported_not_fatal(nets, bench, tmp_path):
    networks, _ = nets
    data, res, imgs = bench
    # a result of another shape, a point outside its image, an unreadable result
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(res / "animals/a1/edited.png")
    _sample(data, "art/b3", imgs["art/b1"], [[10, 10], [64, 10]])
    (res / "art/b3").mkdir()
    Image.fromarray(imgs["art/b1"]).save(res / "art/b3/edited.png")
    _sample(data, "art/b4", imgs["art/b1"], [[10, 10], [12, 10]])
    (res / "art/b4").mkdir()
    (res / "art/b4/edited.png").write_bytes(b"not a png")
    summary = evaluate(res, data, tmp_path / "eval", networks, EvalSettings(metrics=("lpips", "dai")),
                       progress=False)
    sk = summary["skipped"]
    assert "size mismatch: result is 128×64, source is 64×64" in sk["animals/a1"]
    assert "point 1 (target of pair 0) (64, 10) is outside the 64×64 image" in sk["art/b3"]
    assert "cannot read image" in sk["art/b4"]
    assert summary["overall"]["samples"] == 2  # a2 and b1 still evaluated


def test_missing_network_for_a_metric_is_named(bench, tmp_path):
    data, res, _ = bench
    with pytest.raises(SettingsError, match=r"metric 'md' needs its network's weights \(--dift PATH\)"):
        evaluate(res, data, tmp_path / "e", Networks(), EvalSettings(metrics=("md",)), progress=False)


def test_cli_eval(nets, bench, tmp_path, capsys):
    _, root = nets
    data, res, _ = bench
    out = tmp_path / "cli_eval"
    rc = main(["eval", str(res), "--data", str(data), "--out", str(out), "--dift", str(root / "tiny-sd21"),
               "--lpips", str(root / "lpips.safetensors"), "--clip", str(root / "tiny-clip-vit-b32"),
               "--ensemble", "2", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "LPIPS×MD" in text and "DAI γ=20" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["samples"] == 3 and "md" in summary["overall"]
    # without weights: only DAI by default; a metric whose weights are missing is a named error
    rc = main(["eval", str(res), "--data", str(data), "--out", str(tmp_path / "dai_only"), "--quiet"])
    assert rc == 0 and "dai" in json.loads((tmp_path / "dai_only" / "summary.json").read_text())["overall"]
    capsys.readouterr()
    rc = main(["eval", str(res), "--data", str(data), "--metrics", "md,lpips"])
    assert rc == 2
    assert "--metrics md,lpips need(s) weights: --dift PATH, --lpips PATH" in capsys.readouterr().err
    rc = main(["eval", str(tmp_path / "nothing"), "--data", str(data), "--quiet"])
    assert rc == 2 and "results folder not found" in capsys.readouterr().err


def test_dragbench_samples_with_tiny_networks(nets, tmp_path):
    """Two real DragBench samples (non-square 512-wide images), their originals as results: the
    pipeline runs at full resolution and LPIPS is 0."""
    networks, _ = nets
    bench = shared_data("data", "DragBench")
    names = ["animals/JH_2023-09-14-1820-16", "land_scape/JH_2023-09-14-1431-47"]
    names = [n for n in names if (bench / n).is_dir()] or \
        [str(p.parent.relative_to(bench)) for p in sorted(bench.glob("*/*/meta_data.pkl"))[:2]]
    res = tmp_path / "res"
    for n in names:
        (res / n).mkdir(parents=True)
        shutil.copy(bench / n / "original_image.png", res / n / "dragged_image.png")
    s = EvalSettings(metrics=("lpips", "md", "dai"), ensemble=1, batch_size=2)
    summary = evaluate(res, bench, tmp_path / "eval", networks, s, only=names, progress=False)
    assert summary["overall"]["samples"] == len(names) and not summary["skipped"]
    assert abs(summary["overall"]["lpips"]) < 1e-9
    for n in names:
        rec = json.loads((tmp_path / "eval" / "samples" / f"{n}.json").read_text())
        assert len(rec["metrics"]["md"]) == rec["pairs"] and rec["prompt"]


def test_sd21_single_file_with_openclip_text_tower_equals_the_folder(tmp_path):
    """An LDM single file of SD-2.x (UNet/VAE in LDM names, the text tower in OpenCLIP's layout
    with fused q/k/v and one more block than is used) loads to the folder's parameters."""
    import jax
    from safetensors.numpy import load_file

    from jaxdrag import weights
    from jaxdrag.eval.networks import OPENCLIP, load_sd2_single_file

    folder = tiny.write_tiny_sd21(tmp_path)
    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(folder / "text_encoder" / "model.safetensors")
    flat = weights.to_ldm_single_file(unet, vae, {}, tiny.TINY_SD21_UNET, tiny.TINY_VAE)
    t = lambda k: text["text_model." + k] if "text_model." + k in text else text[k]  # noqa: E731
    oc = {"token_embedding.weight": t("embeddings.token_embedding.weight"),
          "positional_embedding": t("embeddings.position_embedding.weight"),
          "ln_final.weight": t("final_layer_norm.weight"), "ln_final.bias": t("final_layer_norm.bias"),
          "text_projection": np.ones((48, 32), np.float32), "logit_scale": np.asarray(4.6, np.float32)}
    n = tiny.TINY_SD21_TEXT.num_hidden_layers
    for i in range(n + 1):  # block n is the unused last layer (SD-2.x reads the penultimate)
        j = min(i, n - 1)
        L = f"encoder.layers.{j}."
        b = f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            oc[b + f"attn.in_proj_{leaf}"] = np.concatenate(
                [t(L + f"self_attn.{p}_proj.{leaf}") for p in "qkv"]) * (1.0 if i < n else 7.0)
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                oc[b + f"{theirs}.{leaf}"] = t(L + f"{ours}.{leaf}")
    flat.update({OPENCLIP + k: v for k, v in oc.items()})
    weights.save_safetensors(flat, tmp_path / "sd21.safetensors")
    u, v, x = load_sd2_single_file(tmp_path / "sd21.safetensors", dtype=jnp.float32,
                                   configs=(tiny.TINY_SD21_UNET, tiny.TINY_VAE, tiny.TINY_SD21_TEXT))
    ref = load_dift(folder)
    for got, want in ((u, ref.unet), (v, ref.vae), (x, ref.text_encoder)):
        for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # an SD-1.x file is not mistaken for one
    with pytest.raises(WeightsError, match="not an SD-2.x single file"):
        weights.save_safetensors(weights.to_ldm_single_file(unet, vae, {}, tiny.TINY_SD21_UNET, tiny.TINY_VAE),
                                 tmp_path / "no_text.safetensors")
        load_sd2_single_file(tmp_path / "no_text.safetensors", dtype=jnp.float32,
                             configs=(tiny.TINY_SD21_UNET, tiny.TINY_VAE, tiny.TINY_SD21_TEXT))


def test_a_rerun_with_other_metrics_keeps_the_earlier_ones(nets, bench, tmp_path):
    networks, _ = nets
    data, res, _ = bench
    out = tmp_path / "eval"
    evaluate(res, data, out, networks, EvalSettings(metrics=("lpips",)), progress=False)
    before = json.loads((out / "samples" / "animals" / "a2.json").read_text())
    evaluate(res, data, out, networks, EvalSettings(metrics=("dai",)), progress=False)
    after = json.loads((out / "samples" / "animals" / "a2.json").read_text())
    assert after["metrics"]["lpips"] == before["metrics"]["lpips"] and "dai" in after["metrics"]
    assert after["settings"] == {"lpips": {}, "dai": {"gammas": [1, 5, 10, 20], "double_n": False}}
