"""Write trained toy models in the real formats, loadable by ``jaxdrag.load_pipeline`` unchanged:
``toy-sd15/`` (diffusers layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/,
model_index.json) and ``toy-clip/`` (HF ``CLIPModel`` layout with tokenizer files). Tensors are
stored as float16 (the loader reads fp16/bf16/fp32 files into float32), which keeps the committed
models small.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import weights
from ..tokenizer import BUNDLED
from . import CLIP_NAME, SD_NAME, world
from . import models as M
STORE_DTYPE = np.float16


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _swap(tmp: Path, out: Path) -> Path:
    """Replace ``out`` by ``tmp`` atomically, keeping the files of ``out`` that the new model does
    not write (README, measured tables)."""
    if out.exists():
        for f in out.iterdir():
            if f.is_file() and not (tmp / f.name).exists():
                shutil.copy(f, tmp / f.name)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_sd(root: Path, vae_params, unet_params, text_params, scaling_factor: float,
             info: dict) -> Path:
    """Write ``root/toy-sd15`` atomically (a temporary folder renamed into place). Files other
    than the model's (README, benchmark tables) already in the folder are kept."""
    root = Path(root)
    out, tmp = root / SD_NAME, root / f".{SD_NAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae_cfg = replace(M.VAE, scaling_factor=float(scaling_factor))
    parts = {"unet": (unet_params, "diffusion_pytorch_model", M.UNET.to_diffusers()),
             "vae": (vae_params, "diffusion_pytorch_model", vae_cfg.to_diffusers()),
             "text_encoder": (text_params, "model", M.TEXT.to_hf())}
    for name, (params, stem, cfg) in parts.items():
        weights.save_safetensors(weights.export(params), tmp / name / f"{stem}.safetensors", STORE_DTYPE)
        _json(tmp / name / "config.json", cfg)
    shutil.copytree(BUNDLED, tmp / "tokenizer")
    (tmp / "WORLD.md").write_text(world.world_markdown())
    _json(tmp / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "num_train_timesteps": 1000, "prediction_type": "epsilon"})
    _json(tmp / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "jaxdrag_toy": info,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"]})
    return _swap(tmp, out)


def write_clip(root: Path, clip_params, logit_scale: float, info: dict) -> Path:
    """Write ``root/toy-clip`` (HF ``CLIPModel``: config.json, model.safetensors, tokenizer)."""
    root = Path(root)
    out, tmp = root / CLIP_NAME, root / f".{CLIP_NAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = weights.export(clip_params)
    tensors["logit_scale"] = np.asarray(logit_scale, np.float32)
    weights.save_safetensors(tensors, tmp / "model.safetensors", STORE_DTYPE)
    _json(tmp / "config.json", {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": M.CLIP_PROJ,
        "logit_scale_init_value": 2.6592, "jaxdrag_toy": info,
        "text_config": M.CLIP_TEXT.to_hf(), "vision_config": M.CLIP_VISION.to_hf()})
    for f in BUNDLED.iterdir():
        shutil.copy(f, tmp / f.name)
    return _swap(tmp, out)
