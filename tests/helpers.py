"""Test helpers: random-weight PyTorch reference models (diffusers / transformers), comparisons, synthetic inputs.
The references' PyTorch statements live in ``jaxdrag.testing.torch_reference``."""

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


def synthetic_image(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A smooth RGB gradient plus uniform noise, (h, w, 3) uint8: the tests' stand-in photo."""
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    return (np.stack([yy, xx, 1 - yy], -1) * 200 + rs.rand(h, w, 3) * 55).astype(np.uint8)


def dragbench_sample(folder, seed: int) -> None:
    """A DragBench-layout sample in ``folder``: a 96 × 128 synthetic image, a mask, one drag."""
    import pickle

    from PIL import Image

    folder.mkdir(parents=True)
    Image.fromarray(synthetic_image(seed=seed)).save(folder / "original_image.png")
    mask = np.zeros((96, 128), np.uint8)
    mask[20:70, 30:100] = 1
    meta = {"prompt": f"sample {seed}", "points": [[50, 40], [70, 45]], "mask": mask}
    (folder / "meta_data.pkl").write_bytes(pickle.dumps(meta))
