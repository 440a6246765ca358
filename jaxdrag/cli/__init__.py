"""``jaxdrag`` command line: ``edit`` (one image, or a generated one), ``generate``, ``run`` (a DragBench / Drag100 folder), ``demo``,
``ui`` (the browser UI), ``toybench`` (drags with exact ground truth on the toy world), ``eval`` (DragBench metrics of a
results folder).

Every drag setting of the method presets has its own option (``--max-iters``, ``--latent-lr``,
``--r-m``, ``--fusion``, …), generated from ``jaxdrag.drag.methods``; ``--steps`` is an alias of
``--max-iters``.

One module per sub-command (``edit`` with ``generate``, ``run``, ``demo``, ``ui``, ``toybench``, ``sweep``,
``evaluate``), each declaring its options (``add_parser``) and running it (``cmd_…``); the shared options
(``options``) and models (``models``); this module puts the parser together and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import SettingsError
from . import demo, edit, evaluate, run, sweep, toybench, ui
from .options import enable_compile_cache


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxdrag", description="Diffusion point-drag image editing in JAX")
    sub = ap.add_subparsers(dest="cmd", required=True)
    edit.add_edit_parser(sub)
    edit.add_generate_parser(sub)
    run.add_parser(sub)
    toybench.add_parser(sub)
    sweep.add_parser(sub)
    evaluate.add_parser(sub)
    ui.add_parser(sub)
    demo.add_parser(sub)
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
