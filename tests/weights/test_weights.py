"""Weight loading: the key tables against two oracles (diffusers' own single-file converter and
the checked SD-1.5 key map), single-file vs folder loads, dtypes, and clear errors on bad files."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import shared_data
from jaxdrag import weights
from jaxdrag.models.clip import VIT_B16_TEXT, VIT_B16_VISION, SD15_TEXT, CLIPModel, CLIPTextModel
from jaxdrag.models.lora import export_peft, import_peft, init_lora
from jaxdrag.models.unet import SD15_UNET, UNet2DConditionModel
from jaxdrag.models.vae import SD15_VAE, AutoencoderKL
from jaxdrag.tiny import TINY_TEXT, TINY_UNET, TINY_VAE
from jaxdrag.weights import WeightsError


def _tables():
    _, _, ub = weights.abstract(lambda: UNet2DConditionModel(SD15_UNET))
    _, _, vb = weights.abstract(lambda: AutoencoderKL(SD15_VAE))
    return weights.key_table(ub), weights.key_table(vb)


def test_sd15_key_tables_match_diffusers_single_file_converter():
    """Our LDM names, fed to diffusers' convert_ldm_{unet,vae}_checkpoint, come back as exactly
    our diffusers keys with our shapes (686 UNet + 248 VAE tensors; meta tensors, no memory)."""
    torch = pytest.importorskip("torch")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    ut, vt = _tables()
    assert (len(ut), len(vt)) == (686, 248)
    assert sum(int(np.prod(s)) for _, s in ut.values()) == 859_520_964
    meta = {k: torch.empty(s, device="meta") for k, (_, s) in ut.items()}
    vmeta = {k: torch.empty(s, device="meta") for k, (_, s) in vt.items()}
    ldm = weights.to_ldm_single_file(meta, vmeta, {}, SD15_UNET, SD15_VAE)
    ucfg = {k: v for k, v in SD15_UNET.to_diffusers().items() if k != "_class_name"}
    vcfg = {k: v for k, v in SD15_VAE.to_diffusers().items() if k != "_class_name"}
    back = convert_ldm_unet_checkpoint(dict(ldm), ucfg)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: s for k, (_, s) in ut.items()}
    vback = convert_ldm_vae_checkpoint(dict(ldm), vcfg)
    assert {k: tuple(v.shape) for k, v in vback.items()} == {k: s for k, (_, s) in vt.items()}


def test_key_tables_match_reference_keymap():
    """Every row of the checked SD-1.5 / CLIP key map: LDM key ↔ diffusers key ↔ shapes."""
    tsv = shared_data("reference", "sd15_keymap.tsv")
    rows = [line.rstrip("\n").split("\t") for line in tsv.read_text().splitlines()[1:]]
    ut, vt = _tables()
    _, _, tb = weights.abstract(lambda: CLIPTextModel(SD15_TEXT))
    _, _, cb = weights.abstract(lambda: CLIPModel(VIT_B16_TEXT, VIT_B16_VISION, 512))
    tables = {"unet": ut, "vae": vt, "sd15_text_encoder": weights.key_table(tb),
              "clip_vit_b16": weights.key_table(cb)}
    up_attn = tuple(t == "CrossAttnUpBlock2D" for t in SD15_UNET.up_block_types)
    seen = {k: 0 for k in tables}
    for model, ldm, key, _, pt_shape, _, _ in rows:
        if key in ("logit_scale",) or key.endswith("position_ids"):
            continue
        seen[model] += 1
        shape = tuple(int(s) for s in pt_shape.split("x"))
        if model == "vae" and len(shape) == 4 and ".attn_1." in ldm:
            shape = shape[:2]  # LDM 1×1 conv == linear
        assert tables[model][key][1] == shape, key
        if model == "unet":
            assert weights.LDM_UNET + weights.ldm_unet_key(key, 2, up_attn) == ldm
        elif model == "vae":
            assert weights.LDM_VAE + weights.ldm_vae_key(key, 4) == ldm
        elif model == "sd15_text_encoder":
            assert weights.LDM_TEXT + key == ldm
    # every key of ours is in the map (which covers CLIP ViT-B/16's vision tower only)
    expected = {m: len(t) for m, t in tables.items()}
    expected["clip_vit_b16"] = sum(k.startswith(("vision_model.", "visual_projection")) for k in tables["clip_vit_b16"])
    assert seen == expected


# ------------------------------------------------------------------ tiny files in every format


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from jaxdrag.tiny import write_tiny_sd

    return write_tiny_sd(tmp_path_factory.mktemp("w"))


def _load_folder(path, **kw):
    return weights.load_sd(path, dtype=jnp.float32, **kw)


def _flat(comp):
    return {k: np.asarray(v) for k, v in weights.flat(comp.params).items()}


def test_single_file_equals_folder(tiny_sd, tmp_path):
    """The same weights written as an LDM single file (VAE attention as 1×1 convs, EMA copies and
    scheduler buffers present) load to identical parameters."""
    from safetensors.numpy import load_file

    folder = _load_folder(tiny_sd)
    unet = load_file(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    vae = load_file(tiny_sd / "vae" / "diffusion_pytorch_model.safetensors")
    text = load_file(tiny_sd / "text_encoder" / "model.safetensors")
    ldm = weights.to_ldm_single_file(unet, vae, text, TINY_UNET, TINY_VAE)
    ldm["model_ema.diffusion_modelconv_inweight"] = np.zeros(1, np.float32)
    ldm["alphas_cumprod"] = np.zeros(1000, np.float32)
    ldm[weights.LDM_TEXT + "text_model.embeddings.position_ids"] = np.arange(77)[None].astype(np.int64)
    weights.save_safetensors(ldm, tmp_path / "model.safetensors")
    single = weights.load_single_file(tmp_path / "model.safetensors", dtype=jnp.float32,
                                      configs=(TINY_UNET, TINY_VAE, TINY_TEXT))
    for a, b in zip(single, (folder.unet, folder.vae, folder.text_encoder)):
        fa, fb = _flat(a), _flat(b)
        assert fa.keys() == fb.keys()
        assert all(np.array_equal(fa[k], fb[k]) for k in fa)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files_load(tiny_sd, tmp_path, dtype):
    from safetensors.numpy import load_file

    d = tmp_path / "m"
    shutil.copytree(tiny_sd, d)
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    ref = load_file(f)
    f.unlink()
    weights.save_safetensors(ref, d / "unet" / "diffusion_pytorch_model.fp16.safetensors", dtype=dtype)
    comp = weights.load_diffusers_unet(d / "unet", dtype=jnp.float32)
    got = {weights.torch_key(p): weights.to_torch(p[-1], np.asarray(v)) for p, v in weights.flat(comp.params).items()}
    assert all(v.dtype == np.float32 for v in got.values())
    tol = 2 ** -8 if dtype == "bfloat16" else 2 ** -11
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, rtol=tol, atol=1e-6)


def test_old_vae_attention_names_and_unprefixed_text_keys(tiny_sd, tmp_path):
    from safetensors.numpy import load_file

    d = tmp_path / "m"
    shutil.copytree(tiny_sd, d)
    vf = d / "vae" / "diffusion_pytorch_model.safetensors"
    old = {k.replace("attentions.0.to_q.", "attentions.0.query.").replace("attentions.0.to_k.", "attentions.0.key.")
           .replace("attentions.0.to_v.", "attentions.0.value.").replace("attentions.0.to_out.0.", "attentions.0.proj_attn."): v
           for k, v in load_file(vf).items()}
    assert any(".query." in k for k in old)
    weights.save_safetensors(old, vf)
    tf = d / "text_encoder" / "model.safetensors"
    weights.save_safetensors({k.removeprefix("text_model."): v for k, v in load_file(tf).items()}, tf)
    a, b = _load_folder(d), _load_folder(tiny_sd)
    for x, y in ((a.vae, b.vae), (a.text_encoder, b.text_encoder)):
        fx, fy = _flat(x), _flat(y)
        assert all(np.array_equal(fx[k], fy[k]) for k in fx)


def _edit_unet_file(folder, fn):
    from safetensors.numpy import load_file

    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    fn(sd)
    weights.save_safetensors(sd, f)
    return f


def test_missing_key_error_names_file_key_and_shape(tiny_sd, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_sd, d)
    f = _edit_unet_file(d, lambda sd: sd.pop("mid_block.attentions.0.proj_in.weight"))
    with pytest.raises(WeightsError) as e:
        _load_folder(d)
    msg = str(e.value)
    assert str(f) in msg and "missing 1 key" in msg
    assert "mid_block.attentions.0.proj_in.weight (expected shape (64, 64, 1, 1))" in msg


def test_wrong_shape_error(tiny_sd, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_sd, d)

    def bad(sd):
        sd["conv_in.weight"] = np.zeros((32, 4, 5, 5), np.float32)
    f = _edit_unet_file(d, bad)
    with pytest.raises(WeightsError, match=r"key 'conv_in.weight' has shape \(32, 4, 5, 5\), expected \(32, 4, 3, 3\)") as e:
        _load_folder(d)
    assert str(f) in str(e.value)


def test_unexpected_key_error(tiny_sd, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_sd, d)

    def extra(sd):
        sd["down_blocks.0.attentions.0.transformer_blocks.1.attn1.to_q.weight"] = np.zeros((32, 32), np.float32)
    _edit_unet_file(d, extra)
    with pytest.raises(WeightsError, match="1 unexpected key.*transformer_blocks.1.attn1.to_q.weight"):
        _load_folder(d)


def test_truncated_file_error(tiny_sd, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_sd, d)
    f = d / "vae" / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated") as e:
        _load_folder(d)
    assert str(f) in str(e.value)
    f.write_bytes(data[:5])
    with pytest.raises(WeightsError, match="truncated"):
        _load_folder(d)


def test_folder_and_file_errors(tiny_sd, tmp_path):
    with pytest.raises(WeightsError, match="no such model folder or file"):
        _load_folder(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    shutil.copytree(tiny_sd / "unet", tmp_path / "half" / "unet")
    with pytest.raises(WeightsError, match=r"not a diffusers model folder \(missing vae/, text_encoder/\)"):
        _load_folder(tmp_path / "half")
    d = tmp_path / "pkl"
    shutil.copytree(tiny_sd, d)
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (d / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WeightsError, match="only PyTorch pickle weights .*diffusion_pytorch_model.bin"):
        _load_folder(d)
    cfg = json.loads((tiny_sd / "unet" / "config.json").read_text())
    cfg["class_embed_type"] = "timestep"
    (d / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="class_embed_type='timestep' is not supported"):
        _load_folder(d)
    # an SD-2 style single file (1024-wide cross attention) is refused by name
    weights.save_safetensors({weights.LDM_UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                              np.zeros((320, 1024), np.float32)}, tmp_path / "sd2.safetensors")
    with pytest.raises(WeightsError, match="cross-attention width 1024"):
        weights.load_single_file(tmp_path / "sd2.safetensors", dtype=jnp.float32)
    with pytest.raises(WeightsError, match="pickle checkpoints are not read"):
        weights.load_single_file(tmp_path / "model.ckpt", dtype=jnp.float32)


def test_lora_peft_roundtrip():
    _, lora, _ = weights.abstract(lambda: UNet2DConditionModel(TINY_UNET, lora_rank=4))
    lo = init_lora(lora, jax.random.PRNGKey(0))
    flat = weights.flat(lo)
    a = [v for p, v in flat.items() if p[-1] == "lora_a"]
    b = [v for p, v in flat.items() if p[-1] == "lora_b"]
    # 4 projections × (self + cross) × 10 transformer blocks of the tiny SD-1.5-structured UNet
    assert len(a) == len(b) == 80
    assert all(float(jnp.abs(x).max()) == 0 for x in b)
    assert abs(float(jnp.std(jnp.concatenate([x.ravel() for x in a]))) - 0.25) < 0.02  # std 1/r
    tensors = export_peft(lo)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight" in tensors
    back = import_peft(lora, tensors)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(lo)))
    tensors.pop(next(iter(tensors)))
    with pytest.raises(WeightsError, match="LoRA file: missing key"):
        import_peft(lora, tensors)


def test_separate_vae_folder_and_single_files(tiny_sd, tmp_path):
    """GoodDrag's separate VAE (``load_pipeline(vae=…)``, ``--vae``): the same random VAE written as
    a diffusers folder, an LDM-named file with and without the ``first_stage_model.`` prefix and a
    diffusers-named file loads to identical parameters, which replace the model's own."""
    import jaxdrag
    from jaxdrag.tiny import random_state

    vae = random_state(lambda: AutoencoderKL(TINY_VAE), 99)
    folder = tmp_path / "vae"
    weights.save_safetensors(vae, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(TINY_VAE.to_diffusers()))
    n = len(TINY_VAE.block_out_channels)
    ldm = {weights.ldm_vae_key(k, n): (v[:, :, None, None] if weights.is_vae_attn_proj(k) else v)
           for k, v in vae.items()}
    weights.save_safetensors(ldm, tmp_path / "vae-ldm.safetensors")
    weights.save_safetensors({weights.LDM_VAE + k: v for k, v in ldm.items()}, tmp_path / "vae-prefixed.safetensors")
    weights.save_safetensors(vae, tmp_path / "vae-diffusers.safetensors")
    ref = _flat(weights.load_vae(folder, dtype=jnp.float32))
    for f in ("vae-ldm", "vae-prefixed", "vae-diffusers"):
        got = _flat(weights.load_vae(tmp_path / f"{f}.safetensors", dtype=jnp.float32, like=TINY_VAE))
        assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref), f
    own = jaxdrag.load_pipeline(tiny_sd, dtype="float32")
    other = jaxdrag.load_pipeline(tiny_sd, dtype="float32", vae=folder)
    assert all(np.array_equal(v, ref[k]) for k, v in _flat(other.sd.vae).items())
    lat = jnp.asarray(np.random.RandomState(0).randn(1, 4, 4, 4), jnp.float32)
    assert float(jnp.abs(other.vae_decode(lat) - own.vae_decode(lat)).max()) > 1e-3
    with pytest.raises(WeightsError, match="nowhere: no such VAE folder or file"):
        weights.load_vae(tmp_path / "nowhere", dtype=jnp.float32)
    (tmp_path / "vae.ckpt").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"vae.ckpt: a VAE file must be .safetensors"):
        weights.load_vae(tmp_path / "vae.ckpt", dtype=jnp.float32)
    with pytest.raises(WeightsError, match="not a diffusers VAE folder"):
        weights.load_vae(tmp_path, dtype=jnp.float32)
