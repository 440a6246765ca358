"""``jaxdrag toybench``: drags with exact ground truth on the toy world."""

from __future__ import annotations

import sys
from pathlib import Path


from ..drag.methods import METHODS
from ..errors import SettingsError
from .models import load_models
from .options import drag_overrides, edit_settings


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
