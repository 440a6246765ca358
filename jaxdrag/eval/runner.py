"""``jaxdrag eval``: DragBench / Drag100 results → per-sample JSON, per-category and overall tables.

Flow: find the dataset's samples (``data.find_samples``) and each one's result image (``jaxdrag
run``'s ``<name>/edited.png``, the DragBench scripts' ``<name>/dragged_image.png``, GoodDrag's
``<name>/output_image.png`` or ``<name>.png``) → read and check them (a sample that cannot be
evaluated is reported with the reason and skipped) → compute the metrics in batches → write
``samples/<name>.json`` atomically per sample (a rerun skips samples whose JSON holds the same
metrics and settings) → ``summary.json`` and ``summary.md`` from all sample files.

Aggregates as the papers: LPIPS and CLIP similarity are means over images, MD the mean over all
handle–target pairs (not per image), LPIPS × MD (DragText) the product of the two aggregates, DAI
the mean over images.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..data import RequestError, find_samples, write_json
from ..errors import SettingsError
from .image import (EvalInputError, clip_preprocess, pil_resize_to, read_rgb, resize_bilinear,
                    to_signed, to_signed_dift)
from .metrics import clip_cosine, dai, dift_features, match_distances

METRICS = ("lpips", "clip", "md", "dai")
RESULT_NAMES = ("edited.png", "dragged_image.png", "output_image.png")


@dataclass(frozen=True)
class EvalSettings:
    """What is computed and how (defaults: the DragBench scripts and GoodDrag's DAI)."""

    metrics: tuple[str, ...] = METRICS
    t: int = 261                     # DIFT timestep
    up_index: int = 1                # DIFT: output of up_blocks[1]
    ensemble: int = 8                # DIFT ensemble size
    seed: int = 42                   # noise: fold_in(seed, crc32(sample name)), stable under resume
    gammas: tuple[int, ...] = (1, 5, 10, 20)  # DAI patch radii
    dai_double_n: bool = False       # GoodDrag code's quirk (divide by N twice)
    batch_size: int = 4              # samples per network batch (DIFT: × ensemble × 2 images)
    rows: int = 64                   # full-resolution rows per chunk of the MD cosine map

    def __post_init__(self):
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise SettingsError(f"unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
        for name in ("ensemble", "batch_size", "rows"):
            if int(getattr(self, name)) < 1:
                raise SettingsError(f"setting {name} = {getattr(self, name)}: must be ≥ 1")
        if not 0 <= self.t < 1000:
            raise SettingsError(f"setting t = {self.t}: must be in [0, 999]")
        if any(int(g) < 0 for g in self.gammas):
            raise SettingsError(f"setting gammas = {list(self.gammas)}: DAI radii must be ≥ 0")

    def key(self, metric: str) -> dict:
        """The settings a metric's value depends on (a stored value is reused only if equal)."""
        if metric == "md":
            return {"t": self.t, "up_index": self.up_index, "ensemble": self.ensemble, "seed": self.seed}
        if metric == "dai":
            return {"gammas": list(self.gammas), "double_n": self.dai_double_n}
        return {}


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
# networks as jitted functions


class Networks:
    """The loaded evaluation networks (any of them None) as jitted batch functions."""

    def __init__(self, lpips=None, dift=None, clip=None):
        self.lpips, self.dift, self.clip = lpips, dift, clip
        self._jit: dict[str, Callable] = {}

    def _j(self, name, fn, **kw):
        if name not in self._jit:
            self._jit[name] = jax.jit(fn, **kw)
        return self._jit[name]

    # the jitted programs (also exported for accelerators by the tests)
    def lpips_fn(self):
        """(params, (B, 224, 224, 3), (B, 224, 224, 3)) → (B,) LPIPS."""
        c = self.lpips
        return self._j("lpips", lambda p, u, v: nnx.merge(c.graphdef, p)(u, v))

    def clip_fn(self):
        """(params, (B, S, S, 3), (B, S, S, 3)) CLIP-preprocessed → (B,) cosine of the embeddings."""
        c = self.clip

        def run(p, u, v):
            m = nnx.merge(c.graphdef, p)
            return clip_cosine(m.image_embeds(u), m.image_embeds(v))
        return self._j("clip", run)

    def text_fn(self):
        """(params, (B, 77) ids) → (B, 77, D) prompt embeddings (last hidden state)."""
        d = self.dift
        return self._j("text", lambda p, ids: nnx.merge(d.text_encoder.graphdef, p)(ids)[0])

    def dift_fn(self, s: EvalSettings):
        """(unet params, vae params, (B, H, W, 3) [-1, 1] images of one size, (B, S, D) prompt
        embeddings, (B,) keys) → (B, h', w', C) DIFT features."""
        d = self.dift
        alpha = jnp.asarray(d.schedule.alphas_cumprod[s.t], jnp.float32)
        scaling = float(d.vae.cfg.scaling_factor)

        def run(up, vp, x, ctx, ks):
            unet = nnx.merge(d.unet.graphdef, up)
            vae = nnx.merge(d.vae.graphdef, vp)
            moments = vae.encode(x)  # once per image (see dift_features)
            shape = (s.ensemble,) + moments[0].shape[1:]
            eps_p = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(ks)
            eps_n = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape))(ks)
            return dift_features(lambda z, t, c: unet(z, t, c, up_until=s.up_index)[1]["up"][s.up_index],
                                 lambda _: moments, x, ctx, eps_p, eps_n, alpha_t=alpha, t=s.t,
                                 scaling=scaling, up_index=s.up_index)

        return self._j(f"dift{s.t}_{s.up_index}_{s.ensemble}", run)

    # batches
    def lpips_batch(self, x0: list[np.ndarray], x1: list[np.ndarray]) -> np.ndarray:
        """Lists of (H_i, W_i, 3) [-1, 1] images → (B,) LPIPS (each image resized to 224 first)."""
        def r224(a):  # per shape (jit caches by shape), then one LPIPS batch
            return self._j("r224", lambda y: resize_bilinear(y[None], (224, 224))[0])(jnp.asarray(a))

        a = jnp.stack([r224(v) for v in x0])
        b = jnp.stack([r224(v) for v in x1])
        return np.asarray(self.lpips_fn()(self.lpips.params, a, b))

    def clip_batch(self, x0: list[np.ndarray], x1: list[np.ndarray]) -> np.ndarray:
        """CLIP-preprocessed (224, 224, 3) lists → (B,) cosine of the image embeddings."""
        return np.asarray(self.clip_fn()(self.clip.params, jnp.asarray(np.stack(x0)),
                                         jnp.asarray(np.stack(x1))))

    def prompt_embeddings(self, prompts: list[str]) -> jax.Array:
        return self.text_fn()(self.dift.text_encoder.params, jnp.asarray(self.dift.tokenizer.ids(prompts)))

    def dift_batch(self, images: np.ndarray, context: jax.Array, keys: jax.Array,
                   s: EvalSettings) -> jax.Array:
        """(B, H, W, 3) [-1, 1] images of one size, (B, S, D) prompt embeddings, (B,) keys →
        (B, h', w', C) DIFT features."""
        d = self.dift
        return self.dift_fn(s)(d.unet.params, d.vae.params, jnp.asarray(images), context, keys)


def sample_key(seed: int, name: str, which: int) -> jax.Array:
    """The noise key of one image of a sample (which: 0 source, 1 result)."""
    k = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(k, which)


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


def _stored(path: Path, s: EvalSettings) -> dict:
    """The metrics of an existing sample file still valid for ``s`` ({} if none)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    keep = {}
    for m in s.metrics:
        if m in rec.get("metrics", {}) and rec.get("settings", {}).get(m) == s.key(m):
            keep[m] = rec["metrics"][m]
            if m == "md" and "md_matched" in rec.get("metrics", {}):
                keep["md_matched"] = rec["metrics"]["md_matched"]
    return keep


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
            flag = {"lpips": "--lpips", "clip": "--clip", "md": "--dift"}[m]
            raise SettingsError(f"metric {m!r} needs its network's weights ({flag} PATH)")
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
        have = _stored(out / "samples" / f"{smp.name}.json", s)
        missing = [m for m in s.metrics if m not in have]
        if missing:
            todo.append((smp, have, missing))
    bar = tqdm(total=len(todo), desc="eval", unit="sample", disable=not progress)
    for start in range(0, len(todo), s.batch_size):
        batch = []
        for smp, have, missing in todo[start:start + s.batch_size]:
            try:
                it = load_item(smp, results)
            except (EvalInputError, RequestError) as e:
                skipped[smp.name] = str(e)
                bar.update(1)
                continue
            it.todo, it.out = missing, dict(have)
            batch.append(it)
        if not batch:
            continue
        _compute(batch, nets, s)
        for it in batch:
            rec = {"name": it.name, "category": it.category, "result": str(it.result_path),
                   "pairs": len(it.handles), "prompt": it.prompt,
                   "metrics": {k: v for k, v in it.out.items() if k != "dai_error"},
                   "settings": {m: s.key(m) for m in s.metrics}}
            if "dai_error" in it.out:
                rec["errors"] = {"dai": it.out["dai_error"]}
            write_json(out / "samples" / f"{it.name}.json", rec)
            bar.update(1)
    bar.close()
    summary = summarize(out, [x.name for x in samples], s, skipped)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary))
    return summary


def _aggregate(recs: list[dict], s: EvalSettings) -> dict:
    agg: dict = {"samples": len(recs)}
    vals = lambda m: [r["metrics"][m] for r in recs if m in r["metrics"]]  # noqa: E731
    if "lpips" in s.metrics and vals("lpips"):
        agg["lpips"] = float(np.mean(vals("lpips")))
        agg["image_fidelity"] = 1.0 - agg["lpips"]
    if "clip" in s.metrics and vals("clip"):
        agg["clip"] = float(np.mean(vals("clip")))
    if "md" in s.metrics and vals("md"):
        dists = [d for v in vals("md") for d in v]
        agg["md"] = float(np.mean(dists))
        agg["pairs"] = len(dists)
        if "lpips" in agg:
            agg["lpips_x_md"] = agg["lpips"] * agg["md"]
    if "dai" in s.metrics and vals("dai"):
        agg["dai"] = {str(g): float(np.mean([v[str(g)] for v in vals("dai")])) for g in s.gammas}
    return agg


def summarize(out: Path, names: list[str], s: EvalSettings, skipped: dict[str, str]) -> dict:
    recs = []
    for n in names:
        p = out / "samples" / f"{n}.json"
        if n not in skipped and p.exists():
            recs.append(json.loads(p.read_text()))
    cats = sorted({r["category"] for r in recs if r["category"]})
    return {"settings": asdict(s), "overall": _aggregate(recs, s),
            "categories": {c: _aggregate([r for r in recs if r["category"] == c], s) for c in cats},
            "skipped": skipped}


def markdown(summary: dict) -> str:
    """The summary as Markdown tables (overall first, then per category)."""
    s = summary["settings"]
    cols = [("samples", "samples", "{:d}")]
    if "lpips" in s["metrics"]:
        cols += [("lpips", "LPIPS ↓", "{:.4f}"), ("image_fidelity", "1−LPIPS ↑", "{:.4f}")]
    if "md" in s["metrics"]:
        cols += [("md", "MD ↓", "{:.2f}"), ("pairs", "pairs", "{:d}")]
        if "lpips" in s["metrics"]:
            cols += [("lpips_x_md", "LPIPS×MD ↓", "{:.3f}")]
    if "clip" in s["metrics"]:
        cols += [("clip", "CLIP sim ↑", "{:.4f}")]
    dai_cols = [str(g) for g in s["gammas"]] if "dai" in s["metrics"] else []
    head = ["", *[c[1] for c in cols], *[f"DAI γ={g} ↓" for g in dai_cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, agg):
        cells = [name]
        for key, _, fmt in cols:
            cells.append(fmt.format(agg[key]) if key in agg else "–")
        for g in dai_cols:
            cells.append(f"{agg['dai'][g]:.4f}" if "dai" in agg else "–")
        return "| " + " | ".join(cells) + " |"

    lines.append(row("**all**", summary["overall"]))
    for c, agg in summary["categories"].items():
        lines.append(row(c, agg))
    text = "\n".join(lines) + "\n"
    if summary["skipped"]:
        text += f"\nSkipped {len(summary['skipped'])} sample(s):\n\n"
        text += "\n".join(f"- {n}: {why}" for n, why in sorted(summary["skipped"].items())) + "\n"
    if "md" in s["metrics"]:
        text += (f"\nMD: DIFT at t = {s['t']}, up_blocks[{s['up_index']}], ensemble {s['ensemble']}, "
                 f"seed {s['seed']}; mean over pairs.")
    if "dai" in s["metrics"]:
        text += f" DAI: {'÷N² (reference code)' if s['dai_double_n'] else '÷N (paper)'}."
    return text + "\n"
