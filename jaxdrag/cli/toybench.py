"""``jaxdrag toybench``: drags with exact ground truth on the toy world."""

from __future__ import annotations

import sys
from pathlib import Path


from ..drag.methods import METHODS
from ..errors import SettingsError
from .models import load_models
from .options import add_drag_options, add_model_options, drag_overrides, edit_settings


def cmd_toybench(args) -> int:
    from ..drag.methods import overrides_per_method, resolve
    from ..toy import runner

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.method = methods[0] if methods else "dragdiffusion"
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SettingsError(f"--methods: unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    overrides = drag_overrides(args)
    # every setting checked before loading; each method gets the ones it reads
    per_method = overrides_per_method(methods, overrides)
    cfgs = [resolve(m, **per_method[m])[0] for m in methods]
    settings = edit_settings(args)
    pipe = load_models(args, any(c.use_clip for c in cfgs))
    runner.run(pipe, methods, args.out, n_tasks=args.tasks, batch_size=args.batch_size,
               settings=settings, overrides=overrides, progress=not args.quiet,
               log=lambda s: print(s, file=sys.stderr))
    print((Path(args.out) / "toybench.md").read_text())
    return 0


def add_parser(sub) -> None:
    """The `jaxdrag toybench` options."""
    p = sub.add_parser("toybench", help="drag tasks on held-out toy scenes with exact ground truth "
                                        "(displacement error, IoU, survival, background PSNR)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods (default: all ten); each reads the drag settings it uses")
    p.add_argument("--tasks", type=int, default=50, help="number of tasks (deterministic, held-out seeds)")
    p.add_argument("--batch-size", type=int, default=10, help="edits per vmapped batch")
    p.add_argument("--quiet", action="store_true")
    add_model_options(p)
    add_drag_options(p, method=False)
    p.set_defaults(fn=cmd_toybench)
