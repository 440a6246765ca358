"""The trained toy model (committed in weights/): it loads unchanged through the public loaders,
its documentation matches the generator, and real drags on it move the object by its drag and
keep it intact (thresholds from the measurements recorded in weights/toy-sd15/README.md, with
margin). DragDiffusion runs on the demo task once (module fixture) and DragText is the README's
demo command run once for the session (conftest's ``readme_demo``); the tests assert on those."""

import json

import numpy as np
import pytest

import jaxdrag
from jaxdrag.toy import bench, toy_paths, world

PATHS = toy_paths()
needs_toy = pytest.mark.skipif(PATHS is None, reason="trained toy model not present in weights/")

# measured on the committed weights (2026-12-01, session 2; weights/toy-sd15/README.md "The demo"):
# held-out VAE PSNR 32.1 dB; the demo drag (20 px right) with DragText's defaults moved the disc
# (7.9, 2.0) px, relative error 0.61, IoU 0.32, intact, background 34.5 dB (session 1: DragDiffusion
# (7.6, 3.6) px, 0.64, IoU 0.31, 33.9 dB; DragText (7.8, 3.5) px, 0.64, 33.2 dB). The goal (error ≤ 25 % of the drag) is not
# met yet; these thresholds keep a margin from what the model does, so a regression fails them.
VAE_PSNR_MIN = 29.0
DEMO_MOVED_X_MIN = 5.0
DEMO_REL_ERROR_MAX = 0.8
DEMO_IOU_MIN = 0.2
DEMO_BG_PSNR_MIN = 31.0
DRAGTEXT_MARGIN = 0.1          # DragText no worse than DragDiffusion by more than this (relative error)


@needs_toy
def test_world_doc_next_to_the_weights_matches_the_generator():
    assert (PATHS[0] / "WORLD.md").read_text() == world.world_markdown()
    info = json.loads((PATHS[0] / "model_index.json").read_text())["jaxdrag_toy"]
    assert info["world_version"] == world.VERSION


@pytest.fixture(scope="module")
def toy_pipe():
    pipe = jaxdrag.load_pipeline(PATHS[0], clip=PATHS[1], dtype="float32")
    pipe.enable_lora_cache()
    yield pipe
    pipe.lora_cache = None


@needs_toy
def test_toy_model_loads_in_the_real_formats(toy_pipe):
    pipe = toy_pipe
    assert pipe.native_width == 128
    assert pipe.sd.unet.cfg.block_out_channels == (32, 64, 64, 64)
    info = json.loads((PATHS[0] / "model_index.json").read_text())["jaxdrag_toy"]
    assert info["steps"]["unet"] > 0 and abs(info["scaling_factor"] - pipe.scaling_factor) < 1e-6
    # the VAE reconstructs held-out scenes (threshold below the measured mean)
    from jaxdrag.toy.quality import vae_psnr

    ps = vae_psnr(pipe, n=16)
    assert ps.mean() > VAE_PSNR_MIN, ps


@pytest.fixture(scope="module")
def demo_edits(toy_pipe, readme_demo):
    """The demo drag with DragDiffusion's and DragText's defaults (LoRA 80 steps, 80 iterations):
    {method: (result or report, metrics)}. DragDiffusion runs here; DragText is the README's
    ``jaxdrag demo`` (the session's ``readme_demo``: its default method on the same task)."""
    from PIL import Image

    t = bench.demo_task()
    res = jaxdrag.edit(toy_pipe, t.image, t.points, t.prompt, mask=t.mask, method="dragdiffusion")
    _, demo_out = readme_demo
    rep = json.loads((demo_out / "report.json").read_text())
    rep["image"] = np.asarray(Image.open(demo_out / "edited.png").convert("RGB"))
    return {"dragdiffusion": (res, bench.measure(t, res.image)), "dragtext": (rep, bench.measure(t, rep["image"]))}


@needs_toy
def test_drag_moves_the_object_by_its_drag_and_keeps_it(demo_edits):
    """DragDiffusion moves the red disc right — the dragged direction, not along y (a swapped x/y or
    a wrong sign fails) — with its area and its spot kept, and the background outside the mask
    kept."""
    res, m = demo_edits["dragdiffusion"]
    o = m["objects"][0]
    assert o["moved"][0] > DEMO_MOVED_X_MIN and abs(o["moved"][1]) < o["moved"][0], m
    assert m["rel_error"] <= DEMO_REL_ERROR_MAX, m
    assert o["survived"] and o["spot_found"] and m["spot_error"] < DEMO_REL_ERROR_MAX * o["length"], m
    assert m["iou"] > DEMO_IOU_MIN, m
    assert m["bg_psnr"] > DEMO_BG_PSNR_MIN, m
    # the tracked handle moved towards its target
    assert res.iterations > 0
    assert np.hypot(*(res.handles[0] - res.targets[0])) < np.hypot(*(res.initial_handles[0] - res.targets[0])) - 2


@needs_toy
def test_dragtext_on_the_same_drag(demo_edits):
    """DragText on the same task and the same LoRA: no worse than DragDiffusion, the object intact,
    the background kept (its text embedding changes, so the image differs from DragDiffusion's)."""
    (dd, m_dd), (dt, m) = demo_edits["dragdiffusion"], demo_edits["dragtext"]
    assert dt["config"]["method"] == "dragtext"
    # the same LoRA (same image, prompt, seed, settings), trained in another process
    assert abs(dt["config"]["lora_final_loss"] - dd.config["lora_final_loss"]) < 1e-6
    assert m["rel_error"] <= min(DEMO_REL_ERROR_MAX, m_dd["rel_error"] + DRAGTEXT_MARGIN), (m, m_dd)
    assert m["objects"][0]["survived"] and m["objects"][0]["moved"][0] > DEMO_MOVED_X_MIN, m
    assert m["bg_psnr"] > DEMO_BG_PSNR_MIN, m
    assert np.abs(dt["image"].astype(int) - dd.image.astype(int)).mean() > 0.05


@needs_toy
def test_the_caption_steers_colour_and_shape_not_position(toy_pipe):
    """At the drag's timestep (681) the committed model's clean-image prediction follows the caption's
    objects (empty caption: 0.48 of x̂_0's spread on 16 tasks, another scene's caption: 0.40) and
    hardly its position words (the moved scene's caption: 0.012) — measured 2026-12-07, the reason
    DragText's text variable finds no layout to release on this model (weights/toy-sd15/README.md,
    "Session 4"). Four tasks here; thresholds with margin."""
    from jaxdrag.toy.diagnose import text_sensitivity

    r = text_sensitivity(toy_pipe, bench.make_tasks(4), timesteps=(681,))[681]
    assert r["empty"] > 0.25 and r["other_caption"] > 0.2, r
    assert r["moved_caption"] < 0.05, r
