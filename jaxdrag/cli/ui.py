"""``jaxdrag ui``: the browser UI."""

from __future__ import annotations

import sys
from pathlib import Path


from ..drag.methods import METHODS
from ..errors import SettingsError
from .models import default_models, load_models
from .options import add_model_options


def cmd_ui(args) -> int:
    from ..ui import check_gradio

    check_gradio()
    from ..ui.app import App

    if args.method not in METHODS:
        raise SettingsError(f"--method {args.method!r}: choose one of {', '.join(METHODS)}")
    for root in args.samples:
        if not Path(root).is_dir():
            raise SettingsError(f"--samples {root}: not a folder")
    if not args.batch_window >= 0:
        raise SettingsError(f"--batch-window {args.batch_window}: must be ≥ 0 seconds")
    if args.max_batch < 1:
        raise SettingsError(f"--max-batch {args.max_batch}: must be ≥ 1")
    if not 0 < args.port < 65536:
        raise SettingsError(f"--port {args.port}: must be in 1…65535")
    model = args.model
    if model is None:  # the default model with its CLIP, so every method can be picked in the page
        model, default_clip, _ = default_models()
        args.clip = args.clip or default_clip
    pipe = load_models(args, args.clip is not None)
    app = App(pipe, samples=args.samples, out=args.out, window_s=args.batch_window, max_batch=args.max_batch,
              model_name=str(model), default_method=args.method)
    if not args.no_warm_up:
        app.warm_up(log=lambda m: print(m, file=sys.stderr))
    print(f"jaxdrag UI on http://{args.host}:{args.port} (results saved in {args.out})", file=sys.stderr)
    app.launch(host=args.host, port=args.port, quiet=args.quiet)
    return 0


def add_parser(sub) -> None:
    """The `jaxdrag ui` options."""
    p = sub.add_parser("ui", help="the browser UI (Gradio): load or generate an image, paint the mask, click "
                                  "handle and target points, run; edits from all open pages run in batches")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--samples", type=Path, action="append", default=[],
                   help="a DragBench or Drag100 folder whose samples the page offers (repeatable); the toy "
                        "world's samples are always there")
    p.add_argument("--out", type=Path, default=Path("ui_out"), help="where every result is saved")
    p.add_argument("--method", default="dragtext", help="the method selected at start")
    p.add_argument("--batch-window", type=float, default=1.0,
                   help="seconds an idle queue waits for more edits to join a batch")
    p.add_argument("--max-batch", type=int, default=8, help="the most edits run together")
    p.add_argument("--no-warm-up", action="store_true",
                   help="do not compile the default method's programs in the background at start-up (then the "
                        "first edit of each canvas size compiles them)")
    p.add_argument("--quiet", action="store_true")
    add_model_options(p)
    p.set_defaults(fn=cmd_ui)
