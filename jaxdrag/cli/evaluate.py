"""``jaxdrag eval``: the papers' metrics of a results folder."""

from __future__ import annotations

from pathlib import Path

import json


from ..errors import SettingsError
from .options import int_list


def cmd_eval(args) -> int:
    import jax.numpy as jnp

    from ..eval import EvalSettings, Networks, evaluate, load_clip_image, load_dift, load_lpips
    from ..eval import METRICS
    from ..eval.settings import WEIGHT_FLAGS

    given = {"lpips": args.lpips, "clip": args.clip, "md": args.dift}
    if args.metrics:
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    else:  # every metric whose weights are given, and DAI (no network)
        metrics = tuple(m for m in METRICS if m == "dai" or given.get(m) is not None)
    missing = [m for m in metrics if m in given and given[m] is None]
    if missing:
        raise SettingsError(f"--metrics {','.join(missing)} need(s) weights: "
                            f"{', '.join(WEIGHT_FLAGS[m] + ' PATH' for m in missing)}")
    settings = EvalSettings(metrics=metrics, t=args.t, ensemble=args.ensemble, seed=args.seed,
                            dai_double_n=args.dai_double_n, batch_size=args.batch_size,
                            gammas=int_list("--gammas", args.gammas))
    dtype = {"auto": jnp.float32, "float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(args.dtype)
    if dtype is None:
        raise SettingsError(f"--dtype {args.dtype!r}: choose auto, float32 or bfloat16")
    nets = Networks(lpips=load_lpips(args.lpips) if "lpips" in metrics else None,
                    dift=load_dift(args.dift, dtype=dtype) if "md" in metrics else None,
                    clip=load_clip_image(args.clip, dtype=dtype) if "clip" in metrics else None)
    out = args.out or args.results / "eval"
    summary = evaluate(args.results, args.data, out, nets, settings, only=args.only,
                       progress=not args.quiet)
    print((out / "summary.md").read_text())
    print(json.dumps({"overall": summary["overall"], "skipped": len(summary["skipped"]),
                      "summary": str(out / "summary.json")}))
    return 0


def add_parser(sub) -> None:
    """The `jaxdrag eval` options."""
    p = sub.add_parser("eval", help="DragBench metrics of a results folder: LPIPS, DIFT mean distance, "
                                    "LPIPS×MD, CLIP similarity, DAI (resumable)")
    p.add_argument("results", type=Path, help="results of `jaxdrag run` or the reference scripts' layout")
    p.add_argument("--data", type=Path, required=True, help="the DragBench or Drag100 folder edited")
    p.add_argument("--out", type=Path, default=None, help="where to write (default: RESULTS/eval)")
    p.add_argument("--dift", type=Path, default=None,
                   help="SD-2.1 diffusers folder or .safetensors single file (mean distance)")
    p.add_argument("--lpips", type=Path, default=None,
                   help="LPIPS-AlexNet .safetensors (scripts/convert_lpips.py makes it)")
    p.add_argument("--clip", type=Path, default=None, help="HF CLIP ViT-B/32 folder (CLIP similarity)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated of lpips,clip,md,dai (default: those whose weights are given, and dai)")
    p.add_argument("--t", type=int, default=261, help="DIFT timestep")
    p.add_argument("--ensemble", type=int, default=8, help="DIFT ensemble size")
    p.add_argument("--seed", type=int, default=42, help="DIFT noise seed")
    p.add_argument("--gammas", default="1,5,10,20", help="DAI patch radii")
    p.add_argument("--dai-double-n", action="store_true",
                   help="DAI as GoodDrag's code computes it (divided by N twice)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per network batch")
    p.add_argument("--only", nargs="*", default=None, help="only these sample names")
    p.add_argument("--dtype", default="float32", help="network dtype: float32 (default, as the papers) or bfloat16")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-compile-cache", action="store_true")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.set_defaults(fn=cmd_eval)
