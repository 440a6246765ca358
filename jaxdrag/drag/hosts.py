"""The hosts' registry: drag algorithms by name, and the runner the pipeline compiles.

A host is a module that builds one ``engine.Host`` (its preparation, its batched loop, its stop
flag, its update budget, how its result is denoised); this registry is the only place that
lists them. DragDiffusion (CLIPDrag with CLIP) and DragNoise share ``loop.py``; GoodDrag and
FreeDrag have their own modules. DragText is not a host: every host composes ``text.py``.

Adding a host: write its module against ``engine`` (it must not import another host), build
its ``Host``, add it to ``REGISTRY`` below, and name it in the ``hosts`` of the settings it
reads (``settings.py``); a method preset for it goes into ``methods.py``.
"""

from __future__ import annotations

import jax

from . import freedrag, gooddrag, loop
from .engine import DragConfig, DragNetworks, Host

REGISTRY: dict[str, Host] = {h.name: h for h in (loop.DRAGDIFFUSION, loop.DRAGNOISE, gooddrag.HOST, freedrag.HOST)}
HOSTS = tuple(REGISTRY)


def host(name: str) -> Host:
    """The host called ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"host must be one of {HOSTS}, got {name!r}") from None


def splitting() -> tuple[str, ...]:
    """The hosts whose loop counts ``max_iters`` (``text_feature_block``, ``snapshots``)."""
    return tuple(n for n, h in REGISTRY.items() if h.splits)


def update_budget(cfg: DragConfig) -> int:
    """The most latent updates a run of ``cfg`` can make (the length of its loss record)."""
    return host(cfg.host).update_budget(cfg)


def reached(cfg: DragConfig, state) -> jax.Array:
    """(B,) bool: every handle of each edit reached its target (the host's own flag)."""
    return host(cfg.host).reached(cfg, state)


def make_runner(nets: DragNetworks, cfg: DragConfig, progress=None, donate: bool = True):
    """jit(prepare_batch) and jit(run) for fixed networks/config and ``cfg.host``: ``(prep, loop)``
    with ``prep(shared, edits, z0, c0, handles0, targets, mask, keep, token_mask, clip_text, t_star,
    hypers[, sizes]) -> (inputs, state)`` and ``loop(shared, edits, inputs, state)``. The state
    buffers are donated. ``sizes`` (B, 4) int: each edit's valid sizes in a masked canvas
    (``DragInputs.sizes``)."""
    h = host(cfg.host)
    prep = jax.jit(lambda shared, edits, *a: jax.vmap(lambda e, *b: h.prepare(nets, cfg, shared, e, *b))(edits, *a))
    run = jax.jit(lambda shared, edits, inputs, state: h.run(nets, cfg, shared, edits, inputs, state, progress),
                  donate_argnums=(3,) if donate else ())
    return prep, run
