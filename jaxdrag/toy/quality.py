"""Quality of the trained toy models, measured on held-out scenes:

- VAE reconstruction PSNR (posterior mean → decode, uint8 as the pipeline writes images);
- text-to-image: DDIM-50 samples (classifier-free guidance) from held-out captions, checked by
  colour segmentation: a sample *contains the requested objects* when every object colour of the
  caption covers at least ``MIN_AREA_FRAC`` of the object's true area (and, reported beside it,
  each with its black spot covering ``MIN_AREA_FRAC`` of the spot's area near the object). Also reported: whether each
  object's segmented centroid lies in the caption's position cell (thirds of the image), and
  whether a palette colour the caption does not ask for covers as much;
- CLIP: top-1 retrieval accuracy of the caption among a batch of held-out captions, both ways.
"""

from __future__ import annotations

import numpy as np

from . import bench, world
from .train import HELD_OUT_SEED

QUALITY_SEED = HELD_OUT_SEED + 20_000
MIN_AREA_FRAC = 0.3


def _cell(x: float, y: float, size: int = world.IMAGE_SIZE) -> tuple[int, int]:
    return min(2, int(3 * y / size)), min(2, int(3 * x / size))


def check_sample(spec: world.Spec, image: np.ndarray) -> dict:
    """Colour-segmentation check of one generated image against its scene description."""
    truth = world.render(spec)
    found, placed, spots = [], [], []
    for i, o in enumerate(spec.objects):
        seg = bench.segment(image, o.colour)
        area = int(truth.masks[i].sum())
        found.append(bool(seg.sum() >= MIN_AREA_FRAC * area))
        c = bench.centroid(seg)
        placed.append(bool(c is not None and _cell(*c) == _cell(o.x, o.y)))
        spot_area = int(truth.spot_masks[i].sum())
        spots.append(bool(bench.segment_spot(image, c, o.size).sum() >= MIN_AREA_FRAC * spot_area))
    asked = {o.colour for o in spec.objects}
    min_area = min(int(m.sum()) for m in truth.masks)
    extra = [c for c in world.PALETTE if c not in asked
             and bench.segment(image, c).sum() >= MIN_AREA_FRAC * min_area]
    return {"objects_found": all(found), "spots_found": all(spots), "positions_right": all(placed),
            "extra_colours": extra}


def vae_psnr(pipe, n: int = 64, first_seed: int = QUALITY_SEED) -> np.ndarray:
    """Per-scene PSNR (dB) of VAE reconstructions of ``n`` held-out scenes."""
    from .train import psnr, to_unit

    imgs, _ = world.batch(np.arange(first_seed, first_seed + n))
    out = []
    for s in range(0, n, 16):
        x = to_unit(imgs[s:s + 16])
        rec = np.asarray(pipe.decode_to_uint8(pipe.encode_images(x), x.shape[1:3]))
        out.append(psnr(rec, imgs[s:s + 16]))
    return np.concatenate(out)


def samples(pipe, n: int = 50, guidance_scale: float = 4.0, first_seed: int = QUALITY_SEED,
            batch: int = 25) -> tuple[list[dict], np.ndarray]:
    """DDIM-50 samples for ``n`` held-out captions; (per-sample checks, images)."""
    specs = [world.random_spec(first_seed + i) for i in range(n)]
    caps = [world.caption(s) for s in specs]
    images = []
    for s in range(0, n, batch):
        img, _ = pipe.generate(caps[s:s + batch], seed=s, guidance_scale=guidance_scale, steps=50)
        images.append(np.asarray(img))
    images = np.concatenate(images)
    checks = [dict(check_sample(sp, im), caption=c) for sp, im, c in zip(specs, images, caps)]
    return checks, images


def clip_retrieval(pipe, n: int = 64, first_seed: int = QUALITY_SEED) -> dict:
    """Top-1 accuracy of matching each held-out scene to its caption among ``n`` (and back)."""
    from .train import to_unit

    imgs, caps = world.batch(np.arange(first_seed, first_seed + n))
    ei = np.array(pipe.clip_image_embeds(to_unit(imgs)))
    et = np.array(pipe.clip_text_embeds(caps))
    ei /= np.linalg.norm(ei, axis=-1, keepdims=True)
    et /= np.linalg.norm(et, axis=-1, keepdims=True)
    sim = ei @ et.T
    idx = np.arange(n)
    return {"n": n, "image_to_text": float(np.mean(sim.argmax(1) == idx)),
            "text_to_image": float(np.mean(sim.argmax(0) == idx))}


def evaluate(pipe, n_samples: int = 50, guidance_scale: float = 4.0) -> tuple[dict, list[dict], np.ndarray]:
    """(summary, per-sample checks, sample images)."""
    ps = vae_psnr(pipe)
    checks, images = samples(pipe, n_samples, guidance_scale)
    out = {"vae_psnr_mean": float(ps.mean()), "vae_psnr_min": float(ps.min()), "vae_scenes": len(ps),
           "samples": len(checks), "guidance_scale": guidance_scale,
           "objects_found": float(np.mean([c["objects_found"] for c in checks])),
           "objects_and_spots_found": float(np.mean([c["objects_found"] and c["spots_found"] for c in checks])),
           "positions_right": float(np.mean([c["positions_right"] for c in checks])),
           "extra_colours": float(np.mean([bool(c["extra_colours"]) for c in checks]))}
    if pipe.clip is not None:
        out["clip_retrieval"] = clip_retrieval(pipe)
    return out, checks, images
