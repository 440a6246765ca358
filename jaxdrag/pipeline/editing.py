"""Edit orchestration (ALGORITHMS.md §1): requests checked and prepared, grouped by working shape
into vmapped batches of fixed sizes, batch sizes planned from measured memory, programs compiled
ahead in threads, each batch run by ``group.run_group`` (``edit_batch``, ``edit``, ``compile_for``,
``plan_batch``)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np

from ..drag import DragConfig
from . import group
from .networks import Pipeline
from .settings import EditSettings


def pow2_bucket(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1): batch and handle-slot buckets."""
    return 1 << max(0, int(n) - 1).bit_length()


def plan_batch(pipe: Pipeline, p, settings: EditSettings, cfg: DragConfig, hypers: dict,
               n_pairs: int, canvas=None) -> tuple[int, dict]:
    """The largest batch of edits shaped like ``p`` that fits every stage in memory.

    Every stage is compiled at batch 1 (per device) and XLA's ``memory_analysis`` of it split
    into the shared weights and the per-edit rest (arguments, outputs, temporaries); then
    batch = ⌊(fraction · device memory − weights) / per-edit⌋ for the most demanding stage,
    assuming the per-edit part grows linearly with the batch (vmapped stages). Returns (batch
    per device ≥ 1, {stage: {"shared", "edit"} bytes})."""
    settings = settings.for_method(settings.method)  # fields left None: the method's defaults
    probe = pipe.measuring()  # one device's programs, measured, not run; ``pipe`` unchanged
    group.run_group(probe, [p], replace(settings, batch_size=1), cfg, [hypers], False, batch=1, n_pairs=n_pairs,
                    canvas=canvas)
    measured = dict(probe.stages.measured)
    budget = settings.memory_fraction * pipe.device_memory()
    weights = pipe.weight_bytes()  # resident once, whatever the batch
    per_edit = max(max(m["edit"] for m in measured.values()), 1)
    return max(1, int((budget - weights) // per_edit)), measured


def bucket_step(pipe: Pipeline) -> int:
    """Pixels per side of a canvas step: the VAE's factor × the UNet's 2^levels (64 for SD-1.5)."""
    return (1 << pipe.vae_levels()) * (1 << pipe.unet_levels())


def _canvases(pipe: Pipeline, prepared: list, settings: EditSettings) -> list:
    """Each edit's ``group.Canvas`` under ``settings.buckets`` ("exact": None for all). The LoRA
    canvas of a bucket is its edits' largest LoRA image, rounded up to the step."""
    if settings.buckets == "exact":
        return [None] * len(prepared)
    from .buckets import plan_buckets, round_up

    step = bucket_step(pipe)
    if settings.buckets == "fixed":  # each size rounded up, nothing merged
        return [group.Canvas((round_up(p.image.shape[0], step), round_up(p.image.shape[1], step)),
                             (round_up(p.lora_image.shape[0], step), round_up(p.lora_image.shape[1], step)))
                for p in prepared]
    plan = plan_buckets([p.image.shape[:2] for p in prepared], step=step, max_waste=settings.bucket_waste,
                        max_buckets=settings.max_buckets)
    lora: dict = {}
    for p in prepared:
        c = plan.canvas(p.image.shape[:2])
        h, w = lora.get(c, (0, 0))
        lora[c] = (max(h, round_up(p.lora_image.shape[0], step)), max(w, round_up(p.lora_image.shape[1], step)))
    return [group.Canvas(plan.canvas(p.image.shape[:2]), lora[plan.canvas(p.image.shape[:2])]) for p in prepared]


def _batch_plans(pipe: Pipeline, prepared: list, settings: EditSettings, cfg: DragConfig, hyp: dict) -> list:
    """The batches of a run: [(indices of the group, batch size b, handle slots, canvas)] per
    group, in run order. Edits group by working shape — or by bucket (``settings.buckets``) —
    and a generation's guidance; each group runs as batches of one size b = min(batch_size, the
    group's size rounded up to a power of two), handle slots = the group's largest count rounded
    up to a power of two."""
    from .. import data as io

    canvases = _canvases(pipe, prepared, settings)
    groups: dict = {}
    for i, p in enumerate(prepared):
        g = p.request.generation
        gen_key = None if g is None else (g.guidance_scale, g.negative_prompt)
        shape = io.bucket_key(p) if canvases[i] is None else ("canvas",) + tuple(canvases[i])
        groups.setdefault((shape, gen_key), []).append(i)
    plans = []
    for key in sorted(groups, key=lambda k: (k[0], repr(k[1]))):
        idx = groups[key]
        n_pairs = pow2_bucket(max(len(prepared[i].handles) for i in idx))
        limit = settings.batch_size
        if limit == "auto":
            per_device, _ = plan_batch(pipe, prepared[idx[0]], settings, cfg, hyp, n_pairs, canvases[idx[0]])
            limit = per_device * pipe.n_devices
        b = min(limit, pow2_bucket(len(idx)))
        b = -(-b // pipe.n_devices) * pipe.n_devices  # an equal share for every device
        canvas = canvases[idx[0]]
        if settings.buckets == "auto" and len({(prepared[i].image.shape[:2], prepared[i].lora_image.shape[:2])
                                               for i in idx}) == 1:
            canvas = None  # one shape in the bucket: no padding needed, the per-shape programs bit for bit
        plans.append((idx, b, n_pairs, canvas))
    return plans


def _edit_hypers(prepared: list, chunk: list[int], hyp: dict) -> list[dict]:
    """Each edit's continuous settings: the method's, overridden by the request's own."""
    return [{**hyp, **{k: float(v) for k, v in prepared[i].request.hypers.items()}} for i in chunk]


def _compile_group(pipe: Pipeline, prepared: list, plan: tuple, settings: EditSettings, cfg: DragConfig,
                   hyp: dict, progress) -> None:
    """Compile every program one batch of ``plan`` needs, without running it: the batch walked
    through a compiling view of ``pipe`` (outputs are zeros of the right shapes). The programs
    land in ``pipe``'s cache (and the persistent cache when it is on)."""
    idx, b, n_pairs, canvas = plan
    chunk = idx[:b]
    silent = (lambda *a: None) if progress else False  # the same programs as a run with progress
    group.run_group(pipe.measuring(one_device=False), [prepared[i] for i in chunk], settings, cfg,
                    _edit_hypers(prepared, chunk, hyp), silent, batch=b, n_pairs=n_pairs, canvas=canvas)


def _prepare_requests(pipe: Pipeline, requests: Sequence, method: str, settings: EditSettings | None,
                      overrides: dict) -> tuple:
    """Checks and prepares the requests of a run: (cfg, continuous settings, settings, prepared
    edits). Raises RequestError naming the first bad request."""
    from .. import data as io
    from ..drag.methods import HYPER_KEYS, check_hypers, resolve, valid_settings
    from ..errors import SettingsError

    cfg, hyp = resolve(method, **overrides)
    settings = (settings or EditSettings()).for_method(method)
    if cfg.use_clip:
        pipe.require_clip()
    native = pipe.native_width
    width = native if settings.width is None else (settings.width or None)
    for i, r in enumerate(requests):  # every request's type and hyperparameters before any work
        if not isinstance(r, io.EditRequest):
            raise io.RequestError(f"request {i}: expected an EditRequest, got {type(r).__name__}")
        if not isinstance(r.hypers, dict):
            raise io.RequestError(f"{r.name}: hypers must be a dict of hyperparameters, got {type(r.hypers).__name__}")
        usable = [k for k in valid_settings(method) if k in HYPER_KEYS]
        bad = [k for k in r.hypers if k not in usable]
        if bad:
            raise io.RequestError(f"{r.name}: hyperparameter(s) {bad} not used by method {method!r}; "
                                  f"valid: {', '.join(usable)}")
        try:
            check_hypers(r.hypers)
        except SettingsError as e:
            raise io.RequestError(f"{r.name}: {e}") from None
    requests, latents = _generate_images(pipe, requests, settings)
    prepared = []
    for r, z_start in zip(requests, latents):
        if z_start is None:
            prepared.append(io.prepare(r, width, native))
        else:  # the generation's own size and latent at t*
            prepared.append(replace(io.prepare(r, None, native), z_start=z_start))
    return cfg, hyp, settings, prepared


def edit_batch(pipe: Pipeline, requests: Sequence, method: str = "dragtext", *,
               settings: EditSettings | None = None, progress: bool | Callable[[str, int, int], None] = False,
               on_result: Callable[[int, Any], None] | None = None,
               on_error: Callable[[list[int], Exception], None] | None = None, compile_workers: int = 0,
               **overrides) -> list:
    """Run many edits: requests are grouped by working shape and each group runs as vmapped
    batches of one fixed size, b = min(``settings.batch_size``, the group's size rounded up to
    a power of two), the last one padded with dummy edits, and the handle slots padded to the
    group's largest count rounded up to a power of two — so each stage compiles at most once per
    working shape. Between groups, compiled programs are released once more than
    ``pipe.max_live_programs`` are held (a run of any length keeps bounded memory).

    ``compile_workers`` > 0: the programs of the next groups are compiled ahead in that many
    threads while the current group runs (XLA compiles without the GIL); the results are the
    same as without.

    ``progress``: True shows tqdm bars; a callable gets ``(stage, done, total)`` for the stages
    "lora", "drag" (latent updates) and "denoise" of each batch (a UI's progress bar).

    Returns ``EditResult``s in request order. ``on_result(i, result)`` is called as each batch
    finishes (write results as they come); with ``on_error(indices, exception)`` a batch that
    raises is reported there and the others still run (its results stay None). ``overrides``:
    drag settings (``methods.resolve`` names, e.g. ``max_iters=40``, ``latent_lr=0.02``); a
    request's own ``hypers`` override the continuous ones for that edit. Raises RequestError
    naming the first bad request."""
    from concurrent.futures import ThreadPoolExecutor

    cfg, hyp, settings, prepared = _prepare_requests(pipe, requests, method, settings, overrides)
    plans = _batch_plans(pipe, prepared, settings, cfg, hyp)
    results: list = [None] * len(prepared)
    pool = ThreadPoolExecutor(compile_workers, thread_name_prefix="compile") if compile_workers > 0 else None
    ahead: dict[int, Any] = {}

    def submit_ahead(g: int) -> None:  # groups g .. g + workers compiling (or compiled)
        for k in range(g, min(g + compile_workers, len(plans))):
            if k not in ahead:
                ahead[k] = pool.submit(_compile_group, pipe, prepared, plans[k], settings, cfg, hyp, progress)
    try:
        for g, (idx, b, n_pairs, canvas) in enumerate(plans):
            if pool is not None:
                submit_ahead(g + 1)  # this group's own programs: compiled here if not ahead
            for s in range(0, len(idx), b):
                chunk = idx[s:s + b]
                try:
                    outs = group.run_group(pipe, [prepared[i] for i in chunk], settings, cfg,
                                           _edit_hypers(prepared, chunk, hyp), progress, batch=b, n_pairs=n_pairs,
                                           canvas=canvas)
                except Exception as e:  # noqa: BLE001 - reported per batch when the caller asks
                    if on_error is None:
                        raise
                    on_error(chunk, e)
                    continue
                for i, o in zip(chunk, outs):
                    results[i] = o
                    if on_result is not None:
                        on_result(i, o)
            if pipe.stages.live > pipe.max_live_programs:
                if pool is not None:  # what is compiling ahead lands before the release
                    for k in list(ahead):
                        ahead[k].exception()
                pipe.release_compiled()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return results


def compile_for(pipe: Pipeline, requests: Sequence, method: str = "dragtext", *,
                settings: EditSettings | None = None, workers: int = 2, progress: bool = False,
                **overrides) -> dict:
    """Compile every program that ``edit_batch`` would need for these requests, in ``workers``
    threads, without running any edit (with the persistent compilation cache on, a later run —
    in any process — loads them instead of compiling). Returns {"groups", "programs" (compiled
    now), "compile_s" (summed over programs), "wall_s", "failed": {group index: error}}.
    ``progress``: compile the programs of a run that shows progress (they differ)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    n0, s0 = sum(pipe.stages.compiles.values()), sum(pipe.stages.compile_s.values())
    cfg, hyp, settings, prepared = _prepare_requests(pipe, requests, method, settings, overrides)
    plans = _batch_plans(pipe, prepared, settings, cfg, hyp)
    failed = {}
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="compile") as pool:
        futures = [pool.submit(_compile_group, pipe, prepared, plan, settings, cfg, hyp, progress)
                   for plan in plans]
        for g, f in enumerate(futures):
            if f.exception() is not None:
                failed[g] = f"{type(f.exception()).__name__}: {f.exception()}"
            if pipe.stages.live > pipe.max_live_programs:  # bounded memory over a whole dataset
                pipe.stages.clear()
    return {"groups": len(plans), "programs": sum(pipe.stages.compiles.values()) - n0,
            "compile_s": round(sum(pipe.stages.compile_s.values()) - s0, 2),
            "wall_s": round(time.perf_counter() - t0, 2), "failed": failed}


def _generate_images(pipe: Pipeline, requests: Sequence, settings: EditSettings) -> tuple[list, list]:
    """Fill in the image of every request with a ``generation`` (its spec checked first): one
    batched DDIM sampling per (size, guidance, negative prompt). Returns (requests, the latent at
    t* of each generated request, None for the others)."""
    from .. import data as io

    out, latents, todo = list(requests), [None] * len(requests), {}
    for i, r in enumerate(requests):
        if r.generation is None:
            continue
        name = r.name if isinstance(r.name, str) else repr(r.name)
        if not isinstance(r.generation, io.Generation):
            raise io.RequestError(f"{name}: generation must be a jaxdrag.Generation, got {type(r.generation).__name__}")
        g = r.generation.check(name)
        if not isinstance(r.prompt, str) or not r.prompt.strip():
            raise io.RequestError(f"{name}: a generated image needs its prompt")
        todo.setdefault((g.size(pipe.native_width), g.guidance_scale, g.negative_prompt), []).append(i)
    k = pipe.schedule.start_index(settings.inversion_strength)  # the steps taken before t*
    for (hw, scale, negative), idx in todo.items():
        images, _, z_k = pipe.generate([requests[i].prompt for i in idx], seed=[requests[i].generation.seed for i in idx],
                                       guidance_scale=scale, negative_prompt=negative, hw=hw, stop_at=k)
        for j, i in enumerate(idx):
            out[i] = replace(requests[i], image=np.asarray(images[j]))
            latents[i] = np.asarray(z_k[j])
    return out, latents


def edit(pipe: Pipeline, image, points, prompt: str = "", mask=None, method: str = "dragtext", *,
         edit_prompt: str | None = None, seed: int = 0, settings: EditSettings | None = None,
         progress: bool = False, generation=None, **overrides):
    """Edit one image: ``points`` = [(x, y), …] pixels alternating handle, target (DragBench's
    convention); ``mask`` (H, W) nonzero = editable. Returns an ``EditResult`` with the edited
    image (H, W, 3) uint8, final handles, trajectory, iteration count and timings.
    ``generation`` (a ``Generation``; ``image`` None): drag on the image generated from ``prompt``."""
    from ..data import EditRequest

    req = EditRequest(image=None if image is None else np.asarray(image), points=points, prompt=prompt, mask=mask,
                      edit_prompt=edit_prompt, seed=seed, generation=generation)
    return edit_batch(pipe, [req], method, settings=settings, progress=progress, **overrides)[0]
