"""Full-size SD-1.5 (random weights): the diffusers folder and the LDM single file load to
identical parameters and the same ε as diffusers at 64×64. Slow (minutes, ~16 GB RAM, ~9 GB disk):
    pytest -m slow -s tests/models/test_full_size.py
"""

import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import nchw, nhwc, rel_err  # noqa: E402
from jaxdrag import weights  # noqa: E402

pytestmark = pytest.mark.slow


def test_full_sd15_folder_and_single_file(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from jaxdrag.models.unet import SD15_UNET
    from jaxdrag.models.vae import SD15_VAE
    from jaxdrag.tokenizer import BUNDLED

    figures = {}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**{k: v for k, v in SD15_UNET.to_diffusers().items() if k != "_class_name"}).eval()
    vae = AutoencoderKL(**{k: v for k, v in SD15_VAE.to_diffusers().items() if k != "_class_name"}).eval()
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, projection_dim=768)).eval()
    figures["torch init s"] = time.perf_counter() - t0
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    folder = tmp_path / "sd15"
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    import shutil
    shutil.copytree(BUNDLED, folder / "tokenizer")
    sds = [{k: v.numpy() for k, v in m.state_dict().items()} for m in (unet, vae, text)]
    sds[2] = {weights.text_model_name(k): v for k, v in sds[2].items()}
    single = tmp_path / "sd15.safetensors"
    weights.save_safetensors(weights.to_ldm_single_file(*sds, SD15_UNET, SD15_VAE), single)
    del sds
    rs = np.random.RandomState(0)
    x = rs.randn(1, 64, 64, 4).astype(np.float32)
    ctx = rs.randn(1, 77, 768).astype(np.float32)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = nhwc(unet(nchw(x), 681, torch.from_numpy(ctx)).sample)
    figures["torch UNet fwd 64x64 s"] = time.perf_counter() - t0
    del unet, vae, text
    gc.collect()

    t0 = time.perf_counter()
    a = weights.load_sd(folder, dtype=jnp.float32)
    jax.block_until_ready(a.unet.params)
    figures["load diffusers folder s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = weights.load_single_file(single, dtype=jnp.float32)
    jax.block_until_ready(b[0].params)
    figures["load LDM single file s"] = time.perf_counter() - t0
    for x_, y_ in zip((a.unet, a.vae, a.text_encoder), b):
        fx, fy = weights.flat(x_.params), weights.flat(y_.params)
        assert fx.keys() == fy.keys()
        assert all(np.array_equal(np.asarray(fx[k]), np.asarray(fy[k])) for k in fx)
    del b
    gc.collect()

    fwd = jax.jit(lambda p, x, c: a.unet.module(params=p)(x, jnp.array([681]), c)[0])
    with jax.default_matmul_precision("highest"):
        t0 = time.perf_counter()
        eps = jax.block_until_ready(fwd(a.unet.params, x, ctx))
        figures["jax UNet compile+fwd s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        eps = jax.block_until_ready(fwd(a.unet.params, x, ctx))
        figures["jax UNet fwd 64x64 s"] = time.perf_counter() - t0
    err = rel_err(eps, ref)
    figures["eps max abs err"] = float(np.abs(np.asarray(eps) - ref).max())
    figures["eps max |ref|"] = float(np.abs(ref).max())
    print("\nfull-size SD-1.5 figures:")
    for k, v in figures.items():
        print(f"  {k:28s} {v:.6g}")
    assert err < 1e-4
