"""``jaxdrag eval``: DragBench / Drag100 results → per-sample JSON, per-category and overall tables.

Flow: find the dataset's samples (``data.find_samples``) and each one's result image (``jaxdrag
run``'s ``<name>/edited.png``, the DragBench scripts' ``<name>/dragged_image.png``, GoodDrag's
``<name>/output_image.png`` or ``<name>.png``) → read and check them (a sample that cannot be
evaluated is reported with the reason and skipped) → compute the metrics in batches → write
``samples/<name>.json`` atomically per sample (a rerun skips samples whose JSON holds the same
metrics and settings) → ``summary.json`` and ``summary.md`` from all sample files (``tables``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ..data import RequestError, atomic_write, find_samples, write_json
from ..errors import SettingsError
from .image import EvalInputError, clip_preprocess, pil_resize_to, read_rgb, to_signed, to_signed_dift
from .metrics import dai, match_distances
from .programs import Networks, sample_key
from .settings import WEIGHT_FLAGS, EvalSettings
from .tables import markdown, summarize

RESULT_NAMES = ("edited.png", "dragged_image.png", "output_image.png")


@dataclass
class Item:
    """One sample ready to evaluate: source and result images (PIL RGB), points, prompt."""

    name: str
    category: str
    source: object
    result: object
    handles: np.ndarray  # (N, 2) int (x, y)
    targets: np.ndarray
    prompt: str
    result_path: Path
    todo: list[str] = field(default_factory=list)
    out: dict = field(default_factory=dict)


def find_result(results: Path, name: str) -> Path:
    """The result image of sample ``name`` under ``results`` (see the module docstring)."""
    for n in RESULT_NAMES:
        if (results / name / n).is_file():
            return results / name / n
    if (results / f"{name}.png").is_file():
        return results / f"{name}.png"
    raise EvalInputError(f"{results / name}: no result image (looked for "
                         f"{', '.join(RESULT_NAMES)} there and {name}.png beside it)")


def _points(points, w: int, h: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        p = np.asarray(points, np.float64).reshape(-1, 2)
    except (ValueError, TypeError):
        raise EvalInputError(f"{where}: points must be [[x, y], …], got {points!r:.80}") from None
    if len(p) == 0 or len(p) % 2:
        raise EvalInputError(f"{where}: {len(p)} points; expected handle/target pairs (an even, "
                             f"non-zero count)")
    for i, (x, y) in enumerate(p):
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x < w and 0 <= y < h):
            kind = "handle" if i % 2 == 0 else "target"
            raise EvalInputError(f"{where}: point {i} ({kind} of pair {i // 2}) ({x:g}, {y:g}) is "
                                 f"outside the {w}×{h} image")
    p = p.astype(np.int64)
    return p[0::2], p[1::2]


def load_item(sample, results: Path) -> Item:
    """Read one sample and its result; EvalInputError / RequestError name what is wrong."""
    req = sample.load()
    result_path = find_result(results, sample.name)
    src = read_rgb(_source_path(sample))
    res = read_rgb(result_path)
    w, h = src.size
    rw, rh = res.size
    if abs(rw / rh - w / h) > 0.02:
        raise EvalInputError(f"{result_path}: size mismatch: result is {rw}×{rh}, source is {w}×{h} "
                             f"(different aspect ratio: a result of another image?)")
    handles, targets = _points(req.points, w, h, str(sample.folder))
    category = sample.name.split("/")[0] if "/" in sample.name else ""
    return Item(sample.name, category, src, res, handles, targets, req.prompt or "", result_path)


def _source_path(sample) -> Path:
    return sample.folder / ("original_image.png" if sample.kind == "dragbench" else "original.jpg")


# ----------------------------------------------------------------------------------------------
# computing


def _compute(items: list[Item], nets: Networks, s: EvalSettings) -> None:
    """Fill ``item.out`` for a batch of items (all metrics in their ``todo``)."""
    want = lambda m: [it for it in items if m in it.todo]  # noqa: E731
    if want("lpips"):
        its = want("lpips")
        vals = nets.lpips_batch([to_signed(it.source) for it in its], [to_signed(it.result) for it in its])
        for it, v in zip(its, vals):
            it.out["lpips"] = float(v)
    if want("clip"):
        its = want("clip")
        vals = nets.clip_batch([clip_preprocess(it.source) for it in its],
                               [clip_preprocess(it.result) for it in its])
        for it, v in zip(its, vals):
            it.out["clip"] = float(v)
    if want("dai"):
        for it in want("dai"):
            src = np.asarray(it.source, np.float32) / 255.0
            res = np.asarray(it.result, np.float32) / 255.0
            if src.shape != res.shape:
                it.out["dai_error"] = (f"{it.result_path}: size mismatch: result is "
                                       f"{res.shape[1]}×{res.shape[0]}, source is {src.shape[1]}×"
                                       f"{src.shape[0]} (DAI compares pixels at the same coordinates)")
                continue
            it.out["dai"] = {str(g): dai(src, res, it.handles, it.targets, g, double_n=s.dai_double_n)
                             for g in s.gammas}
    if want("md"):
        by_size: dict[tuple, list[Item]] = {}
        for it in want("md"):
            by_size.setdefault(it.source.size, []).append(it)
        for (w, h), its in by_size.items():
            ctx = nets.prompt_embeddings([it.prompt for it in its])
            src = np.stack([to_signed_dift(it.source) for it in its])
            drg = np.stack([to_signed_dift(pil_resize_to(it.result, (w, h))) for it in its])
            keys = jnp.stack([sample_key(s.seed, it.name, 0) for it in its]
                             + [sample_key(s.seed, it.name, 1) for it in its])
            feats = nets.dift_batch(np.concatenate([src, drg]), jnp.concatenate([ctx, ctx]), keys, s)
            n = len(its)
            for i, it in enumerate(its):
                d, matched = match_distances(feats[i], feats[n + i], jnp.asarray(it.handles),
                                             jnp.asarray(it.targets), hw=(h, w), rows=s.rows)
                it.out["md"] = [float(v) for v in np.asarray(d)]
                it.out["md_matched"] = np.asarray(matched).tolist()


# ----------------------------------------------------------------------------------------------
# the run


def _stored(path: Path, s: EvalSettings) -> tuple[dict, dict]:
    """(the metrics of an existing sample file still valid for ``s``, the whole record) — ({}, {})
    if there is none. Metrics of the record that ``s`` does not ask for are kept when the file is
    rewritten."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, {}
    keep = {}
    for m in s.metrics:
        if m in rec.get("metrics", {}) and rec.get("settings", {}).get(m) == s.key(m):
            keep[m] = rec["metrics"][m]
            if m == "md" and "md_matched" in rec.get("metrics", {}):
                keep["md_matched"] = rec["metrics"]["md_matched"]
    return keep, rec


def evaluate(results: str | Path, data: str | Path, out: str | Path, nets: Networks,
             settings: EvalSettings = EvalSettings(), *, only: list[str] | None = None,
             progress: bool = True) -> dict:
    """Evaluate every sample of ``data`` whose result is in ``results``; write into ``out``;
    return the summary (also written as summary.json / summary.md)."""
    from tqdm import tqdm

    s = settings
    needs = {"lpips": nets.lpips, "clip": nets.clip, "md": nets.dift}
    for m in s.metrics:
        if m in needs and needs[m] is None:
            raise SettingsError(f"metric {m!r} needs its network's weights ({WEIGHT_FLAGS[m]} PATH)")
    results, out = Path(results), Path(out)
    if not results.is_dir():
        raise RequestError(f"{results}: results folder not found")
    samples = find_samples(data)
    if only:
        unknown = sorted(set(only) - {x.name for x in samples})
        if unknown:
            raise RequestError(f"--only: no such sample(s) in {data}: {', '.join(unknown[:5])}")
        samples = [x for x in samples if x.name in set(only)]
    skipped: dict[str, str] = {}
    todo: list[tuple] = []
    for smp in samples:
        have, prev = _stored(out / "samples" / f"{smp.name}.json", s)
        missing = [m for m in s.metrics if m not in have]
        if missing:
            todo.append((smp, have, missing, prev))
    bar = tqdm(total=len(todo), desc="eval", unit="sample", disable=not progress)
    for start in range(0, len(todo), s.batch_size):
        batch = []
        prevs = {}
        for smp, have, missing, prev in todo[start:start + s.batch_size]:
            try:
                it = load_item(smp, results)
            except (EvalInputError, RequestError) as e:
                skipped[smp.name] = str(e)
                bar.update(1)
                continue
            it.todo, it.out = missing, dict(have)
            prevs[smp.name] = prev
            batch.append(it)
        if not batch:
            continue
        _compute(batch, nets, s)
        for it in batch:
            prev = prevs[it.name]  # metrics of earlier runs with other --metrics are kept
            rec = {"name": it.name, "category": it.category, "result": str(it.result_path),
                   "pairs": len(it.handles), "prompt": it.prompt,
                   "metrics": {**prev.get("metrics", {}),
                               **{k: v for k, v in it.out.items() if k != "dai_error"}},
                   "settings": {**prev.get("settings", {}), **{m: s.key(m) for m in s.metrics}}}
            if "dai_error" in it.out:
                rec["errors"] = {"dai": it.out["dai_error"]}
            write_json(out / "samples" / f"{it.name}.json", rec)
            bar.update(1)
    bar.close()
    summary = summarize(out, [x.name for x in samples], s, skipped)
    write_json(out / "summary.json", summary)
    atomic_write(out / "summary.md", markdown(summary).encode())
    return summary
