"""``jaxdrag run``: a DragBench / Drag100 folder, batched, resumable, optionally split over
several processes (``jaxdrag.cluster``)."""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path


from ..errors import SettingsError
from .models import load_models, local_devices
from .options import add_drag_options, add_model_options, batch_size_arg, drag_overrides, edit_settings


def cmd_run(args) -> int:
    from ..data import is_done, write_json
    from ..drag.methods import resolve

    from .. import cluster

    t_start = time.perf_counter()
    where = (cluster.place(args.coordinator, args.num_processes, args.process_id) if args.distributed
             else cluster.Place(0, 1, ""))
    pid, nproc = where.pid, where.nproc
    if not args.peer_timeout > 0:
        raise SettingsError(f"--peer-timeout {args.peer_timeout}: must be > 0 seconds")
    if not args.compile_workers >= 0:
        raise SettingsError(f"--compile-workers {args.compile_workers}: must be ≥ 0")
    cfg, _ = resolve(args.method, **drag_overrides(args))
    settings = edit_settings(args)
    samples, names = _select_samples(args)
    n_all = len(samples)
    samples = samples[pid::nproc]  # this process's share (every process lists the same samples)
    out = Path(args.out)
    todo = [s for s in samples if not is_done(out / s.name)]
    if args.compile_only:
        return _compile_only(args, samples, cfg, settings)
    coord = peer = None
    if nproc > 1:  # heartbeats start now, before the model loads and compiles
        finished = [s.name for s in samples if s not in todo]
        coord = cluster.Coordinator(where) if pid == 0 else None
        peer = cluster.Peer(where, finished) if pid != 0 else None
        print(f"process {pid} of {nproc}: {len(samples)} of the {n_all} samples", file=sys.stderr)
    print(f"{len(samples)} samples, {len(samples) - len(todo)} already done, {len(todo)} to run", file=sys.stderr)
    failures: dict[str, str] = {}
    loaded = _read_samples(todo, args.seed, failures)
    stats: dict = {"done": len(samples) - len(todo)}  # counted up as results are written
    ran: list[str] = []
    try:
        if loaded:
            _edit_samples(args, cfg, settings, loaded, out, peer, failures, ran, stats)
    finally:  # a summary even when the run is interrupted or a batch crashes the process
        done = stats.pop("done")
        summary = {"dataset": str(args.dataset), "method": args.method, "buckets": settings.buckets,
                   "total": len(samples), "done": done,
                   "failed": failures, **stats, "wall_s": round(time.perf_counter() - t_start, 1)}
        missing = []
        if nproc > 1:
            summary, missing = _cluster_summary(args, where, coord, peer, summary, ran, names, out)
        if summary is not None:
            write_json(out / "summary.json", summary)
    print(json.dumps({"done": done, "failed": len(failures), "summary": str(out / "summary.json"),
                      **({"missing": len(missing)} if missing else {})}))
    return 0 if not failures and not missing else 1


def _select_samples(args) -> tuple[list, list[str]]:
    """The dataset's samples after ``--only`` and ``--limit``, and their names (every process of a
    distributed run lists the same)."""
    from ..data import find_samples

    samples = find_samples(args.dataset)
    if args.only:
        samples = [s for s in samples if s.name in set(args.only)]
    if args.limit:
        samples = samples[:args.limit]
    return samples, [s.name for s in samples]


def _edit_samples(args, cfg, settings, loaded: list, out: Path, peer, failures: dict, ran: list,
                  stats: dict) -> None:
    """Load the model and edit the read samples in batches, writing each result as its batch
    finishes (an interrupted run loses nothing); failures and the names run are recorded in
    ``failures`` / ``ran``, ``stats["done"]`` counts up with every edit written (so an interrupted
    run's summary counts what was written) and ``stats["compile"]`` holds this run's compiles."""
    from tqdm import tqdm

    from ..data import write_result
    from ..pipeline import edit_batch

    pipe = load_models(args, cfg.use_clip)
    n_dev = pipe.use_devices(local_devices(args.devices))
    if n_dev > 1:
        print(f"edits spread over {n_dev} devices", file=sys.stderr)
    n0, s0 = dict(pipe.stages.compiles), dict(pipe.stages.compile_s)
    bar = tqdm(total=len(loaded), desc="samples", disable=args.quiet)

    def on_result(i, res):
        s = loaded[i][0]
        res.name = s.name
        write_result(res, out / s.name)
        # batches (each of its edits counts 1/edits) and the canvases edits ran in
        stats["batches"] = round(stats.get("batches", 0.0) + 1.0 / max(1, res.config["batch_edits"]), 6)
        canvas = "x".join(map(str, res.config["canvas"] or res.config["working_size"]))
        stats.setdefault("shapes", {})[canvas] = stats.get("shapes", {}).get(canvas, 0) + 1
        ran.append(s.name)
        if peer is not None and res.failure is None:
            peer.finish(s.name)
        if res.failure is not None:
            d = res.failure.get("diverged", {})
            failures[s.name] = (f"diverged at iteration {d.get('iteration')} "
                                f"({d.get('what')} became non-finite)")
        else:
            stats["done"] += 1
        bar.update(1)

    def on_error(indices, e):  # a failing batch is reported, the run goes on
        traceback.print_exception(e, file=sys.stderr)
        for i in indices:
            failures[loaded[i][0].name] = f"{type(e).__name__}: {e}"
        bar.update(len(indices))

    try:
        edit_batch(pipe, [r for _, r in loaded], args.method, settings=settings, progress=not args.quiet,
                   on_result=on_result, on_error=on_error, compile_workers=args.compile_workers,
                   **drag_overrides(args))
        bar.close()
    finally:
        per_stage = {k: n - n0.get(k, 0) for k, n in pipe.stages.compiles.items() if n > n0.get(k, 0)}
        stats["compile"] = {"programs": sum(per_stage.values()),
                            "seconds": round(sum(pipe.stages.compile_s.values()) - sum(s0.values()), 1),
                            "per_stage": per_stage}


def _compile_only(args, samples, cfg, settings) -> int:
    """``run --compile-only``: every program of the run compiled (the persistent cache filled),
    no edit run; prints and writes ``compile.json`` in ``--out``: groups, programs, compile
    seconds summed over programs, wall seconds, samples skipped as unreadable."""
    from ..data import RequestError, validate, write_json
    from ..pipeline import compile_for

    t0 = time.perf_counter()
    reqs, skipped = [], {}
    for s in samples:
        try:
            req = s.load()
            req.seed = args.seed
            reqs.append(validate(req))
        except RequestError as e:
            skipped[s.name] = str(e)
            print(f"skipped {s.name}: {e}", file=sys.stderr)
    pipe = load_models(args, cfg.use_clip)
    pipe.use_devices(local_devices(args.devices))
    before = dict(pipe.stages.compiles)
    rep = compile_for(pipe, reqs, args.method, settings=settings, workers=max(1, args.compile_workers),
                      progress=not args.quiet, **drag_overrides(args))
    rep = {"dataset": str(args.dataset), "method": args.method, "samples": len(reqs), **rep,
           "per_stage": {k: n - before.get(k, 0) for k, n in pipe.stages.compiles.items() if n > before.get(k, 0)},
           "skipped": skipped,
           "wall_with_loading_s": round(time.perf_counter() - t0, 1)}
    write_json(Path(args.out) / "compile.json", rep)
    print(json.dumps({k: rep[k] for k in ("groups", "programs", "compile_s", "wall_s")}))
    return 0 if not rep["failed"] else 1


def _read_samples(todo, seed: int, failures: dict) -> list:
    """Every sample read and checked before the model is loaded: [(sample, request)]; a bad one
    is reported, recorded in ``failures`` and skipped."""
    from ..data import RequestError, validate

    loaded = []
    for s in todo:
        try:
            req = s.load()
            req.seed = seed
            loaded.append((s, validate(req)))
        except RequestError as e:
            failures[s.name] = str(e)
            print(f"skipped {s.name}: {e}", file=sys.stderr)
    return loaded


def _cluster_summary(args, where, coord, peer, summary: dict, ran: list, names: list, out: Path):
    """A distributed run's end: process 0 waits for its peers' summaries (or declares them lost)
    and merges them; a peer sends its own (or writes it beside the results when process 0 does not
    take it). Returns (the summary to write or None, the samples still missing)."""
    from .. import cluster
    from ..data import is_done, write_json

    pid, nproc = where.pid, where.nproc
    summary.update(process=pid, ran=ran)
    missing = []
    if coord is not None:
        gathered = coord.wait(args.peer_timeout, log=lambda m: print(m, file=sys.stderr))
        coord.close()
        summary = cluster.merge(summary, gathered, {p: names[p::nproc] for p in range(nproc)}, len(names),
                                on_disk=lambda name: is_done(out / name))
        missing = summary["missing"]
        if missing:
            print(f"process 0: {len(missing)} sample(s) of lost processes not finished: "
                  f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; rerun the same command "
                  f"to complete them", file=sys.stderr)
    elif not peer.send_summary(summary, give_up_after=args.peer_timeout):
        alone = out / f"summary.process-{pid}.json"
        write_json(alone, summary)
        print(f"process {pid}: process 0 at {where.coordinator} did not take the summary within "
              f"{args.peer_timeout:g} s; wrote {alone}", file=sys.stderr)
        missing = ["(summary not merged)"]
    return (summary if pid == 0 else None), missing


def add_parser(sub) -> None:
    """The `jaxdrag run` options."""
    p = sub.add_parser("run", help="edit every sample of a DragBench or Drag100 folder (resumable)")
    p.add_argument("dataset", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch-size", type=batch_size_arg, default=8,
                   help="edits per vmapped batch (same working size), or 'auto': the largest batch whose "
                        "every stage fits in device memory (XLA's memory analysis)")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--only", nargs="*", default=None, help="only these sample names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--devices", default="all",
                   help="local devices to spread each batch over: all (default) or a count")
    p.add_argument("--distributed", action="store_true",
                   help="one of several processes/hosts: each takes every n-th sample; process 0 merges the "
                        "summaries and survives a lost peer (jaxdrag.cluster)")
    p.add_argument("--coordinator", default=None, help="with --distributed: host:port of process 0")
    p.add_argument("--num-processes", type=int, default=None, help="with --distributed: process count")
    p.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")
    p.add_argument("--peer-timeout", type=float, default=120.0,
                   help="with --distributed: seconds without a heartbeat after which process 0 declares a peer "
                        "lost and writes the summary without it (default 120)")
    p.add_argument("--compile-workers", type=int, default=2,
                   help="threads compiling the programs of the next shape groups while the current one runs "
                        "(0: compile each when first needed)")
    p.add_argument("--buckets", choices=("auto", "exact"), default="auto",
                   help="auto (default): samples of different sizes share a few masked canvases (each edit computed "
                        "exactly on its own size; images within 1 grey level of exact), so each stage compiles once "
                        "per bucket; exact: one group per working shape")
    p.add_argument("--bucket-waste", type=float, default=0.25,
                   help="with --buckets auto: merge buckets while the padding stays under this share of the canvas")
    p.add_argument("--max-buckets", type=int, default=8, help="with --buckets auto: at most this many canvases")
    p.add_argument("--compile-only", action="store_true",
                   help="compile (into the persistent compilation cache) every program the run needs, run no "
                        "edit, and report programs, compile seconds summed and wall time")
    add_model_options(p)
    add_drag_options(p)
    p.set_defaults(fn=cmd_run)
