"""The embedded default model: a tiny, deterministic, random-init model of the SD-1.5 architecture
(and a tiny CLIP of the ViT-B/16 architecture), written in the real formats (a diffusers folder and
an HF CLIP folder), so the demo and the tests run the exact code paths of full-size models.

Same block structure as SD-1.5 (4 UNet levels with CrossAttn down/up blocks, a 4-level VAE with a
factor-8 latent, a causal CLIP text tower over the real 49408-token vocabulary), with narrow widths:
a forward pass is milliseconds on a CPU. Outputs are of course meaningless pictures.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from . import weights
from .models.clip import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig
from .models.unet import UNet2DConditionModel, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .tokenizer import BUNDLED

TINY_UNET = UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                       num_attention_heads=(2, 2, 2, 2), transformer_layers_per_block=(1, 1, 1, 1),
                       cross_attention_dim=64, norm_num_groups=8, sample_size=16)
TINY_VAE = VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                     sample_size=128)
TINY_TEXT = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, projection_dim=64)
TINY_CLIP_TEXT = CLIPTextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, projection_dim=32)
TINY_CLIP_VISION = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, image_size=224, patch_size=16,
                                    projection_dim=32)

SD_NAME = "tiny-sd15"
CLIP_NAME = "tiny-clip-vit-b16"
_VERSION = 3  # bump when the generator's output changes


def default_weights_dir() -> Path:
    """``$JAXDRAG_WEIGHTS``, else the repository's ``weights/`` folder (next to the package),
    else ``~/.cache/jaxdrag/weights``."""
    env = os.environ.get("JAXDRAG_WEIGHTS")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent / "weights"
    if repo.is_dir():
        return repo
    return Path.home() / ".cache" / "jaxdrag" / "weights"


def random_state(build, seed: int) -> dict:
    """Deterministic PyTorch-style random init of a network's base parameters, computed with numpy
    from the abstract parameter tree (eager NNX init compiles one small op per distinct shape):
    Linear/Conv kernels and their biases U(±1/√fan_in); norm scales 1 and biases 0; embeddings
    N(0, 0.02²). Returns the torch-named dict."""
    _, _, base = weights.abstract(build)
    rng = np.random.default_rng(seed)
    flat = weights.flat(base)
    values = {}
    for path in sorted(flat, key=lambda p: tuple(str(x) for x in p)):
        shape, leaf = flat[path].shape, path[-1]
        parent = path[:-1]
        if leaf == "kernel":
            bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
            values[path] = rng.uniform(-bound, bound, shape)
        elif leaf == "scale":
            values[path] = np.ones(shape)
        elif leaf == "bias" and parent + ("kernel",) in flat:
            bound = 1.0 / np.sqrt(np.prod(flat[parent + ("kernel",)].shape[:-1]))
            values[path] = rng.uniform(-bound, bound, shape)
        elif leaf == "bias":
            values[path] = np.zeros(shape)
        else:  # embedding, class_embedding
            values[path] = rng.normal(0.0, 0.02, shape)
    return {weights.torch_key(p): weights.to_torch(p[-1], v.astype(np.float32)) for p, v in values.items()}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_tiny_sd(root: Path, seed: int = 0) -> Path:
    """Write the tiny SD-1.5-architecture model as a diffusers folder ``root/tiny-sd15``."""
    out = Path(root) / SD_NAME
    tmp = Path(root) / f".{SD_NAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet = random_state(lambda: UNet2DConditionModel(TINY_UNET), seed)
    vae = random_state(lambda: AutoencoderKL(TINY_VAE), seed + 1)
    text = random_state(lambda: CLIPTextModel(TINY_TEXT), seed + 2)
    weights.save_safetensors(unet, tmp / "unet" / "diffusion_pytorch_model.safetensors")
    _write_json(tmp / "unet" / "config.json", TINY_UNET.to_diffusers())
    weights.save_safetensors(vae, tmp / "vae" / "diffusion_pytorch_model.safetensors")
    _write_json(tmp / "vae" / "config.json", TINY_VAE.to_diffusers())
    weights.save_safetensors(text, tmp / "text_encoder" / "model.safetensors")
    _write_json(tmp / "text_encoder" / "config.json", TINY_TEXT.to_hf())
    shutil.copytree(BUNDLED, tmp / "tokenizer")
    _write_json(tmp / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "num_train_timesteps": 1000})
    _write_json(tmp / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "jaxdrag_tiny_version": _VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"]})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def write_tiny_clip(root: Path, seed: int = 10) -> Path:
    """Write a tiny CLIP of the ViT-B/16 architecture as an HF ``CLIPModel`` folder."""
    out = Path(root) / CLIP_NAME
    tmp = Path(root) / f".{CLIP_NAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _write_clip(tmp, TINY_CLIP_VISION, seed, {"jaxdrag_tiny_version": _VERSION})
    for f in BUNDLED.iterdir():
        shutil.copy(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _write_clip(folder: Path, vision: CLIPVisionConfig, seed: int, extra: dict) -> None:
    """A random ``CLIPModel`` (tiny text tower, ``vision`` image tower) as an HF folder."""
    proj = vision.projection_dim
    state = random_state(lambda: CLIPModel(TINY_CLIP_TEXT, vision, proj), seed)
    state["logit_scale"] = np.asarray(2.6592, np.float32)
    weights.save_safetensors(state, folder / "model.safetensors")
    _write_json(folder / "config.json", {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": proj,
        "logit_scale_init_value": 2.6592, **extra, "text_config": TINY_CLIP_TEXT.to_hf(),
        "vision_config": vision.to_hf()})


def _current(folder: Path, index: str) -> bool:
    try:
        return json.loads((folder / index).read_text()).get("jaxdrag_tiny_version") == _VERSION
    except (OSError, ValueError):
        return False


def ensure_tiny(root: Path | None = None) -> tuple[Path, Path]:
    """Paths of the tiny SD model and tiny CLIP, writing them first if absent or outdated."""
    root = Path(root) if root is not None else default_weights_dir()
    root.mkdir(parents=True, exist_ok=True)
    sd, clip = root / SD_NAME, root / CLIP_NAME
    if not _current(sd, "model_index.json"):
        write_tiny_sd(root)
    if not _current(clip, "config.json"):
        write_tiny_clip(root)
    return sd, clip


# ----------------------------------------------------------------------------------------------
# tiny evaluation networks (``jaxdrag eval`` tests and CPU benchmarks)

# SD-2.1's structure (linear projections, per-level head counts, upcast attention, a gelu
# OpenCLIP-style text tower that pads with "!") at tiny widths
TINY_SD21_UNET = UNetConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                            num_attention_heads=(2, 2, 4, 4), cross_attention_dim=48,
                            use_linear_projection=True, norm_num_groups=8, sample_size=16)
TINY_SD21_TEXT = CLIPTextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                num_attention_heads=4, hidden_act="gelu", projection_dim=32)
TINY_CLIP_B32_VISION = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=224, patch_size=32,
                                        projection_dim=32)


def write_tiny_sd21(root: Path, seed: int = 20) -> Path:
    """A tiny SD-2.1-architecture diffusers folder ``root/tiny-sd21`` (DIFT's model)."""
    out = Path(root) / "tiny-sd21"
    tmp = Path(root) / ".tiny-sd21.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet = random_state(lambda: UNet2DConditionModel(TINY_SD21_UNET), seed)
    vae = random_state(lambda: AutoencoderKL(TINY_VAE), seed + 1)
    text = random_state(lambda: CLIPTextModel(TINY_SD21_TEXT), seed + 2)
    weights.save_safetensors(unet, tmp / "unet" / "diffusion_pytorch_model.safetensors")
    _write_json(tmp / "unet" / "config.json", {**TINY_SD21_UNET.to_diffusers(), "upcast_attention": True})
    weights.save_safetensors(vae, tmp / "vae" / "diffusion_pytorch_model.safetensors")
    _write_json(tmp / "vae" / "config.json", TINY_VAE.to_diffusers())
    weights.save_safetensors(text, tmp / "text_encoder" / "model.safetensors")
    _write_json(tmp / "text_encoder" / "config.json", TINY_SD21_TEXT.to_hf())
    shutil.copytree(BUNDLED, tmp / "tokenizer")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        cfg = json.loads((tmp / "tokenizer" / name).read_text())
        cfg["pad_token"] = "!"
        _write_json(tmp / "tokenizer" / name, cfg)
    _write_json(tmp / "scheduler" / "scheduler_config.json", {
        "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "num_train_timesteps": 1000, "prediction_type": "v_prediction"})
    _write_json(tmp / "model_index.json", {"_class_name": "StableDiffusionPipeline",
                                           "jaxdrag_tiny_version": _VERSION})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def write_tiny_clip_b32(root: Path, seed: int = 30) -> Path:
    """A tiny CLIP of the ViT-B/32 architecture (patch 32) as an HF ``CLIPModel`` folder."""
    out = Path(root) / "tiny-clip-vit-b32"
    _write_clip(out, TINY_CLIP_B32_VISION, seed, {})
    return out


def write_random_lpips(path: Path, seed: int = 40) -> Path:
    """LPIPS-AlexNet (full size: AlexNet is small) with random trunk and heads, in lpips' names,
    as one .safetensors file."""
    from .eval.networks import LPIPS_SLICE, lpips_name
    from .models.alexnet import LPIPS

    ours = random_state(lambda: LPIPS(), seed)
    inv = {}
    for k, v in ours.items():  # jaxdrag names → lpips' module names
        if k.startswith("features.conv"):
            idx, leaf = k[len("features.conv"):].split(".")
            inv[f"net.slice{LPIPS_SLICE[int(idx)]}.{idx}.{leaf}"] = v
        else:
            inv[k.replace(".weight", ".model.1.weight")] = np.abs(v)  # lpips heads are ≥ 0
    assert all(lpips_name(k) in ours for k in inv)
    weights.save_safetensors(inv, Path(path))
    return Path(path)
