"""One batch of prepared edits of one working shape through every stage (ALGORITHMS.md §1): the
per-edit LoRAs (cached and shared), the prompts, DDIM inversion (cached and shared), the drag loop of
the method's host, the denoising of the pair and the extra images (interpolation, snapshots), and
the assembly of one result per edit. ``editing`` groups and schedules the batches."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..drag import DragConfig, DragHypers
from ..drag.hosts import host as drag_host
from ..drag.hosts import reached as drag_reached
from ..drag.hosts import update_budget
from ..models.lora import zeros_lora
from .lora import LoRASettings
from .networks import Pipeline
from .settings import EditSettings
from .stages import Bar


def _pad_points(arrs: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(arrs), n, 2), np.float32)
    mask = np.zeros((len(arrs), n), bool)
    for i, a in enumerate(arrs):
        out[i, :len(a)] = a
        mask[i, :len(a)] = True
    return out, mask


def _digest(a: np.ndarray) -> str:
    """A cache key's name for an image array's bytes."""
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


def _lora_key(p, lora: LoRASettings) -> tuple:
    """What determines an edit's LoRA: its training image, prompt, seed and the LoRA settings."""
    return (_digest(p.lora_image), p.lora_image.shape, p.request.prompt, int(p.request.seed), lora)


def dummy_edit(p):
    """A padding edit: the image of ``p`` with no handles (done before its first update)."""
    none = np.zeros((0, 2), np.float32)
    return replace(p, handles=none, targets=none)


def _edit_loras(pipe: Pipeline, group: list, settings: EditSettings, reqs: list, c0, b: int, n_real: int,
                progress, timed, timings: dict, cv: dict | None = None):
    """The batch's per-edit LoRAs (B, …) and training losses (steps, B): from the cache when
    every edit's LoRA is there, else trained (and cached). ``cv``: the batch on its canvas."""
    bar = Bar(progress, "lora", settings.lora.steps, f"LoRA ×{b}")
    keys = jnp.stack([jax.random.PRNGKey(r.seed) for r in reqs])
    lora_imgs = jnp.asarray(np.stack([p.lora_image for p in group]) if cv is None else cv["lora_images"])
    lora_hw = None if cv is None else jnp.asarray(cv["lora_hw"])
    cache_keys = [_lora_key(p, settings.lora) for p in group[:n_real]]
    cache_keys += cache_keys[:1] * (b - n_real)  # a dummy is a copy of the first edit
    cache = pipe.lora_cache  # None when off, and in plan_batch's measuring view (it measures LoRA too)
    if cache is not None and all(k in cache for k in cache_keys):
        loras = jax.tree.map(lambda *xs: jnp.stack(xs), *[cache[k][0] for k in cache_keys])
        lora_losses = jnp.stack([cache[k][1] for k in cache_keys], axis=1)
        timings["lora"] = 0.0
        bar.set(settings.lora.steps)
    elif cache is None:
        loras, lora_losses = timed("lora", pipe.train_lora, lora_imgs, c0, keys, settings.lora, bar.update,
                                   lora_hw)
        pipe.loras_trained += n_real
    else:
        # each missing LoRA trained once, however many edits of the batch share it (a sweep's grid
        # points): the batch's rows are its distinct missing edits, padded to b with the first
        missing = list(dict.fromkeys(k for k in cache_keys[:n_real] if k not in cache))
        rows = [cache_keys.index(k) for k in missing]
        rows = np.asarray(rows + rows[:1] * (b - len(rows)))
        trained, losses = timed("lora", pipe.train_lora, lora_imgs[rows], c0[rows], keys[rows], settings.lora,
                                bar.update, None if lora_hw is None else lora_hw[rows])
        for j, k in enumerate(missing):
            cache[k] = (jax.tree.map(lambda x: x[j], trained), losses[:, j])
        pipe.loras_trained += len(missing)
        loras = jax.tree.map(lambda *xs: jnp.stack(xs), *[cache[k][0] for k in cache_keys])
        lora_losses = jnp.stack([cache[k][1] for k in cache_keys], axis=1)
    bar.close()
    return loras, lora_losses


class Canvas(NamedTuple):
    """A batch's masked canvas (``models.canvas``): every edit at the top left of arrays of these
    shapes. ``work`` (H, W) the working image canvas (sides multiples of 8·2^levels), ``lora``
    the LoRA image canvas; the latent canvas is ``work``/8, the supervision canvas ``work``/2."""

    work: tuple[int, int]
    lora: tuple[int, int]


def _pad_to(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """``a`` (h, w, …) at the top left of zeros (H, W, …)."""
    out = np.zeros(tuple(hw) + a.shape[2:], a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return out


def _on_canvas(group: list, canvas: Canvas | None) -> dict | None:
    """The batch on its canvas: {"images", "lora_images" (padded), "img_hw", "lora_hw", "lat_hw"
    (B, 2) and "sizes" (B, 4) = (h, w, h_s, w_s) per edit}; None without a canvas."""
    if canvas is None:
        return None
    lat_c = (canvas.work[0] // 8, canvas.work[1] // 8)
    for p in group:
        if p.image.shape[0] > canvas.work[0] or p.image.shape[1] > canvas.work[1]:
            raise ValueError(f"{p.request.name}: working size {p.image.shape[:2]} exceeds the canvas {canvas.work}")
    return dict(
        images=np.stack([_pad_to(p.image, canvas.work) for p in group]),
        lora_images=np.stack([_pad_to(p.lora_image, canvas.lora) for p in group]),
        img_hw=np.array([p.image.shape[:2] for p in group], np.int32),
        lora_hw=np.array([p.lora_image.shape[:2] for p in group], np.int32),
        lat_hw=np.array([p.latent_hw for p in group], np.int32),
        sizes=np.array([tuple(p.latent_hw) + tuple(p.sup_hw) for p in group], np.int32),
        keep=lambda arrs: np.stack([_pad_to(a, lat_c) for a in arrs]),
        lat_canvas=lat_c)


def run_group(pipe: Pipeline, group: list, settings: EditSettings, cfg: DragConfig,
               hypers: list[dict], progress, batch: int | None = None,
               n_pairs: int | None = None, canvas: Canvas | None = None) -> list:
    """Run one batch of prepared edits through every stage: of one working shape, or of any
    shapes that fit ``canvas`` (each edit computed exactly on its own size inside it).

    Shapes are fixed so one program per stage serves a whole group: the batch is padded
    to ``batch`` with handle-less copies of the first edit (they finish before their first
    update; their results are dropped) and the handle slots to ``n_pairs`` (masked)."""
    from .assemble import edit_results

    n_real = len(group)
    batch = max(batch or n_real, n_real)
    group = list(group) + [dummy_edit(group[0])] * (batch - n_real)
    hypers = list(hypers) + [hypers[0]] * (batch - n_real)
    timings: dict[str, float] = {}
    pipe.stages.last_compile_s = {}

    def timed(name, fn, *a, **k):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*a, **k))
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    cv = _on_canvas(group, canvas)
    cfg = replace(cfg, sup_hw=group[0].sup_hw if cv is None else (canvas.work[0] // 2, canvas.work[1] // 2))
    c0, token_mask, et = _prompts(pipe, group, cfg, timed)
    start = _start_latents(pipe, group, settings, cfg, c0, n_real, progress, timed, timings, cv)
    t_star = int(pipe.schedule.timesteps[pipe.schedule.start_index(settings.inversion_strength)])
    shared, inputs, state = _drag(pipe, group, settings, cfg, hypers, n_pairs, start, c0, token_mask, et, t_star,
                                  progress, timed, cv)
    images, z_edit, extras = _denoise_all(pipe, group, settings, cfg, start, c0, t_star, shared, inputs, state,
                                          progress, timed, cv)
    if cv is not None:  # each edit's own region of the canvas
        crop = lambda arr, hws: [a[:h, :w] for a, (h, w) in zip(arr, hws)]  # noqa: E731
        images, z_edit = crop(images, cv["img_hw"]), crop(z_edit, cv["lat_hw"])
        extras = {k: (crop(im, cv["img_hw"]), ok) for k, (im, ok) in extras.items()}
    return edit_results(group[:n_real], settings, cfg, hypers, t_star, pipe, images, z_edit, extras,
                        jax.tree.map(np.asarray, state), np.asarray(drag_reached(cfg, state)),
                        np.asarray(start["lora_losses"]), len(group),
                        {**timings, **{f"compile_{k}": v for k, v in pipe.stages.last_compile_s.items()}}, canvas)


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
              timings: dict, cv: dict | None = None):
    """The batch's latents at t* (B, h, w, 4): each image encoded and DDIM-inverted with its LoRA
    — or, with the pipeline's cache on, taken from it when every edit's inversion is there (a
    sweep's grid points of one sample in later batches and program groups: an inversion depends on
    the image, its LoRA, the prompt and the strength, not on the drag settings)."""
    cache = pipe.lora_cache
    keys = [("inversion", _lora_key(p, settings.lora), _digest(p.image),
             float(settings.inversion_strength), cv is not None) for p in group]

    def cached():  # the cache holds each edit's own (h, w, 4) latent
        return jnp.stack([cache[k] if cv is None else _pad_to(np.asarray(cache[k]), cv["lat_canvas"]) for k in keys])

    if cache is not None and all(k in cache for k in keys):
        timings["encode"] = timings["invert"] = 0.0
        return cached()
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
    if cv is None:
        z0 = timed("encode", pipe.encode_images, jnp.asarray(np.stack([group[i].image for i in rows])))
        zt = timed("invert", pipe.invert, loras, z0, c0, settings.inversion_strength)
    else:
        z0 = timed("encode", pipe.encode_images, jnp.asarray(cv["images"][rows]), jnp.asarray(cv["img_hw"][rows]))
        zt = timed("invert", pipe.invert, loras, z0, c0, settings.inversion_strength, jnp.asarray(cv["lat_hw"][rows]))
    if cache is None:
        pipe.inversions_run += n_real
        return zt
    pipe.inversions_run += len(missing)
    for j, k in enumerate(missing):
        h, w = group[rows[j]].latent_hw
        cache[k] = zt[j, :h, :w]
    return cached()


def _start_latents(pipe: Pipeline, group: list, settings: EditSettings, cfg: DragConfig, c0, n_real: int,
                   progress, timed, timings: dict, cv: dict | None = None) -> dict:
    """Where the drag starts: {"zt": the latents at t* (B, h, w, 4), "loras", "lora_losses"
    (steps, B), "guide": classifier-free guidance of a generated image or None, "generated"}.
    A real image is encoded, gets its LoRA and is inverted; a generated one starts from its
    saved latent with no LoRA (DragDiffusion's generated-image mode, §2.4)."""
    b = len(group)
    reqs = [p.request for p in group]
    if group[0].z_start is None:
        loras, lora_losses = _edit_loras(pipe, group, settings, reqs, c0, b, n_real, progress, timed, timings, cv)
        return dict(zt=_inverted(pipe, group, settings, loras, c0, n_real, timed, timings, cv), loras=loras,
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
    zs = [p.z_start if cv is None else _pad_to(p.z_start, cv["lat_canvas"]) for p in group]
    return dict(zt=jnp.asarray(np.stack(zs)), loras=loras,
                lora_losses=np.zeros((0, b), np.float32), guide=guide, generated=True)


def _drag(pipe: Pipeline, group: list, settings: EditSettings, cfg: DragConfig, hypers: list[dict],
          n_pairs: int | None, start: dict, c0, token_mask, et, t_star: int, progress, timed,
          cv: dict | None = None) -> tuple:
    """The host's drag over the batch: (shared weights, inputs, final state). Handles and targets
    are padded to the batch's slot count (masked); without a drawn mask the background weight is
    zero (no background term), or one everywhere for hosts whose background is "always"."""
    b = len(group)
    n = max([len(p.handles) for p in group] + [n_pairs or 1])
    h0, mask = _pad_points([p.handles for p in group], n)
    tg, _ = _pad_points([p.targets for p in group], n)
    keeps = [np.ones_like(p.keep) if cfg.background == "always" and not p.masked else p.keep for p in group]
    keep = np.stack(keeps) if cv is None else cv["keep"](keeps)  # a canvas's padding: no background term
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
    if cv is not None:
        args = args + (jnp.asarray(cv["sizes"]),)
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
                 t_star: int, shared, inputs, state, progress, timed, cv: dict | None = None) -> tuple:
    """The edited images (B, H, W, 3) uint8 at the working size, the final latents, and the extra
    images {(kind, value): (images, finite (B,))} (interpolation, snapshots), each denoised like
    the edit."""
    b = len(group)
    loras, zt = start["loras"], start["zt"]
    denoising = Bar(progress, "denoise", 1 + len(settings.interpolation) + len(cfg.snapshots), f"denoise ×{b}")
    plan = _denoise_plan(pipe, cfg, settings, zt, c0, inputs, state)
    if cv is not None:
        plan["sizes"] = jnp.asarray(cv["lat_hw"])
    guide = start["guide"]
    if guide is not None:
        plan.update(uncond=jnp.broadcast_to(guide["uncond"], c0.shape), scale=jnp.full((b,), guide["scale"]))
    z_edit = timed("denoise", pipe.denoise, loras, **plan)
    work_hw = group[0].image.shape[:2] if cv is None else cv["images"].shape[1:3]
    sized = {} if cv is None else dict(sizes=jnp.asarray(cv["lat_hw"]), out_sizes=jnp.asarray(cv["img_hw"]))
    out = np.asarray(timed("decode", pipe.decode_to_uint8, z_edit, work_hw, **sized))
    denoising.update(1)
    extras = {}
    for kind, value, variant in _extra_denoise_plans(pipe, cfg, settings, plan, shared, loras, zt, c0, t_star,
                                                     state):
        z_x = timed("denoise_extra", pipe.denoise, loras, **variant)
        extras[(kind, value)] = np.asarray(timed("decode_extra", pipe.decode_to_uint8, z_x, work_hw, **sized)), \
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
            masked = "sizes" in plan
            fn = pipe.jitted(f"variable_start_{host.name}_{settings.remat}_{settings.clip_double_unit_map}_{masked}",
                             jax.vmap(lambda s, lo, z, c, t, hw: host.variable_start(
                                 nets, s, lo, z, c, t, **({"sizes": hw} if masked else {})),
                                 in_axes=(None, 0, 0, 0, None, 0)))
            hw = plan["sizes"] if masked else jnp.zeros((zt.shape[0], 2), jnp.int32)
            start = fn(shared, loras, zt, c0, jnp.int32(t_star), hw)
        for a in settings.interpolation:
            yield "alpha", a, {**plan, var: _lerp(start, plan[var], a), "c_edit": _lerp(plan["c_src"], plan["c_edit"], a)}
    for s, cap in enumerate(cfg.snapshots):
        yield "iters", cap, {**plan, var: state.snap_z[:, s], "c_edit": state.snap_c[:, s]}
