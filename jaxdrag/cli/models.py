"""Models and inputs of the sub-commands: the default model (the committed toy model, else the tiny
random one), loading local paths or Hub ids, ``--points``, ``--devices``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from ..errors import SettingsError


def default_models() -> tuple[Path, Path, str]:
    """(SD folder, CLIP folder, kind): the trained toy model when present (it is committed in
    ``weights/``), else the generated tiny random-weight model."""
    from ..tiny import ensure_tiny
    from ..toy import toy_paths

    toy = toy_paths()
    if toy is not None:
        return toy[0], toy[1], "toy"
    sd, clip = ensure_tiny()
    return sd, clip, "tiny"


# pipelines kept for later commands of this process (``keep_loaded``): None = load every time
_LOADED: dict | None = None


def keep_loaded(enabled: bool = True) -> None:
    """Keep each pipeline ``load_models`` loads and hand it to later commands in this process
    that ask for the same model, CLIP, VAE and dtype, with its compiled programs (the test suite;
    a notebook calling ``jaxdrag.cli.main`` repeatedly). Each command gets it in a freshly loaded
    pipeline's state: the LoRA cache off."""
    global _LOADED
    _LOADED = {} if enabled else None


def load_models(args, need_clip: bool):
    from ..pipeline import load_pipeline

    model, clip = args.model, args.clip
    if model is None:
        model, default_clip, kind = default_models()
        clip = clip or default_clip
        what = ("the toy model (trained on 128×128 toy scenes)" if kind == "toy"
                else "the tiny random-weight model")
        print(f"note: using {what} at {model}; pass --model for real edits", file=sys.stderr)
    if need_clip and clip is None:
        raise SettingsError(f"method {args.method!r} needs a CLIP model: pass --clip PATH "
                            f"(an HF openai/clip-vit-base-patch16 folder)")
    from ..hub import resolve

    # local paths or Hub ids, resolved (and fetched into the Hugging Face cache) before anything loads
    model = resolve(model, "sd")
    clip = resolve(clip, "clip") if need_clip and clip is not None else None
    vae = getattr(args, "vae", None)
    vae = resolve(vae, "vae") if vae is not None else None
    key = (str(model), None if clip is None else str(clip), None if vae is None else str(vae), str(args.dtype))
    if _LOADED is not None and key in _LOADED:
        pipe = _LOADED[key]
        pipe.enable_lora_cache(False)
        return pipe
    t0 = time.perf_counter()
    pipe = load_pipeline(model, clip=clip, dtype=args.dtype, vae=vae)
    print(f"loaded {model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if _LOADED is not None:
        _LOADED[key] = pipe
    return pipe


def parse_points(text: str) -> list[list[float]]:
    from ..data import RequestError

    pts = []
    for tok in text.replace(";", " ").split():
        try:
            x, y = (float(v) for v in tok.split(","))
        except ValueError:
            raise RequestError(f"--points: {tok!r} is not 'x,y'") from None
        pts.append([x, y])
    return pts


def local_devices(spec: str):
    """``--devices``: "all" local devices or the first N."""
    import jax

    devs = jax.local_devices()
    if spec == "all":
        return devs
    try:
        n = int(spec)
    except ValueError:
        raise SettingsError(f"--devices {spec!r}: expected 'all' or a count") from None
    if not 1 <= n <= len(devs):
        raise SettingsError(f"--devices {n}: this process has {len(devs)} device(s)")
    return devs[:n]


def demo_example(size: int = 128):
    """A built-in example: a soft orange disc on a blue-green gradient; drag its right edge
    outwards, with a mask around the disc."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([0.2 + 0.3 * yy, 0.5 + 0.3 * xx, 0.8 - 0.3 * yy], -1)
    d = np.sqrt((xx - 0.45) ** 2 + (yy - 0.5) ** 2)
    disc = np.clip((0.22 - d) * 40, 0, 1)[..., None]
    img = img * (1 - disc) + np.array([0.95, 0.55, 0.15]) * disc
    mask = (d < 0.38).astype(np.uint8)
    s = size / 128
    points = [[0.45 * size + 26 * s, 0.5 * size], [0.45 * size + 40 * s, 0.5 * size]]
    return (img * 255).astype(np.uint8), points, mask, "an orange ball on a gradient background"
