"""The drag engine's view of the networks: ``DragNetworks`` (features, CLIP image, DragNoise's
bottleneck) over a pipeline's UNet, VAE and CLIP, the cached runners, and the broadcast parameters
of the drag step. ``Pipeline.drag_networks`` / ``drag_runner`` / ``shared_params`` call these."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp

from ..drag import DragConfig, DragNetworks, make_runner
from ..models.canvas import decoder_canvas, edit_canvas

if TYPE_CHECKING:
    from .networks import Pipeline


def drag_networks(pipe: "Pipeline", clip_double_unit_map: bool = False, remat: str = "off", text_block: int | None = None,
                  guided: bool = False) -> DragNetworks:
    """The engine's network functions over this pipeline (cached: one object per setting).
    ``remat``: the UNet's rematerialisation policy in the drag step's backward.
    ``text_block`` (an up_blocks index): ``features`` also returns that block's map, the
    text embedding's motion features (DragText App. H). ``guided`` (drags on generated
    images, ALGORITHMS.md §2.4): every forward runs the UNet on [z, z] with [c_u, ĉ]
    (``shared["guide"]`` = {"uncond": (T, D), "scale": ()}); ε = ε_u + s·(ε_c − ε_u) and
    the features are [(1 − κ)·F_u, κ·F_c] along channels, κ = s/(2s − 1)."""
    key = ("nets", clip_double_unit_map, remat, text_block, guided)
    with pipe.jit_lock:
        if key not in pipe.jit_cache:
            fb = pipe.feature_block
            n_up = len(pipe.sd.unet.cfg.block_out_channels)
            if text_block is not None and not 0 <= text_block < n_up:
                from ..errors import SettingsError
                raise SettingsError(f"setting text_feature_block = {text_block}: this UNet has up blocks "
                                    f"0..{n_up - 1}")
            blocks = (fb,) if text_block is None else (fb, text_block)

            def outputs(shared, eps, taps):
                eps = eps.astype(jnp.float32)
                feats = [taps["up"][b].astype(jnp.float32) for b in blocks]
                if not guided:
                    return (eps[0], *(f[0] for f in feats))
                g = shared["guide"]["scale"]
                k = g / (2.0 * g - 1.0)
                return (eps[0] + g * (eps[1] - eps[0]),
                        *(jnp.concatenate([(1.0 - k) * f[0], k * f[1]], axis=-1) for f in feats))

            def rows(shared, z, c):
                if not guided:
                    return z[None], c[None]
                return jnp.stack([z, z]), jnp.stack([shared["guide"]["uncond"].astype(c.dtype), c])

            def canvas(sizes, x):
                """The UNet canvas of the rows x of one edit of ``sizes`` (None: no canvas)."""
                return edit_canvas(sizes, x.shape[0], x.shape[1:3], pipe.unet_levels())

            def features(shared, edit, z, c, t, sizes=None):
                x, ctx = rows(shared, z, c)
                eps, taps = pipe.unet_apply(shared["unet"], edit, x, t, ctx, remat=remat, canvas=canvas(sizes, x))
                return outputs(shared, eps, taps)

            def clip_image(shared, x0, sizes=None):
                if sizes is None:
                    img = pipe.vae_decode_apply(shared["vae"], x0[None])
                    return pipe.clip_image_apply(shared["clip"], img, clip_double_unit_map)[0]
                lat = sizes[None, :2]
                img = pipe.vae_decode_apply(shared["vae"], x0[None], decoder_canvas(lat, x0.shape[:2], pipe.vae_levels()))
                return pipe.clip_image_apply(shared["clip"], img, clip_double_unit_map,
                                             lat * (img.shape[1] // x0.shape[0]))[0]

            def features_mid(shared, edit, z, c, t, h, sizes=None):
                eps, taps = pipe.unet_apply(shared["unet"], edit, z[None], t, c[None], mid_override=h[None],
                                            remat=remat, canvas=canvas(sizes, z[None]))
                return outputs(shared, eps, taps)

            def bottleneck(shared, edit, z, c, t, sizes=None):
                _, taps = pipe.unet_apply(shared["unet"], edit, z[None], t, c[None], canvas=canvas(sizes, z[None]))
                return taps["mid"][0].astype(jnp.float32)

            mid = (features_mid, bottleneck) if not guided else (None, None)
            pipe.jit_cache[key] = DragNetworks(features, clip_image if pipe.clip is not None else None, *mid)
        return pipe.jit_cache[key]


def drag_runner(pipe: "Pipeline", cfg: DragConfig, clip_double_unit_map: bool = False, progress: bool = False,
                remat: str = "off", guided: bool = False):
    """(prep, loop) for ``cfg``, cached. With ``progress`` the loop reports every iteration
    to ``pipe.progress_relay.target`` (set it before the call). ``guided``: see
    ``drag_networks`` (then ``shared_params`` must be given the guidance)."""
    key = ("runner", cfg, clip_double_unit_map, bool(progress), remat, guided)
    with pipe.jit_lock:
        if key not in pipe.jit_cache:
            nets = pipe.drag_networks(clip_double_unit_map, remat, cfg.text_feature_block, guided)
            pipe.jit_cache[key] = make_runner(nets, cfg, pipe.progress_relay if progress else None)
        return pipe.jit_cache[key]


def shared_params(pipe: "Pipeline", use_clip: bool, guide: dict | None = None):
    """The broadcast parameters of the drag step; ``guide`` = {"uncond": (T, D), "scale": ()}
    for guided networks."""
    shared = {"unet": pipe.sd.unet.params}
    if guide is not None:
        shared["guide"] = guide
    if use_clip:
        pipe.require_clip()
        shared["vae"] = pipe.sd.vae.params
        shared["clip"] = pipe.clip.params
    return shared
