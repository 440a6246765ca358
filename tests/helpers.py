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


# ----------------------------------------------------------------------------------------------
# the evaluation scripts' torch code (DragBench's run_eval_point_matching.py / dift_sd.py and
# run_eval_similarity.py), for the parity tests and benchmarks/bench_eval.py


def torchvision_alexnet(pretrained=False, **_):
    """torchvision's ``alexnet().features`` architecture (random init). PyPI's torchvision does
    not import beside the CPU torch build the tests use ('operator torchvision::nms does not
    exist') and breaks transformers' imports when installed, so lpips gets this stand-in."""
    import torch.nn as nn

    assert not pretrained, "ImageNet weights cannot be downloaded here"
    m = nn.Module()
    m.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
    return m


def import_lpips():
    """The ``lpips`` package (None when not installed), importable without torchvision."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("lpips") is None:
        return None
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import lpips
        return lpips
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(alexnet=torchvision_alexnet)
    sys.modules["torchvision"] = tv
    try:
        import lpips
    finally:
        del sys.modules["torchvision"]
    return lpips


class _Stop(Exception):
    pass


class TorchDift:
    """DIFT as ``dift_sd.py`` computes it, on the diffusers/transformers modules of an SD-2.x
    diffusers folder: the image repeated E times through the VAE encoder, posterior sample ×
    scaling factor, ``add_noise`` at t, the UNet with the prompt embedding, stopped after
    ``up_blocks[up_index]`` (its output, averaged over the ensemble)."""

    def __init__(self, folder):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
        self.text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
        self.tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.sched = DDIMScheduler.from_pretrained(folder / "scheduler")

    def ids(self, prompt):
        return self.tok([prompt], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids

    def features(self, image, prompt, t=261, up_index=1, ensemble=8, eps_p=None, eps_n=None):
        """image: (1, 3, H, W) in [-1, 1] → (1, C, h, w). The noises are drawn with torch.randn
        (as the script) unless given as (E, 4, h, w) tensors."""
        import torch

        def grab(m, i, o):
            raise _Stop(o)

        handle = self.unet.up_blocks[up_index].register_forward_hook(grab)
        try:
            with torch.no_grad():
                ctx = self.text(self.ids(prompt))[0].repeat(ensemble, 1, 1)
                post = self.vae.encode(image.repeat(ensemble, 1, 1, 1)).latent_dist
                eps_p = torch.randn_like(post.mean) if eps_p is None else eps_p
                lat = (post.mean + post.std * eps_p) * self.vae.config.scaling_factor
                eps_n = torch.randn_like(lat) if eps_n is None else eps_n
                noisy = self.sched.add_noise(lat, eps_n, torch.tensor(t, dtype=torch.long))
                try:
                    self.unet(noisy, t, encoder_hidden_states=ctx)
                except _Stop as s:
                    return s.args[0].mean(0, keepdim=True)
        finally:
            handle.remove()
        raise AssertionError("up block hook did not fire")


def torch_match(ft_src, ft_drag, handles, targets):
    """The script's matching: both (1, C, H, W) full-resolution maps; handles, targets (P, 2)
    (x, y) → distances (P,) and matched (row, col)."""
    import torch

    cos = torch.nn.CosineSimilarity(dim=1)
    c = ft_src.shape[1]
    dists, matched = [], []
    for (hx, hy), (tx, ty) in zip(handles, targets):
        v = ft_src[0, :, hy, hx].view(1, c, 1, 1)
        cmap = cos(v, ft_drag).cpu().numpy()[0]
        rc = np.unravel_index(cmap.argmax(), cmap.shape)
        matched.append(rc)
        dists.append(float(np.linalg.norm(np.array([ty, tx]) - np.array(rc))))
    return dists, matched


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
