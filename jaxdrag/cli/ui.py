"""``jaxdrag ui``: the browser UI."""

from __future__ import annotations

import sys
from pathlib import Path


from ..drag.methods import METHODS
from ..errors import SettingsError
from .models import default_models, load_models


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
    print(f"jaxdrag UI on http://{args.host}:{args.port} (results saved in {args.out})", file=sys.stderr)
    app.launch(host=args.host, port=args.port, quiet=args.quiet)
    return 0
