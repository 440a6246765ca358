"""Sweeps: a method's settings over a grid on a dataset (DragBench, Drag100 or the toy world's
ToyBench tasks), every (sample, grid point) one edit in the vmapped batches, the per-sample LoRA
trained once and shared by the grid, evaluated, tabled (mean, median, bootstrap 95 % interval)
and plotted. ``grid`` parses and checks, ``runner`` runs and collects, ``table`` aggregates,
``plots`` draws; ``sweep`` does all of it (``jaxdrag sweep``)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import grid, plots, runner, table
from .runner import Item, dataset_items, run_sweep, toy_items


def sweep(pipe, items: list[Item], method: str, points: list[dict], out: str | Path, *, dataset: str,
          settings=None, batch_size: int = 8, base: dict | None = None, data_root: Path | None = None,
          eval_nets=None, eval_settings=None, strip_samples: int = 3, progress: bool = False,
          log: Callable[[str], None] = print) -> dict:
    """Run (what is missing of) the sweep, evaluate, and write ``table.json``, ``table.md`` and
    the pictures into ``out``; returns {"table", "cost", "pictures"}."""
    import json

    from ..data import atomic_write, write_json

    out = Path(out)
    cost = run_sweep(pipe, items, method, points, out, dataset=dataset, settings=settings,
                     batch_size=batch_size, base=base, progress=progress, log=log)
    toy = any(it.task is not None for it in items)
    if not toy and eval_nets is not None:
        runner.evaluate_points(out, data_root, points, eval_nets, eval_settings, log=log)
    rows = runner.collect(out, items, points)
    names = list(dict.fromkeys(k for p in points for k in p))
    tab = table.build(rows, points, runner.point_ids(points), grid.defaults(method, names))
    tab.update(method=method, dataset=dataset, base=base or {}, cost=cost)
    write_json(out / "table.json", tab)
    order = list(table.TOY_METRICS) if toy else None
    atomic_write(out / "table.md", (f"# sweep: {method} on {dataset}\n\n" + table.markdown(tab, order)
                                    + "\n```\n" + json.dumps(cost, indent=1) + "\n```\n").encode())
    pics = plots.draw_all(out, tab, names, [it.name for it in items[:strip_samples]], toy)
    return {"table": tab, "cost": cost, "pictures": [str(p) for p in pics]}


__all__ = ["grid", "plots", "runner", "table", "sweep", "Item", "dataset_items", "toy_items", "run_sweep"]
