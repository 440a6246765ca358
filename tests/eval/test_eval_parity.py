"""The evaluation networks against their PyTorch references on identical random weights:
LPIPS against the ``lpips`` package, DIFT features against a diffusers statement of DIFT on a tiny
SD-2.1-architecture model, the mean-distance matching against the script's torch code, CLIP
ViT-B/32 image embeddings against transformers."""

import runpy
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import nchw, nhwc  # noqa: E402
from jaxdrag.testing.torch_reference import TorchDift, import_lpips, torch_match  # noqa: E402
from jaxdrag import tiny  # noqa: E402
from jaxdrag.eval import load_clip_image, load_dift, load_lpips  # noqa: E402
from jaxdrag.eval.image import clip_preprocess, resize_bilinear  # noqa: E402
from jaxdrag.eval.metrics import dift_features, lpips_224, match_distances  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lpips_pkg():
    lp = import_lpips()
    if lp is None:
        pytest.skip("the lpips package is not installed (pip install --no-deps lpips==0.1.4)")
    return lp


def _convert(argv):
    mod = runpy.run_path(str(ROOT / "scripts" / "convert_lpips.py"))
    assert mod["main"](argv) == 0


def test_lpips_equals_the_lpips_package(lpips_pkg, tmp_path):
    torch.manual_seed(0)
    ref = lpips_pkg.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    torch.save(ref.state_dict(), tmp_path / "lpips_module.pth")
    _convert(["--lpips-state", str(tmp_path / "lpips_module.pth"), "--out", str(tmp_path / "a.safetensors")])
    # the other route: torchvision-named trunk + the package's own lin file (the default --lin)
    trunk = {f"features.{k.split('.', 2)[2]}": v for k, v in ref.state_dict().items() if k.startswith("net.")}
    torch.save(trunk, tmp_path / "alexnet.pth")
    _convert(["--alexnet", str(tmp_path / "alexnet.pth"), "--out", str(tmp_path / "b.safetensors")])
    a, b = load_lpips(tmp_path / "a.safetensors"), load_lpips(tmp_path / "b.safetensors")
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    from flax import nnx

    fn = jax.jit(lambda u, v: lpips_224(lambda p, q: nnx.merge(a.graphdef, a.params)(p, q), u, v))
    rng = np.random.default_rng(0)
    for hw in [(64, 96), (300, 260), (224, 224)]:
        x0 = rng.uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
        x1 = np.clip(x0 + rng.normal(0, 0.3, x0.shape), -1, 1).astype(np.float32)
        with torch.no_grad():
            t0 = torch.nn.functional.interpolate(nchw(x0), (224, 224), mode="bilinear", align_corners=False)
            t1 = torch.nn.functional.interpolate(nchw(x1), (224, 224), mode="bilinear", align_corners=False)
            want = ref(t0, t1).flatten().numpy()
        got = np.asarray(fn(jnp.asarray(x0), jnp.asarray(x1)))
        assert np.abs(got - want).max() <= 1e-5, (hw, got, want)
        assert want.min() > 1e-3  # a real distance, not a trivial zero
        # an unedited image: 0 up to float rounding of the batched convolutions (measured 2.6e-16)
        assert np.abs(np.asarray(fn(jnp.asarray(x0), jnp.asarray(x0)))).max() < 1e-9


def test_bilinear_resize_equals_torch():
    rng = np.random.default_rng(1)
    for (h, w), out in [((37, 53), (224, 224)), ((5, 6), (72, 88)), ((512, 341), (224, 224))]:
        x = rng.normal(size=(1, h, w, 2)).astype(np.float32)
        want = nhwc(torch.nn.functional.interpolate(nchw(x), out, mode="bilinear", align_corners=False))
        got = np.asarray(resize_bilinear(jnp.asarray(x), out))
        assert np.abs(got - want).max() < 2e-6


@pytest.fixture(scope="module")
def sd21(tmp_path_factory):
    return tiny.write_tiny_sd21(tmp_path_factory.mktemp("sd21"))


def test_dift_features_equal_diffusers(sd21):
    from flax import nnx

    m = load_dift(sd21)
    rng = np.random.default_rng(2)
    h, w, e, t, up = 72, 88, 3, 261, 1  # a latent of 9×11: not a multiple of the UNet's 8
    image = rng.uniform(-1, 1, (1, h, w, 3)).astype(np.float32)
    # a plain prompt: jaxdrag's tokenizer also applies OpenAI CLIP's text cleanup (ftfy, HTML
    # unescape), which transformers' tokenizer does not; for plain text the ids are equal
    prompt = "a photo of a red dog and a cat"
    lat_hw = (9, 11)
    eps_p = rng.normal(size=(e, 4, *lat_hw)).astype(np.float32)
    eps_n = rng.normal(size=(e, 4, *lat_hw)).astype(np.float32)
    ref = TorchDift(sd21)
    want = nhwc(ref.features(nchw(image), prompt, t, up, e, torch.from_numpy(eps_p), torch.from_numpy(eps_n)))[0]
    ids = ref.ids(prompt).numpy()

    np.testing.assert_array_equal(m.tokenizer.ids([prompt]), ids)  # pads with "!" (id 0)
    assert (ids[0] == 0).sum() > 50
    unet = m.unet.module()
    vae = m.vae.module()
    ctx = nnx.merge(m.text_encoder.graphdef, m.text_encoder.params)(jnp.asarray(ids))[0]
    got = dift_features(lambda z, tt, c: unet(z, tt, c, up_until=up)[1]["up"][up], vae.encode,
                        jnp.asarray(image), ctx, jnp.asarray(eps_p.transpose(0, 2, 3, 1))[None],
                        jnp.asarray(eps_n.transpose(0, 2, 3, 1))[None],
                        alpha_t=jnp.asarray(m.schedule.alphas_cumprod[t]), t=t,
                        scaling=float(m.vae.cfg.scaling_factor), up_index=up)[0]
    assert got.shape == want.shape == (5, 6, 64)
    err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert err <= 1e-4, err


def test_mean_distance_matching_equals_the_script():
    """The argmax matching of ``run_eval_point_matching.py`` (torch: upsample both maps to full
    resolution, nn.CosineSimilarity, np.argmax) on random feature maps."""
    rng = np.random.default_rng(3)
    h, w, c, big = 6, 5, 32, (96, 80)
    f_src = rng.normal(size=(h, w, c)).astype(np.float32)
    f_drag = (f_src + rng.normal(0, 0.7, f_src.shape)).astype(np.float32)
    handles = np.array([[10, 20], [79, 95], [0, 0], [40, 51]])
    targets = np.array([[30, 25], [60, 90], [5, 9], [41, 50]])
    up = lambda f: torch.nn.functional.interpolate(nchw(f[None]), big, mode="bilinear")  # noqa: E731
    want, _ = torch_match(up(f_src), up(f_drag), handles, targets)
    for rows in (7, 64, 200):  # chunking of the full-resolution map does not matter
        d, _ = match_distances(jnp.asarray(f_src), jnp.asarray(f_drag), jnp.asarray(handles),
                               jnp.asarray(targets), hw=big, rows=rows)
        np.testing.assert_allclose(np.asarray(d), want, rtol=0, atol=1e-5)


def test_clip_b32_image_embeddings_equal_transformers(tmp_path):
    from transformers import CLIPImageProcessor, CLIPModel

    folder = tiny.write_tiny_clip_b32(tmp_path)
    ref = CLIPModel.from_pretrained(folder).eval()
    ours = load_clip_image(folder)
    from PIL import Image

    rng = np.random.default_rng(4)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for h, w in [(341, 512), (512, 384)]]
    px = np.stack([clip_preprocess(im) for im in imgs])
    # CLIP's preprocessing: same pixels as transformers' CLIPImageProcessor (PIL bicubic, crop)
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    hf_px = proc(images=imgs, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert np.abs(px - hf_px).max() < 2e-2  # uint8 rounding of the resized image (≤ 1 level)
    assert np.abs(px - hf_px).mean() < 2e-3
    with torch.no_grad():
        out = ref.get_image_features(pixel_values=nchw(px))
        want = (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()
    got = np.asarray(ours.module().image_embeds(jnp.asarray(px)))
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def test_runner_mean_distance_equals_the_script_with_the_same_noise(sd21, tmp_path):
    """The whole MD path of the runner (reading, the dragged image resized to the source size
    with PIL, prompt, batching of two sizes, per-sample noise keys, matching) against the torch
    script fed the same noise draws: equal distances."""
    import pickle

    import torch.nn.functional as F
    from PIL import Image

    from jaxdrag.data import find_samples
    from jaxdrag.eval import EvalSettings, Networks
    from jaxdrag.eval.image import to_signed_dift
    from jaxdrag.eval.runner import _compute, load_item, sample_key

    rng = np.random.default_rng(5)
    data, res = tmp_path / "data", tmp_path / "res"
    for name, (h, w), pts in [("c/s1", (64, 96), [[10, 12], [30, 40], [50, 50], [60, 20]]),
                              ("c/s2", (72, 64), [[20, 30], [40, 30]]),
                              ("d/s3", (64, 96), [[90, 60], [70, 10]])]:
        img = rng.integers(0, 256, (h, w, 3), np.uint8)
        (data / name).mkdir(parents=True)
        Image.fromarray(img).save(data / name / "original_image.png")
        with open(data / name / "meta_data.pkl", "wb") as f:
            pickle.dump({"prompt": f"a picture {name}", "points": pts, "mask": np.ones((h, w), np.uint8)}, f)
        (res / name).mkdir(parents=True)
        # results at another size of the same aspect: the script resizes them to the source size
        Image.fromarray(np.roll(img, 5, axis=1)).resize((w * 2, h * 2)).save(res / name / "dragged_image.png")
    nets, ref = Networks(dift=load_dift(sd21)), TorchDift(sd21)
    items = [load_item(s, res) for s in find_samples(data)]
    for it in items:
        it.todo = ["md"]
    e = 2
    _compute(items, nets, EvalSettings(metrics=("md",), ensemble=e, batch_size=3))
    for it in items:
        w, h = it.source.size
        lat = nets.dift.vae.module().encode(jnp.asarray(to_signed_dift(it.source))[None])[0].shape[1:]
        feats = []
        for which, img in ((0, it.source), (1, it.result.resize((w, h), Image.BILINEAR))):
            k = sample_key(42, it.name, which)
            eps = [torch.from_numpy(np.asarray(jax.random.normal(jax.random.fold_in(k, i), (e,) + lat))
                                    .transpose(0, 3, 1, 2).copy()) for i in (0, 1)]
            x = torch.from_numpy(to_signed_dift(img)).permute(2, 0, 1)[None]
            f = ref.features(x, it.prompt, ensemble=e, eps_p=eps[0], eps_n=eps[1])
            feats.append(F.interpolate(f, (h, w), mode="bilinear"))
        want, _ = torch_match(feats[0], feats[1], it.handles, it.targets)
        np.testing.assert_allclose(it.out["md"], want, atol=1e-4)
