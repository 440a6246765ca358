"""``jaxdrag edit`` (one image, or a generated one) and ``jaxdrag generate``."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from ..errors import SettingsError
from .models import load_models, parse_points
from .options import add_drag_options, add_model_options, drag_overrides, edit_settings


def cmd_edit(args) -> int:
    from ..data import EditRequest, read_image, validate, write_result
    from ..drag.methods import resolve
    from ..pipeline import edit_batch

    # everything the user gave is checked before the model is loaded or anything compiled
    cfg, _ = resolve(args.method, **drag_overrides(args))
    settings = edit_settings(args)
    mask = None
    if args.mask is not None:
        mask = read_image(args.mask, "L")[0] > 0
    if args.image.suffix.lower() == ".json":  # a generation spec written by `jaxdrag generate`
        gen, prompt = read_generation(args.image)
        if args.prompt and args.prompt != prompt:
            raise SettingsError(f"--prompt: a generated image is dragged with its generation prompt {prompt!r} "
                                f"({args.image}); leave --prompt out")
        req = EditRequest(image=None, points=parse_points(args.points), prompt=prompt, mask=mask,
                          edit_prompt=args.edit_prompt, name=args.image.parent.name or "generated", seed=args.seed,
                          generation=gen)
    else:
        img, src = read_image(args.image)
        req = validate(EditRequest(image=img, points=parse_points(args.points),
                                   prompt=args.prompt, mask=mask, edit_prompt=args.edit_prompt,
                                   name=args.image.stem, seed=args.seed, source=src))
    pipe = load_models(args, cfg.use_clip)
    res = edit_batch(pipe, [req], args.method, settings=settings, progress=not args.quiet,
                     **drag_overrides(args))[0]
    write_result(res, args.out)
    if res.failure is not None:
        d = res.failure.get("diverged", {})
        print(f"error: the edit diverged at iteration {d.get('iteration')} ({d.get('what')} became "
              f"non-finite); no image written, report in {args.out / 'report.json'}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), "iterations": res.iterations, "reached": res.reached,
                      "final_handles": res.handles.round(1).tolist(),
                      "timings_s": {k: round(v, 2) for k, v in res.timings.items()}}, indent=1))
    return 0


GENERATION_FIELDS = ("seed", "guidance_scale", "negative_prompt", "height", "width")


def read_generation(path: Path):
    """(Generation, prompt) from a ``generation.json`` of ``jaxdrag generate``."""
    from ..data import Generation, RequestError

    try:
        spec = json.loads(Path(path).read_text())
        if not isinstance(spec, dict) or not isinstance(spec.get("prompt"), str):
            raise ValueError("no prompt")
        gen = Generation(**{k: spec[k] for k in GENERATION_FIELDS if k in spec})
    except (OSError, ValueError, TypeError) as e:
        raise RequestError(f"{path}: not a generation spec of `jaxdrag generate` ({e})") from None
    return gen.check(str(path)), spec["prompt"]


def cmd_generate(args) -> int:
    """Sample an image to drag on: DIR/generated.png and DIR/generation.json (pass the JSON to
    ``jaxdrag edit`` with points picked on the PNG)."""
    from ..data import Generation, atomic_write, png_bytes, write_json

    if not args.prompt.strip():
        raise SettingsError("--prompt: a generation needs a prompt")
    gen = Generation(seed=args.seed, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                     height=args.height, width=args.width).check("generate")
    pipe = load_models(args, False)
    images, _ = pipe.generate([args.prompt], seed=[gen.seed], guidance_scale=gen.guidance_scale,
                              negative_prompt=gen.negative_prompt, hw=gen.size(pipe.native_width))
    atomic_write(args.out / "generated.png", png_bytes(np.asarray(images[0])))
    write_json(args.out / "generation.json", {"prompt": args.prompt, **dataclasses.asdict(gen)})
    print(json.dumps({"image": str(args.out / "generated.png"), "spec": str(args.out / "generation.json")}))
    return 0


def add_edit_parser(sub) -> None:
    """The `jaxdrag edit` options."""
    p = sub.add_parser("edit", help="edit one image")
    p.add_argument("image", type=Path, help="the image, or the generation.json of `jaxdrag generate` "
                                            "(drag on the generated image's own latent, no inversion)")
    p.add_argument("--points", required=True, help='pixels "x,y x,y …" alternating handle, target')
    p.add_argument("--prompt", default="", help="description of the image")
    p.add_argument("--edit-prompt", default=None, help="CLIPDrag's edit text (default: --prompt)")
    p.add_argument("--mask", type=Path, default=None, help="mask image, nonzero = editable")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    add_model_options(p)
    add_drag_options(p)
    p.set_defaults(fn=cmd_edit)


def add_generate_parser(sub) -> None:
    """The `jaxdrag generate` options."""
    p = sub.add_parser("generate", help="generate an image to drag on (DDIM-50 with guidance): "
                                        "DIR/generated.png + DIR/generation.json for `jaxdrag edit`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--quiet", action="store_true")
    add_model_options(p)
    p.set_defaults(fn=cmd_generate)
