"""Edit orchestration (ALGORITHMS.md §1): requests grouped by working shape into vmapped
batches, LoRA → inversion → drag loop → denoise → decode per batch, and the results assembled
(``edit_batch``, ``edit``, ``EditSettings``, ``plan_batch``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..drag import DragConfig, DragHypers
from ..drag.hosts import host as drag_host
from ..drag.hosts import reached as drag_reached
from ..drag.hosts import update_budget
from ..models.lora import zeros_lora

from .lora import LoRASettings, check_remat
from .networks import Pipeline
from .stages import Bar


@dataclass(frozen=True)
class EditSettings:
    """Pipeline-level settings of an edit (the drag loop's are the method preset + overrides).

    width: working width (None: the model's native width, 512 for SD-1.5 — the reference UI's
    resize; 0: keep the input size). inversion_strength: None = the method's (0.7 → 35 DDIM
    steps, t* = 681; GoodDrag 0.75 → t* = 741). ``lora`` fields left None are the method's too.
    reference_attention: mutual self-attention in the final denoise (MasaCtrl, on by default;
    DragNoise never uses it).
    clip_double_unit_map: reproduce CLIPDrag's double [0, 1] mapping of the CLIP input (QUIRK).
    remat: the drag step's rematerialisation policy ("off" | "blocks" | "dots"; LoRA training
    has its own, ``lora.remat``). batch_size: edits per vmapped batch, or "auto": the largest
    batch whose every stage fits ``memory_fraction`` of a device's memory (``plan_batch``).
    interpolation: DragText §6's α values (e.g. (0, 0.25, 0.5, 0.75, 1, 1.25, 1.5)): each result
    also holds the images of (z*, c) → (ẑ, ĉ) interpolated linearly (``EditResult.interpolation``),
    denoised like the edit in batches of its size.
    """

    method: str = "dragtext"
    width: int | None = None
    inversion_strength: float | None = None
    lora: LoRASettings = LoRASettings()
    reference_attention: bool = True
    clip_double_unit_map: bool = False
    batch_size: int | str = 8
    remat: str = "off"
    memory_fraction: float = 0.85  # of each device's memory that ``batch_size="auto"`` plans to use
    interpolation: tuple[float, ...] = ()

    def __post_init__(self):
        from ..errors import SettingsError, check_number

        if isinstance(self.interpolation, (str, bytes)) or not hasattr(self.interpolation, "__iter__"):
            raise SettingsError(f"setting interpolation = {self.interpolation!r}: must be a list of α values")
        object.__setattr__(self, "interpolation", tuple(check_number("interpolation", a) for a in self.interpolation))

        object.__setattr__(self, "remat", check_remat("remat", self.remat))

        if self.inversion_strength is not None:
            s = check_number("inversion_strength", self.inversion_strength, low=0.0, high=1.0, low_open=True)
            if round(s * 50) < 1:
                raise SettingsError(f"setting inversion_strength = {s!r}: must give at least one of the 50 "
                                    f"DDIM steps (≥ 0.01)")
            object.__setattr__(self, "inversion_strength", s)
        if self.width is not None:
            w = check_number("width", self.width, nonnegative=True, integer=True)
            if 0 < w < 16:
                raise SettingsError(f"setting width = {w}: must be 0 (keep the input size) or ≥ 16")
            object.__setattr__(self, "width", w)
        object.__setattr__(self, "memory_fraction", check_number("memory_fraction", self.memory_fraction,
                                                                 low=0.0, high=1.0, low_open=True))
        if self.batch_size != "auto":
            object.__setattr__(self, "batch_size", check_number("batch_size", self.batch_size, positive=True,
                                                                integer=True))

    def for_method(self, method: str) -> "EditSettings":
        """These settings with every field left None filled from ``method``'s defaults."""
        from ..drag.methods import pipeline_defaults

        d = pipeline_defaults(method)
        lora = replace(self.lora, steps=d["lora_steps"] if self.lora.steps is None else self.lora.steps,
                       lr=d["lora_lr"] if self.lora.lr is None else self.lora.lr)
        inv = d["inversion_strength"] if self.inversion_strength is None else self.inversion_strength
        return replace(self, method=method, lora=lora, inversion_strength=inv)


def _pad_points(arrs: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(arrs), n, 2), np.float32)
    mask = np.zeros((len(arrs), n), bool)
    for i, a in enumerate(arrs):
        out[i, :len(a)] = a
        mask[i, :len(a)] = True
    return out, mask


def _lora_key(p, lora: LoRASettings) -> tuple:
    """What determines an edit's LoRA: its training image, prompt, seed and the LoRA settings."""
    import hashlib

    digest = hashlib.sha1(np.ascontiguousarray(p.lora_image).tobytes()).hexdigest()
    return (digest, p.lora_image.shape, p.request.prompt, int(p.request.seed), lora)


def pow2_bucket(n: int) -> int:
    """The smallest power of two ≥ n (n ≥ 1): batch and handle-slot buckets."""
    return 1 << max(0, int(n) - 1).bit_length()


def _dummy(p):
    """A padding edit: the image of ``p`` with no handles (done before its first update)."""
    none = np.zeros((0, 2), np.float32)
    return replace(p, handles=none, targets=none)


def _edit_loras(pipe: Pipeline, group: list, settings: EditSettings, reqs: list, c0, b: int, n_real: int,
                progress, timed, timings: dict):
    """The batch's per-edit LoRAs (B, …) and training losses (steps, B): from the cache when
    every edit's LoRA is there, else trained (and cached)."""
    bar = Bar(progress, "lora", settings.lora.steps, f"LoRA ×{b}")
    keys = jnp.stack([jax.random.PRNGKey(r.seed) for r in reqs])
    lora_imgs = jnp.asarray(np.stack([p.lora_image for p in group]))
    cache_keys = [_lora_key(p, settings.lora) for p in group[:n_real]]
    cache_keys += cache_keys[:1] * (b - n_real)  # a dummy is a copy of the first edit
    cache = pipe.lora_cache  # None when off, and in plan_batch's measuring view (it measures LoRA too)
    if cache is not None and all(k in cache for k in cache_keys):
        loras = jax.tree.map(lambda *xs: jnp.stack(xs), *[cache[k][0] for k in cache_keys])
        lora_losses = jnp.stack([cache[k][1] for k in cache_keys], axis=1)
        timings["lora"] = 0.0
        bar.set(settings.lora.steps)
    elif cache is None:
        loras, lora_losses = timed("lora", pipe.train_lora, lora_imgs, c0, keys, settings.lora, bar.update)
        pipe.loras_trained += n_real
    else:
        # each missing LoRA trained once, however many edits of the batch share it (a sweep's grid
        # points): the batch's rows are its distinct missing edits, padded to b with the first
        missing = list(dict.fromkeys(k for k in cache_keys[:n_real] if k not in cache))
        rows = [cache_keys.index(k) for k in missing]
        rows = np.asarray(rows + rows[:1] * (b - len(rows)))
        trained, losses = timed("lora", pipe.train_lora, lora_imgs[rows], c0[rows], keys[rows], settings.lora,
                                bar.update)
        for j, k in enumerate(missing):
            cache[k] = (jax.tree.map(lambda x: x[j], trained), losses[:, j])
        pipe.loras_trained += len(missing)
        loras = jax.tree.map(lambda *xs: jnp.stack(xs), *[cache[k][0] for k in cache_keys])
        lora_losses = jnp.stack([cache[k][1] for k in cache_keys], axis=1)
    bar.close()
    return loras, lora_losses


def _run_group(pipe: Pipeline, group: list, settings: EditSettings, cfg: DragConfig,
               hypers: list[dict], progress, batch: int | None = None,
               n_pairs: int | None = None) -> list:
    """Run one batch of prepared edits of a common working shape through every stage.

    Shapes are fixed so one program per stage serves a whole shape group: the batch is padded
    to ``batch`` with handle-less copies of the first edit (they finish before their first
    update; their results are dropped) and the handle slots to ``n_pairs`` (masked)."""
    from .assemble import edit_results

    n_real = len(group)
    batch = max(batch or n_real, n_real)
    group = list(group) + [_dummy(group[0])] * (batch - n_real)
    hypers = list(hypers) + [hypers[0]] * (batch - n_real)
    timings: dict[str, float] = {}
    pipe.stages.last_compile_s = {}

    def timed(name, fn, *a, **k):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*a, **k))
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    cfg = replace(cfg, sup_hw=group[0].sup_hw)
    c0, token_mask, et = _prompts(pipe, group, cfg, timed)
    start = _start_latents(pipe, group, settings, cfg, c0, n_real, progress, timed, timings)
    t_star = int(pipe.schedule.timesteps[pipe.schedule.start_index(settings.inversion_strength)])
    shared, inputs, state = _drag(pipe, group, settings, cfg, hypers, n_pairs, start, c0, token_mask, et, t_star,
                                  progress, timed)
    images, z_edit, extras = _denoise_all(pipe, group, settings, cfg, start, c0, t_star, shared, inputs, state,
                                          progress, timed)
    return edit_results(group[:n_real], settings, cfg, hypers, t_star, pipe, images, z_edit, extras,
                        jax.tree.map(np.asarray, state), np.asarray(drag_reached(cfg, state)),
                        np.asarray(start["lora_losses"]), len(group),
                        {**timings, **{f"compile_{k}": v for k, v in pipe.stages.last_compile_s.items()}})


def _prompts(pipe: Pipeline, group: list, cfg: DragConfig, timed) -> tuple:
    """The batch's text embeddings c0 (B, T, D), DragText's regularised token positions (B, T)
    and CLIPDrag's edit-prompt embeddings (B, P) (zeros (B, 1) without CLIP)."""
    reqs = [p.request for p in group]
    ids = pipe.tokenizer.ids([r.prompt for r in reqs])
    c0 = timed("text", pipe.encode_text_ids, ids)
    token_mask = (np.arange(ids.shape[1])[None] < pipe.tokenizer.prompt_lengths([r.prompt for r in reqs])[:, None])
    if cfg.use_clip:
        et = timed("clip_text", pipe.clip_text_embeds, [r.edit_prompt or r.prompt for r in reqs])
    else:
        et = jnp.zeros((len(group), 1), jnp.float32)
    return c0, token_mask, et


def _inverted(pipe: Pipeline, group: list, settings: EditSettings, loras, c0, n_real: int, timed,
              timings: dict):
    """The batch's latents at t* (B, h, w, 4): each image encoded and DDIM-inverted with its LoRA
    — or, with the pipeline's cache on, taken from it when every edit's inversion is there (a
    sweep's grid points of one sample in later batches and program groups: an inversion depends on
    the image, its LoRA, the prompt and the strength, not on the drag settings)."""
    import hashlib

    cache = pipe.lora_cache
    keys = [("inversion", _lora_key(p, settings.lora), hashlib.sha1(np.ascontiguousarray(p.image).tobytes()).hexdigest(),
             float(settings.inversion_strength)) for p in group]
    if cache is not None and all(k in cache for k in keys):
        timings["encode"] = timings["invert"] = 0.0
        return jnp.stack([cache[k] for k in keys])
    b = len(group)
    if cache is None:
        rows, missing = np.arange(b), None
    else:
        # each missing inversion run once, however many edits of the batch share it (a sweep's grid
        # points): the batch's rows are its distinct missing edits, padded to b with the first
        missing = list(dict.fromkeys(k for k in keys[:n_real] if k not in cache))
        first = [keys.index(k) for k in missing]
        rows = np.asarray(first + first[:1] * (b - len(first)))
    if cache is not None:
        loras, c0 = jax.tree.map(lambda x: x[rows], loras), c0[rows]
    z0 = timed("encode", pipe.encode_images, jnp.asarray(np.stack([group[i].image for i in rows])))
    zt = timed("invert", pipe.invert, loras, z0, c0, settings.inversion_strength)
    if cache is None:
        pipe.inversions_run += n_real
        return zt
    pipe.inversions_run += len(missing)
    for j, k in enumerate(missing):
        cache[k] = zt[j]
    return jnp.stack([cache[k] for k in keys])


def _start_latents(pipe: Pipeline, group: list, settings: EditSettings, cfg: DragConfig, c0, n_real: int,
                   progress, timed, timings: dict) -> dict:
    """Where the drag starts: {"zt": the latents at t* (B, h, w, 4), "loras", "lora_losses"
    (steps, B), "guide": classifier-free guidance of a generated image or None, "generated"}.
    A real image is encoded, gets its LoRA and is inverted; a generated one starts from its
    saved latent with no LoRA (DragDiffusion's generated-image mode, §2.4)."""
    b = len(group)
    reqs = [p.request for p in group]
    if group[0].z_start is None:
        loras, lora_losses = _edit_loras(pipe, group, settings, reqs, c0, b, n_real, progress, timed, timings)
        return dict(zt=_inverted(pipe, group, settings, loras, c0, n_real, timed, timings), loras=loras,
                    lora_losses=lora_losses, guide=None, generated=False)
    loras = jax.tree.map(lambda x: jnp.broadcast_to(x, (b,) + x.shape), zeros_lora(pipe.sd.unet.lora))
    guide = None
    gen = reqs[0].generation
    if gen.guidance_scale != 1:
        host = drag_host(cfg.host)
        if not host.guided_generation:
            from ..errors import SettingsError
            raise SettingsError("drags on generated images with guidance_scale ≠ 1 are not available for "
                                f"{host.title} (its variable is one UNet row); use guidance_scale 1")
        uncond = timed("text", pipe.encode_text_ids, pipe.tokenizer.ids([gen.negative_prompt]))[0]
        guide = {"uncond": uncond, "scale": jnp.float32(gen.guidance_scale)}
    return dict(zt=jnp.asarray(np.stack([p.z_start for p in group])), loras=loras,
                lora_losses=np.zeros((0, b), np.float32), guide=guide, generated=True)


def _drag(pipe: Pipeline, group: list, settings: EditSettings, cfg: DragConfig, hypers: list[dict],
          n_pairs: int | None, start: dict, c0, token_mask, et, t_star: int, progress, timed) -> tuple:
    """The host's drag over the batch: (shared weights, inputs, final state). Handles and targets
    are padded to the batch's slot count (masked); without a drawn mask the background weight is
    zero (no background term), or one everywhere for hosts whose background is "always"."""
    b = len(group)
    n = max([len(p.handles) for p in group] + [n_pairs or 1])
    h0, mask = _pad_points([p.handles for p in group], n)
    tg, _ = _pad_points([p.targets for p in group], n)
    keep = np.stack([np.ones_like(p.keep) if cfg.background == "always" and not p.masked else p.keep
                     for p in group])
    hyp = DragHypers(*(jnp.asarray([hp[k] for hp in hypers], jnp.float32) for k in DragHypers._fields))
    dbar = Bar(progress, "drag", update_budget(cfg), f"drag ×{b}") if progress else None

    def cb(it, done):
        dbar.set(int(np.max(np.asarray(it))))

    guide = start["guide"]
    prep, loop = pipe.drag_runner(cfg, settings.clip_double_unit_map, progress=dbar is not None,
                                  remat=settings.remat, guided=guide is not None)
    shared = pipe.shared_params(cfg.use_clip, guide)
    args = (shared, start["loras"], start["zt"], c0, jnp.asarray(h0), jnp.asarray(tg), jnp.asarray(mask),
            jnp.asarray(keep), jnp.asarray(token_mask, jnp.float32), et,
            jnp.full((b,), t_star, jnp.int32), hyp)
    inputs, state = timed("drag_prepare", pipe.stages, "drag_prepare", prep, *args)
    if pipe.stages.measured is not None:  # a compiling view: the loop does not run (and the relay,
        # shared with the pipeline, may be serving a real run in another thread)
        return shared, inputs, timed("drag", pipe.stages, "drag", loop, shared, start["loras"], inputs, state)
    pipe.progress_relay.target = cb if dbar is not None else None
    try:
        state = timed("drag", pipe.stages, "drag", loop, shared, start["loras"], inputs, state)
    finally:
        pipe.progress_relay.target = None
    if dbar is not None:
        dbar.close()
    return shared, inputs, state


def _denoise_all(pipe: Pipeline, group: list, settings: EditSettings, cfg: DragConfig, start: dict, c0,
                 t_star: int, shared, inputs, state, progress, timed) -> tuple:
    """The edited images (B, H, W, 3) uint8 at the working size, the final latents, and the extra
    images {(kind, value): (images, finite (B,))} (interpolation, snapshots), each denoised like
    the edit."""
    b = len(group)
    loras, zt = start["loras"], start["zt"]
    denoising = Bar(progress, "denoise", 1 + len(settings.interpolation) + len(cfg.snapshots), f"denoise ×{b}")
    plan = _denoise_plan(pipe, cfg, settings, zt, c0, inputs, state)
    guide = start["guide"]
    if guide is not None:
        plan.update(uncond=jnp.broadcast_to(guide["uncond"], c0.shape), scale=jnp.full((b,), guide["scale"]))
    z_edit = timed("denoise", pipe.denoise, loras, **plan)
    work_hw = group[0].image.shape[:2]
    out = np.asarray(timed("decode", pipe.decode_to_uint8, z_edit, work_hw))
    denoising.update(1)
    extras = {}
    for kind, value, variant in _extra_denoise_plans(pipe, cfg, settings, plan, shared, loras, zt, c0, t_star,
                                                     state):
        z_x = timed("denoise_extra", pipe.denoise, loras, **variant)
        extras[(kind, value)] = np.asarray(timed("decode_extra", pipe.decode_to_uint8, z_x, work_hw)), \
            np.isfinite(np.asarray(z_x)).reshape(b, -1).all(axis=1)
        denoising.update(1)
    denoising.close()
    return out, np.asarray(z_edit), extras


def _denoise_plan(pipe: Pipeline, cfg: DragConfig, settings: EditSettings, zt, c0, inputs, state) -> dict:
    """The keyword arguments of ``pipe.denoise`` (all but the LoRAs) for the denoising after the
    drag: the host's plan (``Host.denoise_plan``)."""
    return drag_host(cfg.host).denoise_plan(cfg, zt, c0, inputs, state, strength=settings.inversion_strength,
                                            reference=settings.reference_attention,
                                            steps=pipe.schedule.num_inference_steps)


def _lerp(a, b, alpha: float):
    """(1 − α)·a + α·b: exactly a at α = 0 and b at α = 1."""
    return (1.0 - alpha) * a + alpha * b


def _extra_denoise_plans(pipe: Pipeline, cfg: DragConfig, settings: EditSettings, plan: dict, shared, loras, zt,
                         c0, t_star: int, state):
    """(kind, value, denoise kwargs) of the extra images of the batch, each denoised like the
    edit (the same program: same batch, same static settings):

    ("alpha", α) — DragText §6: the optimised variable and the text embedding both interpolated
    linearly between their values before the drag (z* or GoodDrag's source latent at its stop
    step, DragNoise's bottleneck at (z*, c); c) and after it (ẑ, ĉ); α = 0 is the reconstruction
    (what a drag that moves nothing gives), α = 1 the edit, α > 1 extrapolates.
    ("iters", cap) — the snapshot of (z, ĉ) at an iteration cap (``cfg.snapshots``)."""
    host = drag_host(cfg.host)
    var = host.variable
    if settings.interpolation:
        start = plan["z_src"]
        if host.variable_start is not None:  # e.g. DragNoise's bottleneck at (z*, c)
            nets = pipe.drag_networks(settings.clip_double_unit_map, settings.remat)
            fn = pipe.jitted(f"variable_start_{host.name}_{settings.remat}_{settings.clip_double_unit_map}",
                         jax.vmap(lambda *a: host.variable_start(nets, *a), in_axes=(None, 0, 0, 0, None)))
            start = fn(shared, loras, zt, c0, jnp.int32(t_star))
        for a in settings.interpolation:
            yield "alpha", a, {**plan, var: _lerp(start, plan[var], a), "c_edit": _lerp(plan["c_src"], plan["c_edit"], a)}
    for s, cap in enumerate(cfg.snapshots):
        yield "iters", cap, {**plan, var: state.snap_z[:, s], "c_edit": state.snap_c[:, s]}


def plan_batch(pipe: Pipeline, p, settings: EditSettings, cfg: DragConfig, hypers: dict,
               n_pairs: int) -> tuple[int, dict]:
    """The largest batch of edits shaped like ``p`` that fits every stage in memory.

    Every stage is compiled at batch 1 (per device) and XLA's ``memory_analysis`` of it split
    into the shared weights and the per-edit rest (arguments, outputs, temporaries); then
    batch = ⌊(fraction · device memory − weights) / per-edit⌋ for the most demanding stage,
    assuming the per-edit part grows linearly with the batch (vmapped stages). Returns (batch
    per device ≥ 1, {stage: {"shared", "edit"} bytes})."""
    settings = settings.for_method(settings.method)  # fields left None: the method's defaults
    probe = pipe.measuring()  # one device's programs, measured, not run; ``pipe`` unchanged
    _run_group(probe, [p], replace(settings, batch_size=1), cfg, [hypers], False, batch=1, n_pairs=n_pairs)
    measured = dict(probe.stages.measured)
    budget = settings.memory_fraction * pipe.device_memory()
    weights = pipe.weight_bytes()  # resident once, whatever the batch
    per_edit = max(max(m["edit"] for m in measured.values()), 1)
    return max(1, int((budget - weights) // per_edit)), measured


def _batch_plans(pipe: Pipeline, prepared: list, settings: EditSettings, cfg: DragConfig, hyp: dict) -> list:
    """The batches of a run: [(indices of the group, batch size b, handle slots)] per shape
    group, in run order. Edits group by working shape (and a generation's guidance); each group
    runs as batches of one size b = min(batch_size, the group's size rounded up to a power of
    two), handle slots = the group's largest count rounded up to a power of two."""
    from .. import data as io

    groups: dict = {}
    for i, p in enumerate(prepared):
        g = p.request.generation
        gen_key = None if g is None else (g.guidance_scale, g.negative_prompt)
        groups.setdefault((io.bucket_key(p), gen_key), []).append(i)
    plans = []
    for key in sorted(groups, key=lambda k: (k[0], repr(k[1]))):
        idx = groups[key]
        n_pairs = pow2_bucket(max(len(prepared[i].handles) for i in idx))
        limit = settings.batch_size
        if limit == "auto":
            per_device, _ = plan_batch(pipe, prepared[idx[0]], settings, cfg, hyp, n_pairs)
            limit = per_device * pipe.n_devices
        b = min(limit, pow2_bucket(len(idx)))
        b = -(-b // pipe.n_devices) * pipe.n_devices  # an equal share for every device
        plans.append((idx, b, n_pairs))
    return plans


def _edit_hypers(prepared: list, chunk: list[int], hyp: dict) -> list[dict]:
    """Each edit's continuous settings: the method's, overridden by the request's own."""
    return [{**hyp, **{k: float(v) for k, v in prepared[i].request.hypers.items()}} for i in chunk]


def _compile_group(pipe: Pipeline, prepared: list, plan: tuple, settings: EditSettings, cfg: DragConfig,
                   hyp: dict, progress) -> None:
    """Compile every program one batch of ``plan`` needs, without running it: the batch walked
    through a compiling view of ``pipe`` (outputs are zeros of the right shapes). The programs
    land in ``pipe``'s cache (and the persistent cache when it is on)."""
    idx, b, n_pairs = plan
    chunk = idx[:b]
    silent = (lambda *a: None) if progress else False  # the same programs as a run with progress
    _run_group(pipe.measuring(one_device=False), [prepared[i] for i in chunk], settings, cfg,
               _edit_hypers(prepared, chunk, hyp), silent, batch=b, n_pairs=n_pairs)


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
        for g, (idx, b, n_pairs) in enumerate(plans):
            if pool is not None:
                submit_ahead(g + 1)  # this group's own programs: compiled here if not ahead
            for s in range(0, len(idx), b):
                chunk = idx[s:s + b]
                try:
                    outs = _run_group(pipe, [prepared[i] for i in chunk], settings, cfg,
                                      _edit_hypers(prepared, chunk, hyp), progress, batch=b, n_pairs=n_pairs)
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
