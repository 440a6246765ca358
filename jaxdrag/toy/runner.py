"""Run ToyBench: every task through ``edit_batch`` for each method, batched, resumable (a task
whose ``metrics.json`` exists is skipped), then per-method tables (JSON + Markdown).

Layout of ``out``: ``tasks.json``; ``<method>/<task>/{edited.png, overlay.png, report.json,
metrics.json}``; ``toybench.json`` and ``toybench.md`` (the tables). The LoRA of a task is
trained once and reused by every method (the pipeline's LoRA cache), as it depends only on the
image, prompt, seed and LoRA settings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..data import EditRequest, write_json, write_result
from . import bench


def _seconds_per_edit(res, b: int) -> float:
    run = sum(v for k, v in res.timings.items() if not k.startswith("compile_"))
    comp = sum(v for k, v in res.timings.items() if k.startswith("compile_"))
    return max(run - comp, 0.0) / b


def request(task: bench.Task) -> EditRequest:
    return EditRequest(image=task.image, points=task.points, prompt=task.prompt, mask=task.mask,
                       edit_prompt=task.edit_prompt, name=task.name, seed=0)


def run(pipe, methods: Sequence[str], out: Path, *, tasks: Sequence[bench.Task] | None = None,
        n_tasks: int = bench.N_TASKS, batch_size: int = 10, settings=None, overrides: dict | None = None,
        progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run ``methods`` on the tasks; returns {method: summary} (also written to ``out``). Each
    method gets the ``overrides`` it reads (``methods.valid_settings``); one that no method reads
    is an error."""
    from ..drag.methods import overrides_per_method
    from ..pipeline import EditSettings, edit_batch

    out = Path(out)
    tasks = list(tasks) if tasks is not None else bench.make_tasks(n_tasks)
    overrides = dict(overrides or {})
    per_method = overrides_per_method(methods, overrides)
    settings = settings or EditSettings()
    if pipe.lora_cache is None:
        pipe.enable_lora_cache()
    write_json(out / "tasks.json", [t.to_json() for t in tasks])
    rows, extra, per_task = {}, {}, {}
    for method in methods:
        mdir = out / method
        todo = [t for t in tasks if bench.read_metrics(mdir / t.name) is None]
        log(f"[toybench] {method}: {len(tasks) - len(todo)} done, {len(todo)} to run")
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            t0 = time.perf_counter()
            results = edit_batch(pipe, [request(t) for t in chunk], method, settings=settings,
                                 progress=progress, **per_method[method])
            for t, r in zip(chunk, results):
                write_result(r, mdir / t.name)
                m = bench.measure(t, r.image)
                m.update(iterations=r.iterations, reached=r.reached,
                         seconds_per_edit=_seconds_per_edit(r, len(chunk)))
                write_json(mdir / t.name / "metrics.json", m)
            log(f"[toybench] {method}: {min(s + batch_size, len(todo))}/{len(todo)} "
                f"({time.perf_counter() - t0:.0f} s for {len(chunk)})")
        metrics = [bench.read_metrics(mdir / t.name) for t in tasks]
        per_task[method] = {t.name: m for t, m in zip(tasks, metrics) if m is not None}
        metrics = [m for m in metrics if m is not None]
        rows[method] = bench.summarize(metrics)
        extra[method] = {"iterations": float(np.mean([m["iterations"] for m in metrics])),
                         "seconds_per_edit": float(np.median([m["seconds_per_edit"] for m in metrics]))}
        rows[method].update(extra[method])
    write_json(out / "toybench.json", {"tasks": len(tasks), "methods": rows, "overrides": overrides,
                                       "per_task": per_task})
    md = bench.table_markdown(rows, extra)
    (out / "toybench.md").write_text(md)
    return rows


def load_rows(out: Path) -> dict:
    return json.loads((Path(out) / "toybench.json").read_text())["methods"]
