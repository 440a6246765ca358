"""Shared benchmark plumbing: random-weight models of a given config in diffusers/transformers
(PyTorch) and the identical weights in a jaxdrag Pipeline (converted in memory) — or, torch-free,
a Pipeline from the project's own initialiser (``jax_random_pipeline``) for machines with only
jax[cuda] and the runtime dependencies; FLOP counts from the project's reference (PERF.md),
timing and memory helpers. torch is imported only by the functions that need it."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import time
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from jaxdrag import weights
from jaxdrag.models.clip import SD15_TEXT, CLIPTextModel
from jaxdrag.models.unet import SD15_UNET, UNet2DConditionModel
from jaxdrag.models.vae import SD15_VAE, AutoencoderKL
from jaxdrag.pipeline import Pipeline
from jaxdrag.precision import policy_for
from jaxdrag.tiny import TINY_TEXT, TINY_UNET, TINY_VAE, random_state
from jaxdrag.tokenizer import Tokenizer

CONFIGS = {"sd15": (SD15_UNET, SD15_VAE, SD15_TEXT), "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT)}

# TFLOP per edit-item at 512×512 (latent 64²), 77 tokens, from PERF.md §2/§4 (2 FLOP per MAC,
# matmul/conv/attention only)
UNET_FWD = 0.803
UNET_FWD_BWD = 1.726            # forward + backward to the latent (frozen weights)
DRAGTEXT_STEP = UNET_FWD + 2 * (UNET_FWD_BWD - UNET_FWD)   # one forward, two backward passes
LORA_SAMPLE = 1.726             # per sample (rank-16 weight gradients are negligible)
VAE_ENC, VAE_DEC = 1.117, 2.515
H100_PEAK = 989.4               # TFLOP/s, dense bf16


def edit_tflop(lora_steps=80, lora_batch=4, inv=35, drag=80, denoise=35):
    """A DragText edit as jaxdrag runs it (latent encoded once for LoRA)."""
    return (lora_steps * lora_batch * LORA_SAMPLE + 2 * VAE_ENC + inv * UNET_FWD + drag * DRAGTEXT_STEP
            + denoise * 2 * UNET_FWD + VAE_DEC)


def reference_edit_tflop(lora_steps=80, lora_batch=4, inv=35, drag=80, denoise=35):
    """The same edit as the reference code runs it (the VAE re-encodes the LoRA batch every step)."""
    return edit_tflop(lora_steps, lora_batch, inv, drag, denoise) + lora_steps * lora_batch * VAE_ENC - VAE_ENC


def torch_models(name: str, device, seed: int = 0):
    """(unet, vae, text_encoder) diffusers/transformers models with random weights, fp32, eval."""
    import torch
    from diffusers import AutoencoderKL as TV, UNet2DConditionModel as TU
    from transformers import CLIPTextConfig, CLIPTextModel as TT

    ucfg, vcfg, tcfg = CONFIGS[name]
    torch.manual_seed(seed)
    unet = TU(**{k: v for k, v in ucfg.to_diffusers().items() if k != "_class_name"})
    vae = TV(**{k: v for k, v in vcfg.to_diffusers().items() if k != "_class_name"})
    text = TT(CLIPTextConfig(**{k: getattr(tcfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                             "num_hidden_layers", "num_attention_heads",
                                                             "max_position_embeddings", "projection_dim")}))
    with torch.no_grad():  # diffusers zero-initialises nothing we rely on; add spread to norms
        for m in (unet, vae, text):
            for n, p in m.named_parameters():
                if n.endswith("norm.weight") or "norm1.weight" in n or "norm2.weight" in n:
                    p.add_(torch.randn_like(p) * 0.05)
    return [m.to(device).eval() for m in (unet, vae, text)]


def _state(module) -> dict:
    return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def _pipeline(name, states: tuple[dict, dict, dict], label: str, dtype, attention, lora_rank) -> Pipeline:
    ucfg, vcfg, tcfg = CONFIGS[name]
    pol = policy_for(dtype, attention)
    kw = dict(dtype=pol.compute, attn_impl=pol.attention)
    u = weights.load_component(lambda: UNet2DConditionModel(ucfg, lora_rank=lora_rank, **kw),
                               weights.DictSource(states[0], f"{label} unet"), cfg=ucfg)
    v = weights.load_component(lambda: AutoencoderKL(vcfg, **kw), weights.DictSource(states[1], f"{label} vae"),
                               cfg=vcfg)
    t = weights.load_component(lambda: CLIPTextModel(tcfg, **kw), weights.DictSource(states[2], f"{label} text"),
                               cfg=tcfg, rename=weights.text_model_name)
    sd = weights.SDComponents(u, v, t, None, f"random {name} ({label})")
    return Pipeline(sd=sd, tokenizer=Tokenizer(), policy=pol)


def jax_pipeline(name: str, unet, vae, text, dtype="auto", attention="auto", lora_rank=16) -> Pipeline:
    """A jaxdrag Pipeline holding the same weights as the given torch models."""
    return _pipeline(name, (_state(unet), _state(vae), _state(text)), "torch, seed 0", dtype, attention, lora_rank)


def jax_random_pipeline(name: str, dtype="auto", attention="auto", lora_rank=16, seed: int = 0) -> Pipeline:
    """A jaxdrag Pipeline of the named config with random weights from the project's own
    initialiser (``jaxdrag.tiny.random_state``): no torch, diffusers or transformers needed."""
    ucfg, vcfg, tcfg = CONFIGS[name]
    states = (random_state(lambda: UNet2DConditionModel(ucfg), seed),
              random_state(lambda: AutoencoderKL(vcfg), seed + 1),
              random_state(lambda: CLIPTextModel(tcfg), seed + 2))
    return _pipeline(name, states, f"jaxdrag init, seed {seed}", dtype, attention, lora_rank)


def timeit(fn, n: int, warmup: int = 1, sync=None) -> dict:
    """Median and spread of n calls after warm-up; ``sync`` blocks on asynchronous work."""
    sync = sync or (lambda r: jax.block_until_ready(r))
    for _ in range(warmup):
        sync(fn())
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        sync(fn())
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "n": n}


def torch_sync(device):
    import torch

    return (lambda r: torch.cuda.synchronize()) if device.type == "cuda" else (lambda r: None)


def jax_peak_bytes() -> int | None:
    try:
        return int(jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0)) or None
    except Exception:  # CPU devices report no memory stats
        return None


def host_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_info() -> dict:
    try:
        import torch
    except ImportError:
        torch = None
    dev = jax.devices()[0]
    info = {"jax": jax.__version__, "jax_backend": jax.default_backend(),
            "torch": torch.__version__ if torch else None,
            "python": platform.python_version(), "machine": platform.machine()}
    if dev.platform != "cpu":
        info["gpu" if dev.platform == "gpu" else dev.platform] = dev.device_kind
    else:
        try:
            model = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"], capture_output=True,
                                   text=True).stdout.split(":")[-1].strip()
        except OSError:
            model = platform.processor()
        info["cpu"] = model
        info["cpu_threads"] = torch.get_num_threads() if torch else None
    return info


def dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)
