"""``jaxdrag demo``: the toy world's demo drag, measured."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


from .models import default_models, demo_example, load_models
from .options import add_drag_options, drag_overrides, edit_settings


def cmd_demo(args) -> int:
    from PIL import Image

    from ..data import EditRequest, side_by_side, write_result
    from ..pipeline import edit_batch

    args.model, args.clip = None, None
    _, _, kind = default_models()
    pipe = load_models(args, args.method.startswith("clipdrag"))
    if kind == "toy":
        from ..toy.bench import demo_task, measure

        task = demo_task()
        img, pts, mask, prompt = task.image, task.points, task.mask, task.prompt
        edit_prompt = task.edit_prompt
    else:
        img, pts, mask, prompt = demo_example(pipe.native_width)
        edit_prompt = None
    req = EditRequest(image=img, points=pts, prompt=prompt, mask=mask, edit_prompt=edit_prompt, name="demo")
    t0 = time.perf_counter()
    res = edit_batch(pipe, [req], args.method, settings=edit_settings(args), progress=not args.quiet,
                     **drag_overrides(args))[0]
    write_result(res, args.out)
    Image.fromarray(img).save(Path(args.out) / "input.png")
    Image.fromarray(side_by_side(img, res)).save(Path(args.out) / "side_by_side.png")
    summary = {"out": str(args.out), "model": kind,
               "files": ["input.png", "edited.png", "overlay.png", "side_by_side.png", "report.json"],
               "prompt": prompt, "iterations": res.iterations, "reached": res.reached,
               "final_handles": res.handles.round(1).tolist(), "wall_s": round(time.perf_counter() - t0, 1)}
    if kind == "toy":
        m = measure(task, res.image)
        summary["measured"] = {k: (round(v, 2) if isinstance(v, float) else v)
                               for k, v in m.items()
                               if k in ("error", "rel_error", "spot_error", "iou", "survived", "bg_psnr")}
        summary["measured"]["drag"] = [list(mv[1:]) for mv in task.moves]
        summary["measured"]["moved"] = [[round(v, 1) for v in o["moved"]] for o in m["objects"]]
    print(json.dumps(summary, indent=1))
    if kind == "toy":
        o = m["objects"][0]
        print(f"the {task.spec.objects[0].colour} {task.spec.objects[0].shape} moved "
              f"({o['moved'][0]:.1f}, {o['moved'][1]:.1f}) px for a drag of ({o['drag'][0]}, {o['drag'][1]}): "
              f"error {o['error']:.1f} px = {100 * o['rel_error']:.0f} % of the drag, "
              f"{'intact' if o['survived'] else 'not intact'} (area {o['area_out']} px vs {o['area_in']}, "
              f"spot {'found' if o['spot_found'] else 'lost'}), background PSNR {m['bg_psnr']:.1f} dB",
              file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    """The `jaxdrag demo` options."""
    p = sub.add_parser("demo", help="drag an object on a toy scene with the built-in toy model")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--no-compile-cache", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add_drag_options(p)
    p.set_defaults(fn=cmd_demo)
