"""The accelerator programs, built on a CPU with ``jax.export``: every stage of an edit (text, VAE
encode, LoRA, inversion, the drag loop of every method — all ten —, denoise, decode) for ``cuda`` in bfloat16
with cuDNN fused attention, and for ``tpu``. Only cuDNN's presence/version and compute-capability
checks, which a CPU jaxlib cannot pass, are stubbed (as an H100 with cuDNN 9.10 would answer).
The drag step of DragText/CLIPDrag with a vmapped VJP (the code before this test) fails here with
cuDNN's batching-rule error ("cannot reshape…")."""

import numpy as np
import pytest

import jaxdrag
from jaxdrag import EditRequest, EditSettings, LoRASettings
from helpers import short_run
from jaxdrag.drag.methods import METHODS

STAGES = {"text", "encode", "lora_encode", "lora", "invert", "drag_prepare", "drag", "denoise", "decode",
          "clip_text"}


@pytest.fixture
def cudnn_stub(monkeypatch):
    from jax._src.cudnn import fused_attention_stablehlo as fa

    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)


@pytest.fixture(scope="module")
def bf16_pipe(tiny_models):
    sd, clip = tiny_models
    return jaxdrag.load_pipeline(sd, clip=clip, dtype="bfloat16")


def _export_all(pipe, platform, methods):
    img = (np.random.RandomState(0).rand(96, 128, 3) * 255).astype(np.uint8)
    mask = np.zeros((96, 128), np.uint8)
    mask[10:80, 20:110] = 1
    req = EditRequest(img, [(40, 30), (60, 35), (80, 60), (70, 50)], "a scene", mask=mask, name="x")
    pipe.stages.export_for(platform)
    try:
        for m in methods:
            res = jaxdrag.edit_batch(pipe, [req, req], m, settings=EditSettings(lora=LoRASettings(steps=2, chunk=2)),
                                     **short_run(m, 3))
            assert len(res) == 2
        return dict(pipe.stages.exported)
    finally:
        pipe.stages.export_for(None)


def _kernel_shapes(pipe) -> set:
    """Shapes of the base weights' matmul/conv kernels, less any LoRA factor's shape (LoRA and
    the embedding tables stay float32 by design)."""
    import jax

    comps = [pipe.sd.unet, pipe.sd.vae, pipe.sd.text_encoder] + ([pipe.clip] if pipe.clip else [])
    kernels = {tuple(x.shape) for c in comps for path, x in jax.tree_util.tree_leaves_with_path(c.params)
               if x.ndim >= 2 and "kernel" in jax.tree_util.keystr(path)}
    lora = {tuple(x.shape) for x in jax.tree.leaves(pipe.sd.unet.lora)}
    return kernels - lora


def weight_converts(mlir: str, shapes: set) -> int:
    """Number of f32 → bf16 converts in a StableHLO module whose operand has a kernel's shape."""
    import re

    n = 0
    for m in re.finditer(r"stablehlo\.convert.*?\(tensor<([0-9x]+)xf32>\) -> tensor<\1xbf16>", mlir):
        if tuple(int(d) for d in m.group(1).split("x")) in shapes:
            n += 1
    return n


def test_every_stage_of_every_method_exports_for_cuda_with_cudnn_attention(bf16_pipe, cudnn_stub):
    exported = _export_all(bf16_pipe, "cuda", METHODS)
    assert STAGES <= set(exported), set(exported)
    assert all(e.platforms == ("cuda",) for es in exported.values() for e in es)
    # one drag loop per method (different programs); the shared stages built once per inversion
    # strength (GoodDrag's 0.75, the others' 0.7)
    assert len(exported["drag"]) == len(METHODS) and len(exported["invert"]) == 2
    for e in exported["drag"]:
        mod = e.mlir_module()
        assert "cudnn$fmhaSoftmax" in mod and "cudnn$fmhaSoftmaxBackward" in mod and "bf16" in mod
    assert "cudnn$fmhaSoftmaxBackward" in exported["lora"][0].mlir_module()
    # precision: the frozen base weights are stored in bf16 once, never converted inside a stage
    # (before: 180 UNet kernels converted at every use in the LoRA scan and the drag loop)
    shapes = _kernel_shapes(bf16_pipe)
    converts = {k: sum(weight_converts(e.mlir_module(), shapes) for e in es) for k, es in exported.items()}
    assert not any(converts.values()), converts


def test_every_stage_exports_for_tpu(bf16_pipe):
    methods = ["clipdrag+dragtext", "dragtext", "gooddrag+dragtext", "freedrag+dragtext", "dragnoise+dragtext"]
    exported = _export_all(bf16_pipe, "tpu", methods)
    assert STAGES <= set(exported) and len(exported["drag"]) == len(methods)
    assert all(e.platforms == ("tpu",) for es in exported.values() for e in es)
    assert not any("cudnn" in e.mlir_module() for e in exported["drag"])


def test_eval_programs_export_for_cuda_and_tpu(cudnn_stub, tmp_path):
    """`jaxdrag eval`'s programs (DIFT features of a batch with its ensemble, the prompt encoder,
    LPIPS, CLIP similarity, the mean-distance matching) lower for accelerators, in bfloat16."""
    import jax
    import jax.numpy as jnp

    from jaxdrag import tiny
    from jaxdrag.eval import EvalSettings, Networks, load_clip_image, load_dift, load_lpips
    from jaxdrag.eval.metrics import match_distances

    bf = jnp.bfloat16
    nets = Networks(lpips=load_lpips(tiny.write_random_lpips(tmp_path / "lp.safetensors"), dtype=bf),
                    dift=load_dift(tiny.write_tiny_sd21(tmp_path), dtype=bf),
                    clip=load_clip_image(tiny.write_tiny_clip_b32(tmp_path), dtype=bf))
    sds = jax.ShapeDtypeStruct
    s = EvalSettings(ensemble=8)
    d = nets.dift
    programs = {
        "dift": (nets.dift_fn(s), (d.unet.params, d.vae.params, sds((4, 96, 128, 3), jnp.float32),
                                   sds((4, 77, 48), jnp.float32), jax.random.split(jax.random.PRNGKey(0), 4))),
        "text": (nets.text_fn(), (d.text_encoder.params, sds((4, 77), jnp.int32))),
        "lpips": (nets.lpips_fn(), (nets.lpips.params, sds((4, 224, 224, 3), jnp.float32),
                                    sds((4, 224, 224, 3), jnp.float32))),
        "clip": (nets.clip_fn(), (nets.clip.params, sds((4, 224, 224, 3), jnp.float32),
                                  sds((4, 224, 224, 3), jnp.float32))),
        "match": (jax.jit(lambda a, b, h, t: match_distances(a, b, h, t, hw=(96, 128))),
                  (sds((6, 8, 1280), jnp.float32), sds((6, 8, 1280), jnp.float32),
                   sds((3, 2), jnp.int32), sds((3, 2), jnp.int32))),
    }
    for platform in ("cuda", "tpu"):
        for name, (fn, args) in programs.items():
            exp = jax.export.export(fn, platforms=(platform,))(*args)
            assert exp.platforms == (platform,), name
            if name != "match":  # the networks compute in bfloat16 (the matching in float32)
                assert "bf16" in exp.mlir_module(), name
