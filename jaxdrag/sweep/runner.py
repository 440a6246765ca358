"""Running a sweep: every (sample, grid point) one edit of ``edit_batch``'s vmapped batches,
resumable, the per-sample work shared.

Layout of ``out``: ``sweep.json`` (method, dataset, the points); ``points/<id>/<sample>/``
holding what ``jaxdrag run`` writes for an edit (edited.png, overlay.png, report.json) and, on
the toy world, ``metrics.json`` (ToyBench's exact metrics); ``points/<id>/eval/`` the
``jaxdrag eval`` records on a real dataset; ``table.json`` / ``table.md`` and the pictures.

Sharing: edits are ordered sample by sample, so the grid points of a sample fill the same
batches; the pipeline's cache (on for a sweep) trains a sample's LoRA once — inside a batch
too — and every grid point, in every later batch and program group, reuses it and the sample's
inversion. Points
that differ only in continuous settings (``DragHypers``: learning rates, λ, λ_t, …) share one
program and one batch; those that change a compiled setting (an iteration cap, the timestep,
the LoRA's steps, …) form groups run one after the other, each timed and counted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..data import EditRequest, is_done, write_json, write_result
from ..errors import SettingsError
from . import grid as G


@dataclass
class Item:
    """One sample of a sweep: its name, request, and (toy world) the task with its truth."""

    name: str
    request: EditRequest
    task: object | None = None


def toy_items(n_tasks: int) -> list[Item]:
    """ToyBench's held-out tasks (deterministic) as sweep samples."""
    from ..toy import bench
    from ..toy.runner import request

    return [Item(t.name, request(t), t) for t in bench.make_tasks(n_tasks)]


def dataset_items(root: Path, limit: int | None = None, seed: int = 0, log: Callable = print) -> list[Item]:
    """The readable samples of a DragBench / Drag100 folder (bad ones reported and skipped)."""
    from ..data import RequestError, find_samples, validate

    items = []
    for s in find_samples(root)[:limit]:
        try:
            req = s.load()
            req.seed = seed
            items.append(Item(s.name, validate(req)))
        except RequestError as e:
            log(f"skipped {s.name}: {e}")
    return items


def point_ids(points: list[dict]) -> list[str]:
    return [f"p{i:03d}" for i in range(len(points))]


def _check_out(out: Path, record: dict) -> None:
    """A rerun continues the same sweep; another grid in the same folder is refused."""
    f = out / "sweep.json"
    if f.exists():
        old = json.loads(f.read_text())
        if old.get("points") != record["points"] or old.get("method") != record["method"] \
                or old.get("dataset") != record["dataset"]:
            raise SettingsError(f"--out {out}: holds a sweep of another method, dataset or grid; "
                                f"use another folder (or delete it)")
    write_json(f, record)


def _group_settings(settings, pipe_point: dict):
    """The EditSettings of a group of points with these pipeline settings."""
    if "lora_steps" in pipe_point:
        settings = replace(settings, lora=replace(settings.lora, steps=int(pipe_point["lora_steps"])))
    if "inversion_strength" in pipe_point:
        settings = replace(settings, inversion_strength=float(pipe_point["inversion_strength"]))
    return settings


def run_sweep(pipe, items: list[Item], method: str, points: list[dict], out: Path, *, dataset: str,
              settings=None, batch_size: int = 8, base: dict | None = None, progress: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Run every (item, point) edit not yet on disk; returns the cost record ({"groups": [...],
    "edits_run", "loras_trained", "wall_s"}). ``base``: drag overrides every point shares."""
    from ..pipeline import EditSettings, edit_batch

    out = Path(out)
    ids = point_ids(points)
    _check_out(out, {"method": method, "dataset": dataset, "base": base or {},
                     "points": [{"id": i, "label": G.label(p), "point": p} for i, p in zip(ids, points)]})
    settings = settings or EditSettings()
    if pipe.lora_cache is None:
        pipe.enable_lora_cache()
    groups: dict[str, list[int]] = {}
    for k, p in enumerate(points):
        _, comp, pip = G.split(p)
        groups.setdefault(json.dumps([comp, pip], sort_keys=True), []).append(k)
    t_all, n0, i0, run_edits, cost = time.perf_counter(), pipe.loras_trained, pipe.inversions_run, 0, []
    for key, ks in groups.items():
        comp, pip = json.loads(key)
        todo = [(it, k) for it in items for k in ks if not is_done(out / "points" / ids[k] / it.name)]
        g_settings = _group_settings(settings, pip)
        t0, c0 = time.perf_counter(), sum(pipe.stages.compiles.values())
        l0, v0 = pipe.loras_trained, pipe.inversions_run
        log(f"[sweep] group {G.label({**comp, **pip}) or '(continuous settings only)'}: "
            f"{len(ks)} point(s), {len(todo)} edit(s) to run")
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            reqs = [replace(it.request, name=f"{ids[k]}/{it.name}",
                            hypers={**it.request.hypers, **G.split(points[k])[0]}) for it, k in chunk]

            def on_result(i, res, chunk=chunk):
                it, k = chunk[i]
                folder = out / "points" / ids[k] / it.name
                res.name = it.name
                if it.task is not None and res.image is not None:  # the toy world's exact metrics
                    from ..toy import bench

                    m = bench.measure(it.task, res.image)
                    m.update(iterations=res.iterations, reached=res.reached)
                    write_json(folder / "metrics.json", m)
                write_result(res, folder)  # the report last: its presence marks the edit done

            edit_batch(pipe, reqs, method, settings=g_settings, progress=progress, on_result=on_result,
                       **{**(base or {}), **comp})
            run_edits += len(chunk)
            log(f"[sweep]   {min(s + batch_size, len(todo))}/{len(todo)}")
        cost.append({"settings": {**comp, **pip}, "points": len(ks), "edits": len(todo),
                     "loras_trained": pipe.loras_trained - l0, "inversions_run": pipe.inversions_run - v0,
                     "programs_compiled": sum(pipe.stages.compiles.values()) - c0,
                     "wall_s": round(time.perf_counter() - t0, 1)})
    return {"groups": cost, "edits_run": run_edits, "loras_trained": pipe.loras_trained - n0,
            "inversions_run": pipe.inversions_run - i0,
            "wall_s": round(time.perf_counter() - t_all, 1)}


def evaluate_points(out: Path, data: Path, points: list[dict], nets, eval_settings, log: Callable = print) -> None:
    """``jaxdrag eval`` of each grid point's results (resumable: what is stored is kept)."""
    from ..eval import evaluate

    for pid in point_ids(points):
        folder = Path(out) / "points" / pid
        if folder.is_dir():
            log(f"[sweep] eval {pid}")
            evaluate(folder, data, folder / "eval", nets, eval_settings, progress=False)


def collect(out: Path, items: list[Item], points: list[dict]) -> dict[str, dict[str, dict]]:
    """{point id: {sample: metrics}} of what is on disk: ToyBench's metrics.json, or the eval
    records' metrics; every edit also gives its iteration count."""
    rows: dict[str, dict[str, dict]] = {}
    for pid in point_ids(points):
        base = Path(out) / "points" / pid
        per = {}
        for it in items:
            m = {}
            for f, pick in ((base / it.name / "metrics.json", lambda d: d),
                            (base / "eval" / "samples" / f"{it.name}.json", lambda d: d.get("metrics", {}))):
                try:
                    m.update(pick(json.loads(f.read_text())))
                except (OSError, ValueError):
                    pass
            try:
                rep = json.loads((base / it.name / "report.json").read_text())
                m.setdefault("iterations", rep.get("iterations"))
            except (OSError, ValueError):
                continue
            per[it.name] = m
        rows[pid] = per
    return rows
