"""Result assembly: one batch's arrays (images, final drag state, extra images) turned into an
``EditResult`` per real edit — pixels at the input size, handles and trajectories in input
pixels, the edit's full configuration, failures named."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from PIL import Image

from ..drag import FAILURES, DragConfig
from ..drag.hosts import host as drag_host
from ..drag.losses import STOP_DISTANCE


def cfg_dict(cfg: DragConfig) -> dict:
    """The drag config as JSON-able fields (the schedule by its step count)."""
    return {f: (getattr(cfg, f) if f != "schedule" else vars(cfg.schedule))
            for f in cfg.__dataclass_fields__ if f != "schedule"} | {
        "num_inference_steps": cfg.schedule.num_inference_steps}


def _at_input_size(img: np.ndarray, in_hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 resized (bilinear) to the request's input size when it differs."""
    if img.shape[:2] == tuple(in_hw):
        return img
    return np.asarray(Image.fromarray(img).resize((in_hw[1], in_hw[0]), Image.BILINEAR))


def edit_config(p, settings, cfg: DragConfig, hypers: dict, t_star: int, pipe, batch: int, n_real: int,
                lora_final_loss, generated: bool, canvas=None) -> dict:
    """Everything that determined one edit (written next to its image)."""
    config = {
        "method": settings.method, "drag": cfg_dict(cfg), "hypers": hypers,
        "lora": {f: getattr(settings.lora, f) for f in settings.lora.__dataclass_fields__},
        "inversion_strength": settings.inversion_strength, "t_star": t_star,
        "reference_attention": settings.reference_attention and drag_host(cfg.host).reference_attention,
        "remat": settings.remat,
        "clip_double_unit_map": settings.clip_double_unit_map,
        "working_size": list(p.image.shape[:2]), "supervision_size": list(p.sup_hw), "input_size": list(p.in_hw),
        "prompt": p.request.prompt, "edit_prompt": p.request.edit_prompt or p.request.prompt,
        "seed": p.request.seed, "model": str(pipe.sd.source),
        "dtype": jnp.dtype(pipe.policy.compute).name, "batch_size": batch, "batch_edits": n_real,
        "lora_final_loss": lora_final_loss,
        # the working-image canvas the edit was computed in (``buckets``), None: its own shape
        "canvas": None if canvas is None else list(canvas.work),
    }
    if p.request.source is not None:
        config["input"] = p.request.source  # e.g. the EXIF orientation applied on reading
    if generated:
        config["generation"] = dataclasses.asdict(p.request.generation)
        config["lora"] = None  # no LoRA on a generated image (as the reference UI)
    if settings.interpolation:
        config["interpolation"] = list(settings.interpolation)
    return config


def edit_results(group: list, settings, cfg: DragConfig, hypers: list[dict], t_star: int, pipe,
                 images: np.ndarray, z_edit: np.ndarray, extras: dict, st, reached: np.ndarray,
                 lora_losses: np.ndarray, batch: int, timings: dict, canvas=None) -> list:
    """``EditResult``s of the real edits ``group`` of a batch of ``batch``: ``images`` (B, H, W, 3)
    uint8 and ``z_edit`` (B, h, w, 4) the denoised edits, ``extras`` {(kind, value): (images,
    finite (B,))}, ``st`` the final drag state (numpy), ``reached`` (B,) bool, ``lora_losses``
    (steps, B)."""
    from .. import data as io

    generated = group[0].z_start is not None
    results = []
    for i, p in enumerate(group):
        finite = bool(np.isfinite(z_edit[i]).all())
        img = _at_input_size(images[i], p.in_hw) if finite else images[i]
        k = len(p.handles)
        n_traj = int(st.it[i]) + int(st.done[i])
        config = edit_config(p, settings, cfg, hypers[i], t_star, pipe, batch, len(group),
                             float(lora_losses[-1, i]) if len(lora_losses) else None, generated, canvas)

        def final_image(kind, value):
            im, ok = extras[(kind, value)]
            return _at_input_size(im[i], p.in_hw) if ok[i] else None

        interp = [(float(a), final_image("alpha", a)) for a in settings.interpolation]
        interp = [] if any(im is None for _, im in interp) else interp
        snaps = [{"max_iters": cap, "iterations": int(st.snap_it[i, s]),
                  "reached": bool(np.all(np.linalg.norm(p.targets - st.snap_handles[i, s, :k], axis=-1)
                                         < STOP_DISTANCE)),
                  "handles": p.to_pixels(st.snap_handles[i, s, :k]), "image": final_image("iters", cap)}
                 for s, cap in enumerate(cfg.snapshots)]
        failure = None
        if bool(st.failed[i]):
            failure = {"diverged": {"iteration": int(st.fail_it[i]), "what": FAILURES[int(st.fail_what[i])]}}
            img = None
        elif not finite:
            failure = {"diverged": {"iteration": int(st.it[i]), "what": "denoise"}}
            img = None
        results.append(io.EditResult(
            name=p.request.name, image=img, failure=failure,
            handles=p.to_pixels(st.handles[i, :k]), targets=p.to_pixels(p.targets),
            initial_handles=p.to_pixels(p.handles), trajectory=p.to_pixels(st.traj[i, :max(n_traj, 1), :k]),
            iterations=int(st.it[i]), reached=bool(reached[i]),
            losses=[float(v) for v in st.losses[i, :int(st.it[i])]],
            timings=dict(timings), config=config, interpolation=interp if failure is None else [],
            snapshots=snaps if failure is None else []))
    return results
