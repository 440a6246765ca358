"""The evaluation networks as jitted batch programs (one jit per program and shape; exported for
accelerators by tests/pipeline/test_export.py) and the per-sample noise keys of DIFT."""

from __future__ import annotations

import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .image import resize_bilinear
from .metrics import clip_cosine, dift_features
from .settings import EvalSettings


class Networks:
    """The loaded evaluation networks (any of them None) as jitted batch functions."""

    def __init__(self, lpips=None, dift=None, clip=None):
        self.lpips, self.dift, self.clip = lpips, dift, clip
        self._jit: dict[str, Callable] = {}

    def _j(self, name, fn, **kw):
        if name not in self._jit:
            self._jit[name] = jax.jit(fn, **kw)
        return self._jit[name]

    # the jitted programs (also exported for accelerators by the tests)
    def lpips_fn(self):
        """(params, (B, 224, 224, 3), (B, 224, 224, 3)) → (B,) LPIPS."""
        c = self.lpips
        return self._j("lpips", lambda p, u, v: nnx.merge(c.graphdef, p)(u, v))

    def clip_fn(self):
        """(params, (B, S, S, 3), (B, S, S, 3)) CLIP-preprocessed → (B,) cosine of the embeddings."""
        c = self.clip

        def run(p, u, v):
            m = nnx.merge(c.graphdef, p)
            return clip_cosine(m.image_embeds(u), m.image_embeds(v))
        return self._j("clip", run)

    def text_fn(self):
        """(params, (B, 77) ids) → (B, 77, D) prompt embeddings (last hidden state)."""
        d = self.dift
        return self._j("text", lambda p, ids: nnx.merge(d.text_encoder.graphdef, p)(ids)[0])

    def dift_fn(self, s: EvalSettings):
        """(unet params, vae params, (B, H, W, 3) [-1, 1] images of one size, (B, S, D) prompt
        embeddings, (B,) keys) → (B, h', w', C) DIFT features."""
        d = self.dift
        alpha = jnp.asarray(d.schedule.alphas_cumprod[s.t], jnp.float32)
        scaling = float(d.vae.cfg.scaling_factor)

        def run(up, vp, x, ctx, ks):
            unet = nnx.merge(d.unet.graphdef, up)
            vae = nnx.merge(d.vae.graphdef, vp)
            moments = vae.encode(x)  # once per image (see dift_features)
            shape = (s.ensemble,) + moments[0].shape[1:]
            eps_p = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(ks)
            eps_n = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape))(ks)
            return dift_features(lambda z, t, c: unet(z, t, c, up_until=s.up_index)[1]["up"][s.up_index],
                                 lambda _: moments, x, ctx, eps_p, eps_n, alpha_t=alpha, t=s.t,
                                 scaling=scaling, up_index=s.up_index)

        return self._j(f"dift{s.t}_{s.up_index}_{s.ensemble}", run)

    # batches
    def lpips_batch(self, x0: list[np.ndarray], x1: list[np.ndarray]) -> np.ndarray:
        """Lists of (H_i, W_i, 3) [-1, 1] images → (B,) LPIPS (each image resized to 224 first)."""
        def r224(a):  # per shape (jit caches by shape), then one LPIPS batch
            return self._j("r224", lambda y: resize_bilinear(y[None], (224, 224))[0])(jnp.asarray(a))

        a = jnp.stack([r224(v) for v in x0])
        b = jnp.stack([r224(v) for v in x1])
        return np.asarray(self.lpips_fn()(self.lpips.params, a, b))

    def clip_batch(self, x0: list[np.ndarray], x1: list[np.ndarray]) -> np.ndarray:
        """CLIP-preprocessed (224, 224, 3) lists → (B,) cosine of the image embeddings."""
        return np.asarray(self.clip_fn()(self.clip.params, jnp.asarray(np.stack(x0)),
                                         jnp.asarray(np.stack(x1))))

    def prompt_embeddings(self, prompts: list[str]) -> jax.Array:
        return self.text_fn()(self.dift.text_encoder.params, jnp.asarray(self.dift.tokenizer.ids(prompts)))

    def dift_batch(self, images: np.ndarray, context: jax.Array, keys: jax.Array,
                   s: EvalSettings) -> jax.Array:
        """(B, H, W, 3) [-1, 1] images of one size, (B, S, D) prompt embeddings, (B,) keys →
        (B, h', w', C) DIFT features."""
        d = self.dift
        return self.dift_fn(s)(d.unet.params, d.vae.params, jnp.asarray(images), context, keys)


def sample_key(seed: int, name: str, which: int) -> jax.Array:
    """The noise key of one image of a sample (which: 0 source, 1 result)."""
    k = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return jax.random.fold_in(k, which)
