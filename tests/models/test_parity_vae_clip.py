"""VAE and CLIP parity with diffusers / transformers PyTorch models on identical random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import nchw, nhwc, randomize, rel_err, torch_vae  # noqa: E402
from jaxdrag import weights  # noqa: E402
from jaxdrag.pipeline import CLIP_MEAN, CLIP_STD, adaptive_avg_pool, clip_pixels  # noqa: E402

TOL = 1e-4
VAE_CONFIGS = {
    "standard": dict(block_out_channels=(16, 32, 32, 32), layers_per_block=2, norm_num_groups=8),
    "odd": dict(block_out_channels=(12, 21, 27, 27), layers_per_block=1, norm_num_groups=3),
}


@pytest.mark.parametrize("name", list(VAE_CONFIGS))
@pytest.mark.parametrize("hw", [(64, 48), (44, 60)])  # 44×60: odd intermediate sizes (asymmetric pad)
def test_vae_encode_decode(name, hw, tmp_path):
    cfg = dict(VAE_CONFIGS[name], latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4)
    tv = torch_vae(seed=len(name), **cfg)
    tv.save_pretrained(tmp_path / "vae")
    comp = weights.load_diffusers_vae(tmp_path / "vae", dtype=jnp.float32)
    m = comp.module()
    x = np.random.RandomState(0).uniform(-1, 1, (2,) + hw + (3,)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        mean, logvar = m.encode(jnp.asarray(x))
    with torch.no_grad():
        post = tv.encode(nchw(x)).latent_dist
    assert mean.shape == (2, hw[0] // 8, hw[1] // 8, 4)
    assert rel_err(mean, nhwc(post.mean)) < TOL
    assert rel_err(logvar, nhwc(post.logvar)) < TOL
    z = np.random.RandomState(1).randn(2, 5, 7, 4).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        dec = m.decode(jnp.asarray(z))
    with torch.no_grad():
        ref = nhwc(tv.decode(nchw(z)).sample)
    assert dec.shape == (2, 40, 56, 3)
    assert rel_err(dec, ref) < TOL


def _text_cfg():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=16)


def _ids():
    ids = np.random.RandomState(0).randint(0, 49406, (2, 77))
    ids[:, 0] = 49406
    ids[0, 9:] = 49407
    ids[1, 30:] = 49407
    return ids


def test_sd_text_encoder(tmp_path):
    from transformers import CLIPTextModel

    tt = randomize(CLIPTextModel(_text_cfg()), 1, 0.02)
    tt.save_pretrained(tmp_path / "te")
    comp = weights.load_hf_text_encoder(tmp_path / "te", dtype=jnp.float32)
    ids = _ids()
    with jax.default_matmul_precision("highest"):
        last, pooled = comp.module()(jnp.asarray(ids))
    with torch.no_grad():
        out = tt(torch.from_numpy(ids))
    assert last.shape == (2, 77, 32)
    assert rel_err(last, out.last_hidden_state.numpy()) < TOL
    assert rel_err(pooled, out.pooler_output.numpy()) < TOL


def test_clip_model_both_towers(tmp_path):
    """HF CLIPModel folder: image and text embeddings; and CLIPDrag's differentiable
    preprocessing (AdaptiveAvgPool to the input size, CLIP normalisation) vs torch."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                          image_size=64, patch_size=16, projection_dim=16)
    tm = randomize(CLIPModel(CLIPConfig(text_config=_text_cfg().to_dict(), vision_config=vc.to_dict(),
                                        projection_dim=16)), 2, 0.02)
    tm.save_pretrained(tmp_path / "clip")
    comp = weights.load_hf_clip(tmp_path / "clip", dtype=jnp.float32)
    m = comp.module()
    px = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
    ids = _ids()
    with jax.default_matmul_precision("highest"):
        ie, te = m.image_embeds(jnp.asarray(px)), m.text_embeds(jnp.asarray(ids))
    with torch.no_grad():
        rie = tm.get_image_features(pixel_values=nchw(px))
        rte = tm.get_text_features(input_ids=torch.from_numpy(ids))
    rie = getattr(rie, "pooler_output", rie)
    rte = getattr(rte, "pooler_output", rte)
    assert rel_err(ie, rie.numpy()) < TOL
    assert rel_err(te, rte.numpy()) < TOL

    img = np.random.RandomState(1).uniform(-1, 1, (2, 100, 150, 3)).astype(np.float32)
    pooled = adaptive_avg_pool(jnp.clip((jnp.asarray(img) + 1) / 2, 0, 1), 64)
    ref = torch.nn.AdaptiveAvgPool2d(64)(torch.clamp((nchw(img) + 1) / 2, 0, 1))
    assert rel_err(pooled, nhwc(ref)) < 1e-6
    with torch.no_grad():
        normed = (ref - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
        r2 = tm.get_image_features(pixel_values=normed)
    r2 = getattr(r2, "pooler_output", r2)
    with jax.default_matmul_precision("highest"):
        ours = m.image_embeds(clip_pixels(jnp.asarray(img), 64))
    assert rel_err(ours, r2.numpy()) < TOL
