"""The accelerator programs, built on a CPU with ``jax.export``: every stage of an edit (text, VAE
encode, LoRA, inversion, the drag loop of every method, denoise, decode) for ``cuda`` in bfloat16
with cuDNN fused attention, and for ``tpu``. Only cuDNN's presence/version and compute-capability
checks, which a CPU jaxlib cannot pass, are stubbed (as an H100 with cuDNN 9.10 would answer)."""

import numpy as np
import pytest

import jaxdrag
from jaxdrag import EditRequest, EditSettings, LoRASettings
from jaxdrag.drag.methods import METHODS

STAGES = {"text", "encode", "lora_encode", "lora", "invert", "drag_prepare", "drag", "denoise", "decode"}


@pytest.fixture
def cudnn_stub(monkeypatch):
    from jax._src.cudnn import fused_attention_stablehlo as fa

    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda capability: True)


@pytest.fixture(scope="module")
def bf16_pipe(tiny_models):
    sd, clip = tiny_models
    return jaxdrag.load_pipeline(sd, clip=clip, dtype="bfloat16")


def _edit_all_stages(pipe, method):
    img = (np.random.RandomState(0).rand(96, 128, 3) * 255).astype(np.uint8)
    mask = np.zeros((96, 128), np.uint8)
    mask[10:80, 20:110] = 1
    req = EditRequest(img, [(40, 30), (60, 35), (80, 60), (70, 50)], "a scene", mask=mask, name="x")
    return jaxdrag.edit_batch(pipe, [req, req], method, settings=EditSettings(lora=LoRASettings(steps=2, chunk=2)),
                              max_iters=3)


@pytest.mark.parametrize("method", METHODS)
def test_every_stage_exports_for_cuda_with_cudnn_attention(bf16_pipe, cudnn_stub, method):
    bf16_pipe.stages.export_for("cuda")
    try:
        res = _edit_all_stages(bf16_pipe, method)
    finally:
        exported = bf16_pipe.stages.exported
        bf16_pipe.stages.export_for(None)
    assert len(res) == 2
    expect = STAGES | ({"clip_text"} if method.startswith("clipdrag") else set())
    assert expect <= set(exported), set(exported)
    for name, exps in exported.items():
        for e in exps:
            assert e.platforms == ("cuda",)
    drag = exported["drag"][0].mlir_module()
    assert "cudnn$fmha" in drag  # fused attention inside the while loop, forward and backward
    assert "cudnn$fmha" in exported["lora"][0].mlir_module()
    assert "bf16" in drag


@pytest.mark.parametrize("method", ["dragtext", "clipdrag+dragtext"])
def test_every_stage_exports_for_tpu(bf16_pipe, method):
    bf16_pipe.stages.export_for("tpu")
    try:
        _edit_all_stages(bf16_pipe, method)
    finally:
        exported = bf16_pipe.stages.exported
        bf16_pipe.stages.export_for(None)
    assert STAGES <= set(exported)
    assert all(e.platforms == ("tpu",) for es in exported.values() for e in es)
    assert "cudnn" not in exported["drag"][0].mlir_module()
