"""Torch-free weight loading and saving for SD-1.5 and CLIP.

Formats read:
  (a) diffusers folders: ``unet/``, ``vae/``, ``text_encoder/`` (each ``config.json`` and
      ``*.safetensors``, plain, ``.fp16`` variant or sharded with an index), ``tokenizer/``;
      both VAE attention namings (``to_q``… and the older ``query``/``key``/``value``/``proj_attn``);
  (b) LDM single-file ``.safetensors`` (``model.diffusion_model.``, ``first_stage_model.``,
      ``cond_stage_model.transformer.``); EMA copies and scheduler buffers are ignored;
  (c) HF CLIP folders (``openai/clip-vit-base-patch16`` layout: ``config.json`` + ``model.safetensors``).

Loading is a table lookup. The table is derived from the network's own parameter tree: an NNX path
``down_blocks/0/attentions/0/.../to_q/kernel`` is the diffusers key
``down_blocks.0.attentions.0....to_q.weight`` with a fixed transform per leaf kind
(``kernel`` 4-D: OIHW→HWIO; ``kernel`` 2-D: transpose; ``scale``/``embedding``: copy of ``weight``;
``bias``: copy). LDM names are produced from diffusers names by ``ldm_*_key`` (the same rules as
diffusers' ``convert_ldm_*_checkpoint``). Every expected key must be present with the expected
shape, and unknown keys inside a model's namespace are errors; messages name the file, the key
and the expected shape. fp16, bf16 and fp32 files all load (converted to float32).
"""

from __future__ import annotations

from .files import WeightsError, TensorSource, DictSource, model_files, save_safetensors
from .keymap import torch_key, to_flax, to_torch, torch_shape, flat, key_table, assign, from_flat, export, PathT
from .ldm import LDM_IGNORED, ldm_unet_key, ldm_vae_key, is_vae_attn_proj, new_vae_name, is_buffer, to_ldm_single_file, LDM_UNET, LDM_VAE, LDM_TEXT
from .load import Component, store_in_compute_dtype, abstract, load_component, read_json, load_diffusers_unet, load_diffusers_vae, text_model_name, load_hf_text_encoder, load_hf_clip, load_single_file, load_vae, SDComponents, load_sd

__all__ = ["LDM_IGNORED", "WeightsError", "TensorSource", "DictSource", "model_files", "save_safetensors", "torch_key", "to_flax", "to_torch", "torch_shape", "flat", "key_table", "assign", "from_flat", "export", "PathT", "ldm_unet_key", "ldm_vae_key", "is_vae_attn_proj", "new_vae_name", "is_buffer", "to_ldm_single_file", "LDM_UNET", "LDM_VAE", "LDM_TEXT", "Component", "store_in_compute_dtype", "abstract", "load_component", "read_json", "load_diffusers_unet", "load_diffusers_vae", "text_model_name", "load_hf_text_encoder", "load_hf_clip", "load_single_file", "load_vae", "SDComponents", "load_sd"]
