"""The options shared by the sub-commands: every drag setting of the method presets as its own option
(generated from ``jaxdrag.drag.methods``), the model options, and their conversion into drag
overrides and ``EditSettings``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


from ..drag.methods import CONFIG_KEYS, HYPER_KEYS, METHODS
from ..errors import SettingsError


def enable_compile_cache(enabled: bool) -> None:
    """``--no-compile-cache`` turns off the library's persistent XLA cache for this process."""
    if not enabled:
        os.environ["JAXDRAG_COMPILE_CACHE"] = "0"


def batch_size_arg(v: str):
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'auto', got {v!r}") from None


def alphas_arg(v: str) -> tuple[float, ...]:
    try:
        return tuple(float(a) for a in v.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected α values like 0,0.5,1, got {v!r}") from None


def parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _setting_type(s):
    """The argparse type of a settings-table entry."""
    return {"int": int, "float": float, "bool": parse_bool}.get(s.kind, str)


def add_drag_options(p: argparse.ArgumentParser, method: bool = True) -> None:
    """One option per drag setting, with the type and help of ``drag.settings.SETTINGS``."""
    from ..drag.settings import SETTINGS

    g = p.add_argument_group("drag settings (default: the method preset; a setting the method does not "
                             "read is an error)")
    if method:
        g.add_argument("--method", default="dragtext", choices=METHODS,
                       help="the method (default dragtext); its reference's defaults fill every setting below")
    for st in SETTINGS:
        flags = [st.flag] + (["--steps"] if st.name == "max_iters" else [])
        # choices are checked by the method's resolution (a one-line error), not by argparse
        help_ = st.help + (f" [{' | '.join(st.choices)}]" if st.choices else "")
        g.add_argument(*flags, dest=st.name, type=_setting_type(st), default=None, help=help_)
    p.add_argument("--lora-steps", type=int, default=None,
                   help="LoRA steps (default: the method's: 80; GoodDrag 70; FreeDrag, DragNoise 200)")
    p.add_argument("--lora-lr", type=float, default=None,
                   help="LoRA learning rate (default: the method's: 5e-4; FreeDrag, DragNoise 2e-4)")
    p.add_argument("--lora-batch", type=int, default=4,
                   help="images per LoRA training step (DragDiffusion 4: the image repeated, random crops)")
    p.add_argument("--inversion-strength", type=float, default=None,
                   help="DDIM inversion strength (default: the method's: 0.7; GoodDrag 0.75)")
    p.add_argument("--width", type=int, default=None,
                   help="working width (default: the model's native width, 512 for SD-1.5; 0 keeps the input size)")
    p.add_argument("--no-reference-attention", action="store_true",
                   help="denoise without mutual self-attention")
    p.add_argument("--remat", choices=("off", "blocks", "dots"), default="off",
                   help="rematerialise UNet activations in the backward passes of LoRA training and the drag "
                        "step (memory for large batches): blocks = keep block inputs only, dots = keep "
                        "matmul/conv/attention outputs")
    p.add_argument("--clip-double-unit-map", action="store_true",
                   help="reproduce CLIPDrag's double [0,1] mapping of the CLIP input (reference quirk)")
    p.add_argument("--interpolate", type=alphas_arg, default=(),
                   help="DragText §6: also write interpolation.png, the images of (z*, c) → (ẑ, ĉ) "
                        "interpolated at these α, e.g. 0,0.25,0.5,0.75,1,1.25,1.5 (0 = reconstruction, 1 = the edit)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="SD-1.5 diffusers folder or LDM .safetensors (default: the trained toy model, weights/toy-sd15)")
    p.add_argument("--clip", type=Path, default=None,
                   help="HF CLIP folder (ViT-B/16) for CLIPDrag methods (default with the toy model: weights/toy-clip)")
    p.add_argument("--vae", type=Path, default=None,
                   help="a separate VAE (diffusers AutoencoderKL folder or .safetensors file), e.g. GoodDrag's "
                        "stabilityai/sd-vae-ft-mse; default: the model's own")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 on GPU), float32, bfloat16")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA cache")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def drag_overrides(args) -> dict:
    return {k: getattr(args, k) for k in CONFIG_KEYS + HYPER_KEYS if getattr(args, k, None) is not None}


def edit_settings(args):
    """The pipeline settings of the command line (validated: SettingsError names a bad one)."""
    from ..pipeline import EditSettings, LoRASettings

    return EditSettings(method=args.method, width=args.width, inversion_strength=args.inversion_strength,
                        lora=LoRASettings(steps=args.lora_steps, lr=args.lora_lr, batch=args.lora_batch,
                                          remat=args.remat),
                        remat=args.remat,
                        reference_attention=not args.no_reference_attention,
                        clip_double_unit_map=args.clip_double_unit_map,
                        batch_size=getattr(args, "batch_size", 8), interpolation=args.interpolate,
                        buckets=getattr(args, "buckets", "exact"), bucket_waste=getattr(args, "bucket_waste", 0.25),
                        max_buckets=getattr(args, "max_buckets", 8))


def int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(g) for g in text.split(","))
    except ValueError:
        raise SettingsError(f"{flag} {text!r}: expected comma-separated whole numbers, e.g. 1,5,10,20") from None
