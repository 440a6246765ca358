"""Architectures of the trained toy models: the SD-1.5 block structure (4-level UNet with
CrossAttn down/up blocks and a cross-attention mid block, a 4-level factor-8 KL VAE, a causal
CLIP text tower over the real 49408-token vocabulary) and a CLIP of the ViT-B/16 architecture
(16-px patches), all with narrow widths, built from the project's own network classes.

``init_params(build, seed)`` gives the PyTorch-style random initialisation as an NNX parameter
state (the same initialiser as the random tiny models), ready to train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from flax import nnx

from .. import weights
from ..models.clip import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from .world import IMAGE_SIZE

# widths chosen for a CPU training budget: the VAE's 128² level dominates its cost, the UNet runs
# at 16×16 latents (its up_blocks[2] output, the drag features, is 64 channels at 16×16)
VAE = VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
                sample_size=IMAGE_SIZE)
TEXT = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=4, projection_dim=64, eos_token_id=49407)
UNET = UNetConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                  num_attention_heads=(4, 4, 4, 4), transformer_layers_per_block=(1, 1, 1, 1),
                  cross_attention_dim=TEXT.hidden_size, norm_num_groups=8,
                  sample_size=IMAGE_SIZE // 8)
CLIP_TEXT = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                           num_attention_heads=4, projection_dim=64, eos_token_id=49407)
CLIP_VISION = CLIPVisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=4,
                               num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=16,
                               projection_dim=64)
CLIP_PROJ = 64


def build_vae(cfg: VAEConfig = VAE):
    return lambda: AutoencoderKL(cfg)


def build_unet(cfg: UNetConfig = UNET):
    return lambda: UNet2DConditionModel(cfg)


def build_text(cfg: CLIPTextConfig = TEXT):
    return lambda: CLIPTextModel(cfg)


def build_clip(text: CLIPTextConfig = CLIP_TEXT, vision: CLIPVisionConfig = CLIP_VISION,
               proj: int = CLIP_PROJ):
    return lambda: CLIPModel(text, vision, proj)


@dataclass
class Net:
    """A network split for training: ``graphdef`` and the (empty) LoRA state, with parameters
    passed explicitly: ``net.module(params)`` merges them."""

    graphdef: Any
    lora: nnx.State
    template: nnx.State

    def module(self, params):
        return nnx.merge(self.graphdef, self.lora, params)


def net(build: Callable) -> Net:
    graphdef, lora, base = weights.abstract(build)
    return Net(graphdef, lora, base)


def init_params(build: Callable, seed: int) -> nnx.State:
    """PyTorch-style random init (``jaxdrag.tiny``'s initialiser) as a parameter state."""
    from ..tiny import random_state

    tensors = random_state(build, seed)
    _, _, base = weights.abstract(build)
    return weights.assign(base, {k: (lambda v=v: v) for k, v in tensors.items()},
                          {k: np.shape(v) for k, v in tensors.items()}, label=f"init seed {seed}")
