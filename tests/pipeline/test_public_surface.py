"""``load_pipeline`` and its network methods on the tiny default model; the tiny folders are real
diffusers / transformers folders: the PyTorch libraries load them and agree with us."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import nchw, nhwc, rel_err


def test_shapes_dtypes(tiny_pipe):
    p = tiny_pipe
    emb = p.encode_prompt(["a photo of a cat", "a dog"])
    assert emb.shape == (2, 77, 64) and emb.dtype == jnp.float32
    img = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 48, 40, 3)), jnp.float32)
    lat = p.vae_encode(img)
    assert lat.shape == (2, 6, 5, 4) and lat.dtype == jnp.float32
    eps = p.unet(lat, 681, emb)
    assert eps.shape == lat.shape and bool(jnp.isfinite(eps).all())
    dec = p.vae_decode(lat)
    assert dec.shape == (2, 48, 40, 3)
    ie, te = p.clip_image_embeds(img), p.clip_text_embeds(["a cat", "a dog"])
    assert ie.shape == te.shape == (2, 32)
    assert p.native_width == 128 and p.scaling_factor == pytest.approx(0.18215)


def test_diffusers_and_transformers_load_the_tiny_model(tiny_models, tiny_pipe):
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    sd, clip = tiny_models
    rs = np.random.RandomState(1)
    emb = np.asarray(tiny_pipe.encode_prompt(["a photo of a cat"]))
    te = CLIPTextModel.from_pretrained(sd / "text_encoder").eval()
    with torch.no_grad():
        ref = te(torch.from_numpy(tiny_pipe.tokenizer.ids(["a photo of a cat"]).astype(np.int64))).last_hidden_state
    assert rel_err(emb, ref.numpy()) < 1e-4

    lat = rs.randn(1, 8, 12, 4).astype(np.float32)
    un = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
    with torch.no_grad():
        ref = nhwc(un(nchw(lat), 681, torch.from_numpy(emb)).sample)
    with jax.default_matmul_precision("highest"):
        assert rel_err(tiny_pipe.unet(lat, 681, emb), ref) < 1e-4

    vae = AutoencoderKL.from_pretrained(sd / "vae").eval()
    img = rs.uniform(-1, 1, (1, 64, 96, 3)).astype(np.float32)
    with torch.no_grad():
        ref_lat = nhwc(vae.encode(nchw(img)).latent_dist.mean) * vae.config.scaling_factor
        ref_img = nhwc(vae.decode(nchw(ref_lat) / vae.config.scaling_factor).sample)
    assert rel_err(tiny_pipe.vae_encode(img), ref_lat) < 1e-4
    assert rel_err(tiny_pipe.vae_decode(ref_lat), ref_img) < 1e-4

    cm = CLIPModel.from_pretrained(clip).eval()
    ids = tiny_pipe.clip_tokenizer.ids(["a cat"]).astype(np.int64)
    with torch.no_grad():
        ref = cm.get_text_features(input_ids=torch.from_numpy(ids))
    ref = getattr(ref, "pooler_output", ref)
    assert rel_err(tiny_pipe.clip_text_embeds(["a cat"]), ref.numpy()) < 1e-4


def test_clip_model_required_for_clip_methods(tiny_models):
    import jaxdrag

    p = jaxdrag.load_pipeline(tiny_models[0], dtype="float32")
    with pytest.raises(ValueError, match="no CLIP model: pass clip=PATH"):
        p.clip_text_embeds(["x"])
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        jaxdrag.load_pipeline(tiny_models[0], dtype="float8")
