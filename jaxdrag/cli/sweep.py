"""``jaxdrag sweep``: a method's settings over a grid on a dataset, evaluated, tabled, plotted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import SettingsError
from .models import load_models
from .options import add_drag_options, add_model_options, drag_overrides, edit_settings


def cmd_sweep(args) -> int:
    from ..drag.methods import resolve
    from ..sweep import dataset_items, grid, sweep, toy_items

    base = drag_overrides(args)
    if args.random is not None:
        points = grid.random_points(grid.parse_ranges(args.method, args.grid), args.random, args.seed)
    else:
        points = grid.product(grid.parse_grid(args.method, args.grid))
    swept = set(points[0])
    both = sorted(swept & (set(base) | {k for k in ("lora_steps", "inversion_strength")
                                        if getattr(args, k, None) is not None}))
    if both:
        raise SettingsError(f"--grid {', '.join(both)}: also given as a fixed option; give it once")
    for p in points:  # every point a valid configuration before anything is loaded
        _, comp, _ = grid.split(p)
        resolve(args.method, **{**base, **comp})
    settings = edit_settings(args)
    toy = args.dataset == "toybench"
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    if toy:
        items, root = toy_items(args.tasks), None
    else:
        root = Path(args.dataset)
        if not root.is_dir():
            raise SettingsError(f"sweep: {root}: no such dataset folder (a DragBench / Drag100 folder, "
                                f"or 'toybench')")
        items = dataset_items(root, args.limit, args.seed, log)
    if not items:
        raise SettingsError(f"sweep: no readable sample in {args.dataset}")
    nets = eval_settings = None
    if not toy:
        from ..eval import EvalSettings, Networks, load_clip_image, load_dift, load_lpips

        metrics = tuple(m for m, w in (("lpips", args.eval_lpips), ("md", args.eval_dift),
                                       ("clip", args.eval_clip)) if w is not None) + ("dai",)
        nets = Networks(lpips=load_lpips(args.eval_lpips) if args.eval_lpips else None,
                        dift=load_dift(args.eval_dift) if args.eval_dift else None,
                        clip=load_clip_image(args.eval_clip) if args.eval_clip else None)
        eval_settings = EvalSettings(metrics=metrics)
    cfg, _ = resolve(args.method, **base)
    pipe = load_models(args, cfg.use_clip)
    log(f"[sweep] {args.method} on {args.dataset}: {len(items)} samples × {len(points)} points")
    res = sweep(pipe, items, args.method, points, args.out, dataset=str(args.dataset), settings=settings,
                batch_size=args.batch_size, base=base, data_root=root, eval_nets=nets,
                eval_settings=eval_settings, progress=not args.quiet, log=log)
    print((Path(args.out) / "table.md").read_text())
    print(json.dumps({"points": len(points), "samples": len(items), **{k: res["cost"][k] for k in
                      ("edits_run", "loras_trained", "wall_s")}, "table": str(Path(args.out) / "table.json")}))
    return 0


def add_parser(sub) -> None:
    """The `jaxdrag sweep` options."""
    p = sub.add_parser("sweep", help="a method's settings over a grid on a dataset (or the toy world's tasks): "
                                     "one LoRA per sample shared by the grid, evaluated, tabled and plotted")
    p.add_argument("dataset", help="a DragBench or Drag100 folder, or 'toybench' (the toy world's tasks)")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=v1,v2,…",
                   help="a swept setting and its values (repeat for a product); with --random NAME=lo:hi[:log]")
    p.add_argument("--random", type=int, default=None, metavar="N",
                   help="N points drawn from the --grid ranges instead of the product")
    p.add_argument("--seed", type=int, default=0, help="the edits' seed, and --random's")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", type=int, default=16, help="toybench: number of tasks")
    p.add_argument("--limit", type=int, default=None, help="a dataset's first N samples")
    p.add_argument("--batch-size", type=int, default=8, help="edits per vmapped batch")
    p.add_argument("--eval-lpips", type=Path, default=None, help="LPIPS weights: the LPIPS metric on a dataset")
    p.add_argument("--eval-dift", type=Path, default=None, help="SD-2.1 weights: the DIFT mean distance (MD)")
    p.add_argument("--eval-clip", type=Path, default=None, help="CLIP ViT-B/32 folder: the CLIP similarity")
    p.add_argument("--quiet", action="store_true")
    add_model_options(p)
    add_drag_options(p)
    p.set_defaults(fn=cmd_sweep)
