"""Buckets: a run's working shapes share a few masked canvases (``pipeline.buckets``), and a whole
edit computed in a shared canvas batch equals the per-shape edit (the tiny model)."""

import numpy as np
import pytest

import jaxdrag
from helpers import short_run, synthetic_image
from jaxdrag import EditRequest, EditSettings, LoRASettings
from jaxdrag.errors import SettingsError
from jaxdrag.pipeline.buckets import plan_buckets

FAST = EditSettings(lora=LoRASettings(steps=4))  # test_pipeline's standard setting: its programs are shared
ITERS = 4


def test_plan_buckets_caps_waste_and_count():
    shapes = [(341, 512)] * 3 + [(384, 512)] * 4 + [(512, 512)] * 2 + [(512, 341), (512, 384), (200, 512)]
    # exact rounding to 64 px: 341 → 384, 200 → 256
    plan = plan_buckets(shapes, step=64, max_waste=0.0, max_buckets=16)
    assert set(plan.canvases) == {(384, 512), (512, 512), (512, 384), (256, 512)}
    assert plan.canvas((341, 512)) == (384, 512)
    # a waste cap of 15 %: (256, 512) joins (384, 512) (adds 128·512 px for one edit), the portrait
    # shapes join (512, 512)
    plan = plan_buckets(shapes, step=64, max_waste=0.15, max_buckets=16)
    assert plan.waste(shapes) <= 0.15 and len(plan.canvases) < 4
    # a bucket cap forces merging past the waste cap: one canvas holding everything
    plan = plan_buckets(shapes, step=64, max_waste=0.0, max_buckets=1)
    assert plan.canvases == ((512, 512),)
    assert abs(plan.waste(shapes) - (1 - sum(h * w for h, w in shapes) / (12 * 512 * 512))) < 1e-12
    with pytest.raises(ValueError, match="max_waste"):
        plan_buckets(shapes, step=64, max_waste=1.0)


def test_bucket_settings_are_checked():
    with pytest.raises(SettingsError, match="buckets = 'some'"):
        EditSettings(buckets="some")
    with pytest.raises(SettingsError, match="bucket_waste"):
        EditSettings(bucket_waste=1.0)
    with pytest.raises(SettingsError, match="max_buckets"):
        EditSettings(max_buckets=0)


# ≈ 2–4 min each on 2 cores (three sets of stage programs): -m slow (the suite keeps the network,
# geometry and drag-loop canvas checks, tests/models/test_canvas.py and tests/drag/test_canvas_*.py)
SLOW = pytest.mark.slow


@pytest.mark.parametrize("method", [pytest.param("dragtext", marks=SLOW), pytest.param("gooddrag", marks=SLOW),
                                    pytest.param("dragnoise", marks=SLOW), pytest.param("freedrag", marks=SLOW),
                                    pytest.param("clipdrag", marks=SLOW)])
def test_two_shapes_in_one_canvas_batch_equal_their_per_shape_edits(tiny_pipe, method):
    """test_pipeline's 96×128 masked edit and its odd 77×100 input (working 98×128): with buckets
    they share one 128×128 canvas batch; each edit's iterations, handles and trajectory equal its
    per-shape run's and its image is within 1 grey level (DragText: the DragDiffusion host with the
    text embedding; GoodDrag's own denoise start, DragNoise's bottleneck, FreeDrag's line search and
    CLIPDrag's decoded CLIP input)."""
    img = synthetic_image(96, 128)
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[10:80, 20:110] = 1
    reqs = [EditRequest(img, [(40, 30), (60, 35), (80, 60), (70, 50)], "a colourful gradient", mask=mask, name="a"),
            EditRequest(synthetic_image(77, 100), [(40, 30), (60, 35)], "a gradient", name="b")]
    kw = short_run(method, ITERS)
    alone = [jaxdrag.edit_batch(tiny_pipe, [r], method, settings=FAST, **kw)[0] for r in reqs]
    shared = jaxdrag.edit_batch(tiny_pipe, reqs, method, settings=EditSettings(
        lora=LoRASettings(steps=4), buckets="auto", bucket_waste=0.5), **kw)
    for a, b in zip(alone, shared):
        assert b.config["canvas"] == [128, 128] and b.config["batch_edits"] == 2 and a.config["canvas"] is None
        assert a.iterations == b.iterations > 0
        np.testing.assert_array_equal(a.handles, b.handles)
        np.testing.assert_array_equal(a.trajectory, b.trajectory)
        assert a.image.shape == b.image.shape
        assert int(np.abs(a.image.astype(int) - b.image.astype(int)).max()) <= 1
        np.testing.assert_allclose(a.losses, b.losses, rtol=1e-4)
