"""Why a drag does or does not work on a model, measured on ToyBench tasks without editing:

- **trackability**: the motion-supervision features (``up_blocks[feature_block]`` at the inverted
  latent z_{t*}, bilinearly upsampled to the supervision map, H/2 × W/2) of the input at the
  handle, searched by nearest neighbour (L1, as DragDiffusion's point tracking) in the features of
  the *perfectly edited* scene: the distance (supervision px) between the best match and the true
  target. If even the right answer cannot be found in the features, point tracking cannot follow
  the object. Reported for a search over the whole map and within the tracking window r_p = 3
  around the target (the tracker's view once the content is there).
- **contrast**: how much the feature at the handle differs from the features one, two and four
  supervision px away (mean L1 per channel, relative to the mean |F|): motion supervision can only
  pull content whose features change with position.
- **text**: how much the caption steers the UNet's clean-image prediction x̂_0 at a timestep, the
  noisy latent fixed: the change of x̂_0 when the caption is replaced by the empty one, by another
  scene's caption, and by the caption of the *moved* scene (the same words but the object's
  position), each relative to the spread of x̂_0 (L2 over the batch). DragText optimises the text
  embedding so that the text stops holding the content where it was; that needs a model whose
  layout follows its caption.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import bench


def _features(pipe, images: np.ndarray, prompts: list[str], strength: float = 0.7) -> np.ndarray:
    """(B, H/2, W/2, C) supervision features of uint8 images at t* after DDIM inversion (no LoRA)."""
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    z0 = pipe.encode_images(x)
    ctx = pipe.encode_prompt(prompts)
    tmpl = pipe.lora_template()
    loras = jax.tree.map(lambda s: jnp.zeros((len(images),) + s.shape, s.dtype), tmpl)
    zt = pipe.invert(loras, z0, ctx, strength)
    t = int(pipe.schedule.inversion_timesteps(strength)[-1])
    lora0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tmpl)
    feats = jax.jit(lambda p, z, c: pipe.unet_apply(p, lora0, z, jnp.full((z.shape[0],), t), c)[1]["up"][
        pipe.feature_block].astype(jnp.float32))
    f = feats(pipe.sd.unet.params, zt, ctx)
    h, w = images.shape[1] // 2, images.shape[2] // 2
    return np.asarray(jax.image.resize(f, (f.shape[0], h, w, f.shape[-1]), "bilinear"))


def match(F0: np.ndarray, F1: np.ndarray, points, window: int = 3) -> tuple[list, list, dict]:
    """For each handle → target pair (image px) of ``points``: the distance (supervision px) from
    the nearest neighbour (L1) of F0[handle] in F1 to the target, over the whole map and within
    ``window`` of the target; and the handle's contrast (mean L1 to the features 1, 2 and 4 px
    away, relative to mean |F0|). F0, F1: (H/2, W/2, C)."""
    hs, ws = F0.shape[:2]
    scale = float(np.mean(np.abs(F0)))
    err_all, err_win, contrast = [], [], {1: [], 2: [], 4: []}
    for (hx, hy), (tx, ty) in zip(points[0::2], points[1::2]):
        h = (min(hs - 1, int(round(hy / 2))), min(ws - 1, int(round(hx / 2))))
        g = (min(hs - 1, int(round(ty / 2))), min(ws - 1, int(round(tx / 2))))
        f = F0[h]
        d = np.abs(F1 - f).sum(-1)
        best = np.unravel_index(np.argmin(d), d.shape)
        err_all.append(float(np.hypot(best[0] - g[0], best[1] - g[1])))
        r0, r1 = max(0, g[0] - window), min(hs, g[0] + window + 1)
        c0, c1 = max(0, g[1] - window), min(ws, g[1] + window + 1)
        sub = d[r0:r1, c0:c1]
        b = np.unravel_index(np.argmin(sub), sub.shape)
        err_win.append(float(np.hypot(b[0] + r0 - g[0], b[1] + c0 - g[1])))
        for s in contrast:
            nb = [F0[min(hs - 1, max(0, h[0] + dy)), min(ws - 1, max(0, h[1] + dx))]
                  for dy, dx in ((s, 0), (-s, 0), (0, s), (0, -s))]
            contrast[s].append(float(np.mean([np.abs(n - f).mean() for n in nb]) / max(scale, 1e-12)))
    return err_all, err_win, contrast


def tracking(pipe, tasks: list[bench.Task], window: int = 3) -> dict:
    """Trackability and contrast of the handles of ``tasks`` (see the module docstring)."""
    src = _features(pipe, np.stack([t.image for t in tasks]), [t.prompt for t in tasks])
    dst = _features(pipe, np.stack([t.target.image for t in tasks]), [t.edit_prompt for t in tasks])
    err_all, err_win, contrast = [], [], {1: [], 2: [], 4: []}
    for k, t in enumerate(tasks):
        a, w, c = match(src[k], dst[k], t.points, window)
        err_all += a
        err_win += w
        for s in contrast:
            contrast[s] += c[s]
    ea, ew = np.asarray(err_all), np.asarray(err_win)
    return {"handles": len(ea), "feature_scale": float(np.mean(np.abs(src))),
            "whole_map": {"median_px": float(np.median(ea)), "within_1px": float(np.mean(ea <= 1.0)),
                          "within_2px": float(np.mean(ea <= 2.0))},
            "window": {"r_p": window, "median_px": float(np.median(ew)), "within_1px": float(np.mean(ew <= 1.0))},
            "contrast": {f"{s}px": float(np.mean(v)) for s, v in contrast.items()}}


def text_sensitivity(pipe, tasks: list[bench.Task], timesteps=(881, 681, 481, 281), seed: int = 0) -> dict:
    """{t: {"empty", "other_caption", "moved_caption"}}: |x̂_0(c') − x̂_0(c)| / |x̂_0(c) − mean z_0|
    (L2 over the batch of ``tasks``' scenes; the same noise for every caption) at each timestep, where
    c is the scene's caption and c' the empty caption, the caption of the task five places on, or the
    caption of the moved scene (only the position words differ). 681 is the drag's timestep at the
    references' inversion strength 0.7 of 50 steps."""
    from ..schedule import DDIM, add_noise, predict_x0

    sched = DDIM()
    z0 = pipe.vae_encode(jnp.asarray(np.stack([t.image for t in tasks])))
    n = len(tasks)
    caps = {"scene": [t.prompt for t in tasks], "empty": [""] * n,
            "other_caption": [tasks[(i + 5) % n].prompt for i in range(n)],
            "moved_caption": [t.edit_prompt for t in tasks]}
    emb = {k: pipe.encode_prompt(v) for k, v in caps.items()}
    out = {}
    for i, t in enumerate(timesteps):
        zt = add_noise(sched, z0, jax.random.normal(jax.random.PRNGKey(seed + i), z0.shape), jnp.full((n,), t))
        x0 = {k: predict_x0(sched, zt, pipe.unet(zt, t, e), t) for k, e in emb.items()}
        spread = float(jnp.linalg.norm(x0["scene"] - z0.mean()))
        out[int(t)] = {k: float(jnp.linalg.norm(x0[k] - x0["scene"])) / spread
                       for k in ("empty", "other_caption", "moved_caption")}
    return out


def main(argv=None) -> int:
    """``python -m jaxdrag.toy.diagnose [--model DIR] [--tasks N] [--text]``: the trackability table
    as JSON (``--text``: the caption's sensitivity instead)."""
    import argparse
    import json

    from .. import load_pipeline
    from . import toy_paths

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="toy SD folder (default: the committed weights/toy-sd15)")
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--text", action="store_true", help="measure how much the caption steers x̂_0 instead")
    args = ap.parse_args(argv)
    pipe = load_pipeline(args.model or toy_paths()[0], dtype="float32")
    tasks = bench.make_tasks(args.tasks)
    print(json.dumps(text_sensitivity(pipe, tasks) if args.text else tracking(pipe, tasks), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
