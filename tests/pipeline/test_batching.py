"""Batch runs: fixed shapes (padded batches and handle slots, one program per stage and working
shape), released programs, the library's compilation cache, progress reporting and result files."""

import os
import stat

import numpy as np
import pytest

import jaxdrag
from jaxdrag import EditRequest, EditSettings, LoRASettings
from jaxdrag.data import write_result
from jaxdrag.pipeline import pow2_bucket
from helpers import synthetic_image as synthetic

FAST = EditSettings(lora=LoRASettings(steps=4))
ITERS = 4


def test_pow2_bucket():
    assert [pow2_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]


def test_partial_batches_and_handle_counts_share_one_program(tiny_pipe):
    """Five edits of one shape with 1, 2 or 3 pairs at batch size 4: two batches (4 + 1 padded to
    4), handle slots padded to 4 — every stage compiles at most once, results come back in
    order with their own handle counts, and dummy edits produce nothing."""
    pairs = [1, 2, 3, 1, 2]
    reqs = []
    for i, n in enumerate(pairs):
        pts = [p for k in range(n) for p in ((20 + 30 * k, 30), (28 + 30 * k, 36))]
        reqs.append(EditRequest(synthetic(96, 128, i), pts, "a gradient", name=f"e{i}", seed=i))
    before = dict(tiny_pipe.stages.compiles)
    seen = []
    out = jaxdrag.edit_batch(tiny_pipe, reqs, "dragdiffusion", settings=EditSettings(lora=LoRASettings(steps=4),
                                                                                     batch_size=4),
                             max_iters=ITERS, on_result=lambda i, r: seen.append(i))
    new = {k: v - before.get(k, 0) for k, v in tiny_pipe.stages.compiles.items()}
    assert all(v <= 1 for v in new.values()), new
    # the drag loop with 4 handle slots is this test's own (other stages may already exist at batch 4,
    # e.g. from test_pipeline's batch of three, padded to four: the test must not depend on the order)
    assert new.get("drag", 0) == 1
    assert sorted(seen) == list(range(5))
    assert [r.name for r in out] == [f"e{i}" for i in range(5)]
    assert [len(r.handles) for r in out] == pairs
    assert all(r.config["batch_size"] == 4 for r in out)
    assert [r.config["batch_edits"] for r in out] == [4, 4, 4, 4, 1]


def test_a_failing_batch_is_reported_and_the_rest_run(tiny_pipe, monkeypatch):
    import jaxdrag.pipeline.group as pl  # the room that runs one batch

    real = pl.run_group
    calls = []

    def flaky(pipe, group, *a, **k):
        calls.append(len(group))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(pipe, group, *a, **k)

    monkeypatch.setattr(pl, "run_group", flaky)
    reqs = [EditRequest(synthetic(96, 128, 7), [(20, 30), (28, 36)], name="a"),
            EditRequest(synthetic(128, 128, 8)[:96], [(20, 30), (28, 36)], name="b")]
    errors = []
    st = EditSettings(lora=LoRASettings(steps=4), batch_size=1)
    out = jaxdrag.edit_batch(tiny_pipe, reqs, "dragdiffusion", settings=st, max_iters=ITERS,
                             on_error=lambda idx, e: errors.append((idx, str(e))))
    assert errors == [([0], "boom")] and out[0] is None and out[1].name == "b"
    with pytest.raises(RuntimeError, match="boom"):  # without on_error the exception propagates
        calls.clear()
        jaxdrag.edit_batch(tiny_pipe, reqs[:1], "dragdiffusion", settings=st, max_iters=ITERS)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_released_programs_free_their_memory_mappings(tiny_models):
    """Every CPU executable maps its code (~140 mappings for the tiny model's stages, of the
    kernel's 65530): a long run must drop programs it no longer needs."""
    import jax.numpy as jnp

    def maps():
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)

    pipe = jaxdrag.load_pipeline(tiny_models[0], dtype="float32")
    m0 = maps()
    for h in (40, 48, 56, 64):
        pipe.decode_to_uint8(pipe.encode_images(jnp.zeros((1, h, 64, 3))), (h, 64))
    grown = maps() - m0
    assert pipe.stages.live == 8 and grown > 8 * 20
    pipe.release_compiled()
    assert pipe.stages.live == 0 and maps() - m0 < grown / 4


def test_progress_reaches_every_run(tiny_pipe, monkeypatch):
    """The compiled drag loop is cached, its progress callback is not: a second run's bar moves."""
    import tqdm

    bars = []

    class Bar:
        def __init__(self, total=None, desc="", **k):
            self.n, self.total, self.desc = 0, total, desc
            bars.append(self)

        def update(self, k=1):
            self.n += k

        def refresh(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    for seed in (1, 2):
        r = jaxdrag.edit(tiny_pipe, synthetic(96, 128, seed), [(20, 20), (60, 40)], "x", method="dragdiffusion",
                         settings=FAST, max_iters=ITERS, progress=True)
        drag = [b for b in bars if b.desc.startswith("drag")][-1]
        assert r.iterations > 0 and drag.n == r.iterations, (drag.n, r.iterations)
    # a callable gets (stage, done, total) per stage (the UI's progress bar); the same programs
    events = []
    r = jaxdrag.edit(tiny_pipe, synthetic(96, 128, 4), [(20, 20), (60, 40)], "x", method="dragdiffusion",
                     settings=FAST, max_iters=ITERS, progress=lambda *e: events.append(e))
    steps = FAST.lora.steps
    assert [e for e in events if e[0] == "lora"][0] == ("lora", 0, steps)
    assert [e for e in events if e[0] == "lora"][-1] == ("lora", steps, steps)
    drag = [e for e in events if e[0] == "drag"]
    assert drag[0] == ("drag", 0, ITERS) and drag[-1] == ("drag", r.iterations, ITERS)
    assert [e for e in events if e[0] == "denoise"] == [("denoise", 0, 1), ("denoise", 1, 1)]
    assert [e[0] for e in events] == sorted((e[0] for e in events), key=["lora", "drag", "denoise"].index)


def test_results_are_written_with_usual_permissions(tiny_pipe, tmp_path):
    r = jaxdrag.edit(tiny_pipe, synthetic(96, 128, 3), [(20, 20), (40, 30)], "x", method="dragdiffusion",
                     settings=FAST, max_iters=ITERS)
    write_result(r, tmp_path / "r")
    umask = os.umask(0)
    os.umask(umask)
    for f in ("edited.png", "overlay.png", "report.json"):
        assert stat.S_IMODE((tmp_path / "r" / f).stat().st_mode) == 0o666 & ~umask


def test_library_compilation_cache(tmp_path, monkeypatch):
    import jax

    from jaxdrag import xla_cache

    monkeypatch.setenv("JAXDRAG_COMPILE_CACHE", "0")
    assert xla_cache.enable(tmp_path / "c") is None
    monkeypatch.setenv("JAXDRAG_COMPILE_CACHE", "1")
    old = jax.config.jax_compilation_cache_dir
    try:
        assert old  # the test session's cache (conftest) is kept when no directory is asked for
        assert xla_cache.enable() == type(xla_cache.default_dir())(old)
        assert xla_cache.enable(tmp_path / "c") == tmp_path / "c" and (tmp_path / "c").is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    finally:
        jax.config.update("jax_compilation_cache_dir", old)


def test_auto_batch_size_from_compiled_memory(tiny_pipe, monkeypatch):
    """``batch_size="auto"``: every stage compiled at batch 1, its memory split into weights and
    a per-edit part; the batch is what fits the device's memory (here a pretend device with room
    for the weights and 3.5 edits of the most demanding stage → 3)."""
    from jaxdrag.data import prepare
    from jaxdrag.drag.methods import resolve
    from jaxdrag.pipeline import plan_batch

    req = EditRequest(synthetic(96, 128, 1), [(20, 20), (60, 40)], "x")
    st = EditSettings(lora=LoRASettings(steps=4), batch_size="auto")
    cfg, hyp = resolve("dragdiffusion", max_iters=ITERS)
    p = prepare(req, 128, 128)
    b, measured = plan_batch(tiny_pipe, p, st, cfg, hyp, 1)
    assert {"lora", "invert", "drag", "denoise", "decode"} <= set(measured)
    per_edit = max(m["edit"] for m in measured.values())
    assert measured["lora"]["edit"] > measured["decode"]["edit"] > 0
    assert b * per_edit <= st.memory_fraction * tiny_pipe.device_memory()
    for edits, expect in ((3.5, 3), (1.5, 1)):
        room = tiny_pipe.weight_bytes() + edits * per_edit
        monkeypatch.setattr(type(tiny_pipe), "device_memory", lambda self, r=room: int(r / st.memory_fraction))
        assert plan_batch(tiny_pipe, p, st, cfg, hyp, 1)[0] == expect
    assert tiny_pipe.stages.measured is None and tiny_pipe.lora_cache is None
    # room for 1.5 edits: two requests run as two batches of one (the batch-1 programs just measured)
    out = jaxdrag.edit_batch(tiny_pipe, [req] * 2, "dragdiffusion", settings=st, max_iters=ITERS)
    assert [r.config["batch_size"] for r in out] == [1, 1]
    assert np.isfinite(out[0].losses).all() and out[0].image.shape == (96, 128, 3)
