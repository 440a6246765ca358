"""Builders of random-weight PyTorch reference models (diffusers / transformers) and comparisons."""

from __future__ import annotations

import numpy as np


def randomize(module, seed: int, scale: float = 0.05):
    """Deterministically perturb every parameter so none is at a trivial init (norm scales ≠ 1,
    biases ≠ 0) while activations stay O(1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def nhwc(t) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def nchw(a: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32))).permute(0, 3, 1, 2)


def rel_err(ours, ref) -> float:
    """max |ours − ref| / max(1, max |ref|): absolute error for O(1) outputs, relative for large."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(1.0, np.abs(ref).max()))


def torch_unet(seed=0, **cfg):
    from diffusers import UNet2DConditionModel

    import torch
    torch.manual_seed(seed)
    return randomize(UNet2DConditionModel(**cfg), seed + 1)


def torch_vae(seed=0, **cfg):
    from diffusers import AutoencoderKL

    import torch
    torch.manual_seed(seed)
    return randomize(AutoencoderKL(**cfg), seed + 1)


def short_run(method: str, iters: int) -> dict:
    """Drag overrides that cap ``method`` at ``iters`` latent updates: ``max_iters`` for every host
    but GoodDrag, whose budget is timesteps × trackings × steps per tracking (one timestep)."""
    if method.startswith("gooddrag"):
        per = 2 if iters % 2 == 0 else 1
        return dict(drag_end_step=1, track_per_step=iters // per, max_drag_per_track=per)
    return dict(max_iters=iters)
