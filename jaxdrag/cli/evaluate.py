"""``jaxdrag eval``: the papers' metrics of a results folder."""

from __future__ import annotations

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
