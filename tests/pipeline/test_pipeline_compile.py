"""Compiling ahead: ``compile_for`` compiles every program a run needs without running an edit,
and ``edit_batch(compile_workers=…)`` compiles the next shape groups in threads while the current
one runs — the same programs, each compiled once, the same results.

Runs after test_pipeline.py (file order), whose 96×128 programs the persistent cache then holds;
the second shape (77×100, rounded to its working shape) is this file's own."""

import copy
import threading

import numpy as np

import jaxdrag
from jaxdrag import EditRequest, EditSettings, LoRASettings
from jaxdrag.pipeline import Stages, compile_for

FAST = EditSettings(lora=LoRASettings(steps=4))  # test_pipeline's setting
ITERS = 4


def _img(h, w, seed):
    y, x = np.mgrid[0:h, 0:w]
    r = np.random.default_rng(seed)
    return np.clip(np.stack([x * 255 / w, y * 255 / h, r.uniform(0, 255, (h, w))], -1), 0, 255).astype(np.uint8)


def _fresh(pipe):
    """The same networks with nothing compiled in memory (the persistent cache still serves)."""
    view = copy.copy(pipe)
    view.stages, view.jit_cache, view.jit_lock, view.lora_cache = Stages(), {}, threading.RLock(), None
    return view


REQS = [EditRequest(_img(96, 128, 1), [(30, 40), (50, 45)], "a gradient", name="a"),
        EditRequest(_img(77, 100, 2), [(20, 20), (40, 30)], "noise", name="b", seed=3)]


def test_compile_for_compiles_what_a_run_needs_and_runs_nothing(tiny_pipe):
    pipe = _fresh(tiny_pipe)
    rep = compile_for(pipe, REQS, "dragtext", settings=FAST, workers=2, max_iters=ITERS)
    assert rep["groups"] == 2 and rep["failed"] == {}
    # every stage of an edit, per group: text, encode, LoRA (encode + steps), invert, drag
    # (prepare + loop), denoise, decode; the text encoder's program serves both groups, and
    # the two working shapes (96×128, 98×128) share the 12×16 latent's denoise
    per_stage = dict(pipe.stages.compiles)
    assert rep["programs"] == sum(per_stage.values()) >= 14 and rep["compile_s"] > 0
    assert per_stage["drag"] == 2 and per_stage["decode"] == 2 and per_stage["text"] == 1, per_stage
    n = sum(pipe.stages.compiles.values())
    out = jaxdrag.edit_batch(pipe, REQS, "dragtext", settings=FAST, max_iters=ITERS)
    assert sum(pipe.stages.compiles.values()) == n  # nothing left to compile
    # compiling ahead in threads while the first group runs: each program once, same results
    pipe2 = _fresh(tiny_pipe)
    ahead = jaxdrag.edit_batch(pipe2, REQS, "dragtext", settings=FAST, max_iters=ITERS, compile_workers=2)
    assert dict(pipe2.stages.compiles) == per_stage
    for a, b in zip(out, ahead):
        np.testing.assert_array_equal(a.handles, b.handles)
        assert a.iterations == b.iterations
        np.testing.assert_array_equal(a.image, b.image)
