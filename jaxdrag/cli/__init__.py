"""``jaxdrag`` command line: ``edit`` (one image, or a generated one), ``generate``, ``run`` (a DragBench / Drag100 folder), ``demo``,
``ui`` (the browser UI), ``toybench`` (drags with exact ground truth on the toy world), ``eval`` (DragBench metrics of a
results folder).

Every drag setting of the method presets has its own option (``--max-iters``, ``--latent-lr``,
``--r-m``, ``--fusion``, …), generated from ``jaxdrag.drag.methods``; ``--steps`` is an alias of
``--max-iters``.

One module per sub-command (``edit``, ``run``, ``demo``, ``ui``, ``toybench``, ``evaluate``), the
shared options (``options``) and models (``models``); this module builds the parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from ..drag.methods import METHODS
from ..errors import SettingsError
from .demo import cmd_demo
from .edit import cmd_edit, cmd_generate
from .evaluate import cmd_eval
from .options import add_drag_options, add_model_options, batch_size_arg, enable_compile_cache
from .run import cmd_run
from .sweep import cmd_sweep
from .toybench import cmd_toybench
from .ui import cmd_ui


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxdrag", description="Diffusion point-drag image editing in JAX")
    sub = ap.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("edit", help="edit one image")
    e.add_argument("image", type=Path, help="the image, or the generation.json of `jaxdrag generate` "
                                            "(drag on the generated image's own latent, no inversion)")
    e.add_argument("--points", required=True, help='pixels "x,y x,y …" alternating handle, target')
    e.add_argument("--prompt", default="", help="description of the image")
    e.add_argument("--edit-prompt", default=None, help="CLIPDrag's edit text (default: --prompt)")
    e.add_argument("--mask", type=Path, default=None, help="mask image, nonzero = editable")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--quiet", action="store_true")
    add_model_options(e)
    add_drag_options(e)
    e.set_defaults(fn=cmd_edit)

    g = sub.add_parser("generate", help="generate an image to drag on (DDIM-50 with guidance): "
                                        "DIR/generated.png + DIR/generation.json for `jaxdrag edit`")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--height", type=int, default=None, help="default: the model's native size")
    g.add_argument("--width", type=int, default=None, help="default: the model's native size")
    g.add_argument("--quiet", action="store_true")
    add_model_options(g)
    g.set_defaults(fn=cmd_generate)

    r = sub.add_parser("run", help="edit every sample of a DragBench or Drag100 folder (resumable)")
    r.add_argument("dataset", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--batch-size", type=batch_size_arg, default=8,
                   help="edits per vmapped batch (same working size), or 'auto': the largest batch whose "
                        "every stage fits in device memory (XLA's memory analysis)")
    r.add_argument("--limit", type=int, default=None, help="only the first N samples")
    r.add_argument("--only", nargs="*", default=None, help="only these sample names")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--devices", default="all",
                   help="local devices to spread each batch over: all (default) or a count")
    r.add_argument("--distributed", action="store_true",
                   help="one of several processes/hosts: each takes every n-th sample; process 0 merges the "
                        "summaries and survives a lost peer (jaxdrag.cluster)")
    r.add_argument("--coordinator", default=None, help="with --distributed: host:port of process 0")
    r.add_argument("--num-processes", type=int, default=None, help="with --distributed: process count")
    r.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")
    r.add_argument("--peer-timeout", type=float, default=120.0,
                   help="with --distributed: seconds without a heartbeat after which process 0 declares a peer "
                        "lost and writes the summary without it (default 120)")
    r.add_argument("--compile-workers", type=int, default=2,
                   help="threads compiling the programs of the next shape groups while the current one runs "
                        "(0: compile each when first needed)")
    r.add_argument("--compile-only", action="store_true",
                   help="compile (into the persistent compilation cache) every program the run needs, run no "
                        "edit, and report programs, compile seconds summed and wall time")
    add_model_options(r)
    add_drag_options(r)
    r.set_defaults(fn=cmd_run)

    t = sub.add_parser("toybench", help="drag tasks on held-out toy scenes with exact ground truth "
                                        "(displacement error, IoU, survival, background PSNR)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods (default: all ten); each reads the drag settings it uses")
    t.add_argument("--tasks", type=int, default=50, help="number of tasks (deterministic, held-out seeds)")
    t.add_argument("--batch-size", type=int, default=10, help="edits per vmapped batch")
    t.add_argument("--quiet", action="store_true")
    add_model_options(t)
    add_drag_options(t, method=False)
    t.set_defaults(fn=cmd_toybench)

    w = sub.add_parser("sweep", help="a method's settings over a grid on a dataset (or the toy world's tasks): "
                                     "one LoRA per sample shared by the grid, evaluated, tabled and plotted")
    w.add_argument("dataset", help="a DragBench or Drag100 folder, or 'toybench' (the toy world's tasks)")
    w.add_argument("--grid", action="append", default=[], metavar="NAME=v1,v2,…",
                   help="a swept setting and its values (repeat for a product); with --random NAME=lo:hi[:log]")
    w.add_argument("--random", type=int, default=None, metavar="N",
                   help="N points drawn from the --grid ranges instead of the product")
    w.add_argument("--seed", type=int, default=0, help="the edits' seed, and --random's")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--tasks", type=int, default=16, help="toybench: number of tasks")
    w.add_argument("--limit", type=int, default=None, help="a dataset's first N samples")
    w.add_argument("--batch-size", type=int, default=8, help="edits per vmapped batch")
    w.add_argument("--eval-lpips", type=Path, default=None, help="LPIPS weights: the LPIPS metric on a dataset")
    w.add_argument("--eval-dift", type=Path, default=None, help="SD-2.1 weights: the DIFT mean distance (MD)")
    w.add_argument("--eval-clip", type=Path, default=None, help="CLIP ViT-B/32 folder: the CLIP similarity")
    w.add_argument("--quiet", action="store_true")
    add_model_options(w)
    add_drag_options(w)
    w.set_defaults(fn=cmd_sweep)

    v = sub.add_parser("eval", help="DragBench metrics of a results folder: LPIPS, DIFT mean distance, "
                                    "LPIPS×MD, CLIP similarity, DAI (resumable)")
    v.add_argument("results", type=Path, help="results of `jaxdrag run` or the reference scripts' layout")
    v.add_argument("--data", type=Path, required=True, help="the DragBench or Drag100 folder edited")
    v.add_argument("--out", type=Path, default=None, help="where to write (default: RESULTS/eval)")
    v.add_argument("--dift", type=Path, default=None,
                   help="SD-2.1 diffusers folder or .safetensors single file (mean distance)")
    v.add_argument("--lpips", type=Path, default=None,
                   help="LPIPS-AlexNet .safetensors (scripts/convert_lpips.py makes it)")
    v.add_argument("--clip", type=Path, default=None, help="HF CLIP ViT-B/32 folder (CLIP similarity)")
    v.add_argument("--metrics", default=None,
                   help="comma-separated of lpips,clip,md,dai (default: those whose weights are given, and dai)")
    v.add_argument("--t", type=int, default=261, help="DIFT timestep")
    v.add_argument("--ensemble", type=int, default=8, help="DIFT ensemble size")
    v.add_argument("--seed", type=int, default=42, help="DIFT noise seed")
    v.add_argument("--gammas", default="1,5,10,20", help="DAI patch radii")
    v.add_argument("--dai-double-n", action="store_true",
                   help="DAI as GoodDrag's code computes it (divided by N twice)")
    v.add_argument("--batch-size", type=int, default=4, help="samples per network batch")
    v.add_argument("--only", nargs="*", default=None, help="only these sample names")
    v.add_argument("--dtype", default="float32", help="network dtype: float32 (default, as the papers) or bfloat16")
    v.add_argument("--quiet", action="store_true")
    v.add_argument("--no-compile-cache", action="store_true")
    v.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    v.set_defaults(fn=cmd_eval)

    u = sub.add_parser("ui", help="the browser UI (Gradio): load or generate an image, paint the mask, click "
                                  "handle and target points, run; edits from all open pages run in batches")
    u.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--samples", type=Path, action="append", default=[],
                   help="a DragBench or Drag100 folder whose samples the page offers (repeatable); the toy "
                        "world's samples are always there")
    u.add_argument("--out", type=Path, default=Path("ui_out"), help="where every result is saved")
    u.add_argument("--method", default="dragtext", help="the method selected at start")
    u.add_argument("--batch-window", type=float, default=1.0,
                   help="seconds an idle queue waits for more edits to join a batch")
    u.add_argument("--max-batch", type=int, default=8, help="the most edits run together")
    u.add_argument("--quiet", action="store_true")
    add_model_options(u)
    u.set_defaults(fn=cmd_ui)

    d = sub.add_parser("demo", help="drag an object on a toy scene with the built-in toy model")
    d.add_argument("--out", type=Path, default=Path("demo_out"))
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--dtype", default="auto")
    d.add_argument("--no-compile-cache", action="store_true")
    d.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    add_drag_options(d)
    d.set_defaults(fn=cmd_demo)
    return ap


def main(argv=None) -> int:
    """Run a sub-command. Bad input (a request, a setting, a weight file) prints one line
    ``error: …`` and returns 2; any other failure prints ``error: …`` and returns 1; ``--debug``
    shows the traceback instead."""
    from ..cluster import ClusterError
    from ..data import RequestError
    from ..weights import WeightsError

    args = build_parser().parse_args(argv)
    try:
        enable_compile_cache(not args.no_compile_cache)
        return args.fn(args)
    except (RequestError, SettingsError, WeightsError, ClusterError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into a message
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
