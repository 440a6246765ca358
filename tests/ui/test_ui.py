"""The UI's server side without a browser: points, masks and messages (canvas), the settings
panel (settings), the batching queue with a stand-in ``edit_batch`` (batcher), and the page's
handlers on a stand-in pipeline (app). The browser test is tests/ui/test_ui_browser.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from jaxdrag.data import EditRequest, EditResult, Generation, RequestError
from jaxdrag.errors import SettingsError
from jaxdrag.ui import canvas
from jaxdrag.ui import settings as ui_settings
from jaxdrag.ui.batcher import EditQueue

# ----------------------------------------------------------------------------------------------
# canvas


def test_editor_value_to_image_and_mask():
    bg = np.zeros((6, 8, 4), np.uint8)
    bg[..., :3] = 100
    bg[..., 3] = 255
    bg[0, 0] = (200, 0, 0, 0)  # transparent → white
    l1 = np.zeros((6, 8, 4), np.uint8)
    l1[1, 2, 3] = 153
    l2 = np.zeros((6, 8, 4), np.uint8)
    l2[4, 5] = (255, 255, 255, 255)
    image, mask = canvas.from_editor({"background": bg, "layers": [l1, l2], "composite": None})
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    assert image[1, 1].tolist() == [100, 100, 100] and image[0, 0].tolist() == [255, 255, 255]
    assert mask.dtype == bool and mask.sum() == 2 and mask[1, 2] and mask[4, 5]
    # nothing painted: no mask; no background: nothing at all
    assert canvas.from_editor({"background": bg, "layers": [np.zeros_like(l1)]})[1] is None
    assert canvas.from_editor({"background": None, "layers": []}) == (None, None)
    with pytest.raises(canvas.InputError, match=r"mask layers differ in size \(8×6 and 4×3\)"):
        canvas.from_editor({"background": bg, "layers": [l1, np.zeros((3, 4, 4), np.uint8)]})


def test_mask_from_file():
    a = np.zeros((4, 5), np.uint8)
    a[1, 1], a[2, 2] = 255, 100
    assert canvas.mask_from_file(a).sum() == 1
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[0, 0, 3] = 255
    assert canvas.mask_from_file(rgba).tolist() == (rgba[..., 3] > 127).tolist()


def test_clicks_map_to_image_pixels():
    assert canvas.display_scale((128, 128)) == 4
    assert canvas.display_scale((100, 300)) == 6  # the shorter side reaches 512
    assert canvas.display_scale((600, 800)) == 1
    # a click anywhere inside the 4×4 block of pixel (40, 72) in the 4× view
    for dx in range(4):
        assert canvas.click_to_pixel((160 + dx, 291), 4, (128, 128)) == [40, 72]
    assert canvas.click_to_pixel((9999, -3), 4, (128, 96)) == [95, 0]  # clamped
    pts = canvas.add_point(canvas.add_point([], [40, 72]), [68, 72])
    assert pts == [[40, 72], [68, 72]] and canvas.undo_point(pts) == [[40, 72]]
    assert canvas.describe_points(pts) == "1: handle (40, 72) → target (68, 72)"
    assert canvas.describe_points(pts + [[1, 2]]).endswith("2: handle (1, 2) → click its target")
    assert canvas.describe_points([]).startswith("no points")


def test_points_view_draws_handles_targets_and_mask():
    img = np.full((32, 48, 3), 200, np.uint8)
    mask = np.zeros((32, 48), bool)
    mask[:, :24] = True
    view = canvas.draw_points(img, mask, [[4, 16], [20, 16], [40, 4]], scale=4)
    assert view.shape == (128, 192, 3) and view.dtype == np.uint8
    assert view[16 * 4 + 2, 4 * 4 + 2].tolist() == [230, 0, 0]  # handle: red
    assert view[16 * 4 + 2, 20 * 4 + 2].tolist() == [0, 90, 255]  # target: blue
    assert view[4 * 4 + 2, 40 * 4 + 2].tolist() == [230, 0, 0]  # a handle waiting for its target
    assert view[120, 4].tolist() == [200, 200, 200]  # editable: as is
    assert view[120, 150].tolist() == [110, 110, 110]  # outside the mask: dimmed (0.55)


def test_input_messages():
    img = np.zeros((64, 80, 3), np.uint8)
    cases = [
        ((None, None, [[1, 1], [2, 2]]), "no image: upload one, pick a sample or generate one"),
        ((img, None, []), "no points: click a handle on the image, then the target it should move to"),
        ((img, None, [[1, 1], [2, 2], [30, 40]]),
         "point 3 (a handle at (30, 40)) has no target: click its target, or undo it"),
        ((img, np.zeros((32, 32), bool), [[1, 1], [2, 2]]),
         "the mask is 32×32 but the image is 80×64: draw the mask on this image or load a mask of its size"),
        ((img, None, [[1, 1], [80, 2]]), "point 2 (80, 2) is outside the 80×64 image"),
    ]
    for args, message in cases:
        with pytest.raises(canvas.InputError) as e:
            canvas.check_inputs(*args)
        assert str(e.value) == message
    canvas.check_inputs(img, np.ones((64, 80), bool), [[1, 1], [79, 63]])


# ----------------------------------------------------------------------------------------------
# settings panel


def test_settings_defaults_per_method():
    assert ui_settings.defaults("dragtext") == {
        "lora_steps": 80, "inversion_strength": 0.7, "max_iters": 80, "latent_lr": 0.01, "lam": 0.1,
        "text_lr": 0.004, "text_lam": 0.1, "fuse_weight": None}
    g = ui_settings.defaults("gooddrag")
    assert (g["lora_steps"], g["inversion_strength"], g["max_iters"], g["latent_lr"], g["text_lr"]) == \
        (70, 0.75, None, 0.02, None)
    assert ui_settings.defaults("clipdrag")["fuse_weight"] == pytest.approx(0.7)
    assert ui_settings.defaults("freedrag")["max_iters"] == 300


def test_settings_split_into_pipeline_overrides_and_hypers():
    texts = {"lora_steps": "2", "inversion_strength": "", "max_iters": "3", "latent_lr": "0.02", "lam": " ",
             "text_lr": "0.01", "text_lam": "", "fuse_weight": "0.5"}
    pipe, overrides, hypers = ui_settings.split("dragtext", texts, "r_m=2, tracking=fast\nms_reference=initial")
    assert pipe == {"lora_steps": 2}
    assert overrides == {"max_iters": 3, "r_m": 2, "tracking": "fast", "ms_reference": "initial"}
    assert hypers == {"latent_lr": 0.02, "text_lr": 0.01}  # fuse_weight: not read by dragtext, ignored
    # GoodDrag has no max_iters: the field is ignored there
    assert ui_settings.split("gooddrag", {"max_iters": "3"})[1] == {}
    bad = [
        ({"latent_lr": "abc"}, "", "setting latent learning rate = 'abc': must be a number (or empty for the "
                                   "method's default)"),
        ({"max_iters": "2.5"}, "", "setting max iterations = 2.5: must be a whole number"),
        ({"latent_lr": "-1"}, "", "latent_lr"),
        ({}, "r_m", "more settings: 'r_m' is not key=value"),
        ({}, "d_max=3", "more settings: 'd_max' is not a setting of dragtext; valid: r_m, "),
    ]
    for texts, extra, message in bad:
        with pytest.raises(SettingsError) as e:
            ui_settings.split("dragtext", texts, extra)
        assert message in str(e.value)


# ----------------------------------------------------------------------------------------------
# the batching queue (a stand-in edit_batch records its calls)


def _request(name="a", points=((10, 10), (20, 10)), **kw):
    return EditRequest(image=np.zeros((32, 32, 3), np.uint8), points=[list(p) for p in points], prompt="p",
                       name=name, **kw)


def _result(req: EditRequest) -> EditResult:
    pts = np.asarray(req.points, np.float64)
    h, t = pts[0::2], pts[1::2]
    return EditResult(name=req.name, image=np.full(req.image.shape, 7, np.uint8), handles=t, targets=t,
                      initial_handles=h, trajectory=np.stack([h, t]), iterations=2, reached=True,
                      losses=[1.0, 0.5], timings={"lora": 0.0}, config={})


class FakeRun:
    """Stands in for edit_batch: records (names, method, settings, overrides), reports progress."""

    def __init__(self, fail=None, delay=0.0):
        self.calls, self.fail, self.delay = [], fail, delay

    def __call__(self, pipe, requests, method, *, settings, progress, on_error, **overrides):
        self.calls.append(([r.name for r in requests], method, settings, overrides))
        progress("drag", 1, 3)
        time.sleep(self.delay)
        if self.fail is not None:
            exc = self.fail(requests)
            if exc is not None:
                raise exc
        return [_result(r) for r in requests]


def test_queue_batches_jobs_of_several_sessions():
    run = FakeRun(delay=0.2)
    q = EditQueue(None, run=run, window_s=0.5, max_batch=8)
    try:
        jobs = []
        threads = [threading.Thread(target=lambda n=n: jobs.append(q.submit(_request(n), "dragtext", "S",
                                                                            {"max_iters": 3})))
                   for n in ("a", "b", "c")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(j.wait(10) for j in jobs)
        assert len(run.calls) == 1 and sorted(run.calls[0][0]) == ["a", "b", "c"]
        assert run.calls[0][1:] == ("dragtext", "S", {"max_iters": 3})
        for j in jobs:
            assert j.error is None and j.result.name == j.request.name and j.batch_edits == 3
            assert j.stage == ("drag", 1, 3)
        # other compile-time settings or another method: separate calls; continuous hypers: shared
        j1 = q.submit(_request("d", hypers={"latent_lr": 0.02}), "dragtext", "S", {"max_iters": 3})
        j2 = q.submit(_request("e"), "dragtext", "S", {"max_iters": 4})
        j3 = q.submit(_request("f"), "clipdrag", "S", {})
        j4 = q.submit(_request("g", hypers={"latent_lr": 0.05}), "dragtext", "S", {"max_iters": 3})
        assert all(j.wait(10) for j in (j1, j2, j3, j4))
        assert [c[0] for c in run.calls[1:]] == [["d", "g"], ["e"], ["f"]]
        assert q.batches == [3, 2, 1, 1]
    finally:
        q.close()


def test_queue_checks_requests_and_survives_failures():
    def fail(requests):
        names = [r.name for r in requests]
        if "bad" in names and len(names) > 1:
            return RequestError("bad: its fault")
        if names == ["bad"]:
            return RequestError("bad: its fault")
        if names == ["boom"]:
            return RuntimeError("device lost")
        return None

    run = FakeRun(fail=fail)
    q = EditQueue(None, run=run, window_s=0.3, max_batch=8, log=lambda s: None)
    try:
        with pytest.raises(RequestError, match=r"x: point 0 \(handle of pair 0\) at \(x=99, y=10\) is outside"):
            q.submit(_request("x", points=((99, 10), (20, 10))), "dragtext", "S")
        with pytest.raises(SettingsError, match="max_iters"):
            q.submit(_request("x"), "dragtext", "S", {"max_iters": -1})
        good, bad = q.submit(_request("good"), "dragtext", "S"), q.submit(_request("bad"), "dragtext", "S")
        assert good.wait(10) and bad.wait(10)
        assert good.result is not None and good.error is None
        assert bad.result is None and bad.error == "bad: its fault"
        boom = q.submit(_request("boom"), "dragtext", "S")
        assert boom.wait(10) and boom.error == "RuntimeError: device lost"
        after = q.submit(_request("after"), "dragtext", "S")  # the worker keeps serving
        assert after.wait(10) and after.result is not None
    finally:
        q.close()


# ----------------------------------------------------------------------------------------------
# the page's handlers on a stand-in pipeline

gr = pytest.importorskip("gradio")


class FakePipe:
    native_width = 128

    def __init__(self):
        self.sd = SimpleNamespace(source="fake-model")
        self.lora_cache = None

    def enable_lora_cache(self, enabled=True):
        self.lora_cache = {} if enabled else None

    def vae_levels(self):  # SD's factor 8 and 3 UNet downsamplers: a 64-px canvas step
        return 3

    def unet_levels(self):
        return 3

    def generate(self, prompts, *, seed=0, guidance_scale=7.5, hw=None):
        h, w = hw
        return np.full((len(prompts), h, w, 3), 40 + seed, np.uint8), None


SETTINGS_TEXT = {"lora_steps": "2", "inversion_strength": "", "max_iters": "3", "latent_lr": "", "lam": "",
                 "text_lr": "", "text_lam": "", "fuse_weight": ""}


def _run_args(app, s, interpolate=False, prompt="a red disc"):
    return (s, prompt, "", "dragtext", *[SETTINGS_TEXT[k] for k in ui_settings.KEYS], "", 0, interpolate)


@pytest.fixture
def app(tmp_path):
    from jaxdrag.ui.app import App

    run = FakeRun()

    def run_with_interpolation(pipe, requests, method, *, settings, progress, on_error, **overrides):
        out = run(pipe, requests, method, settings=settings, progress=progress, on_error=on_error, **overrides)
        for r in out:
            r.interpolation = [(a, np.full(r.image.shape, int(a * 100), np.uint8)) for a in settings.interpolation]
        return out

    a = App(FakePipe(), out=tmp_path / "ui_out", window_s=0.05, run=run_with_interpolation)
    a.fake_run = run
    yield a
    a.queue.close()


def test_app_starts_on_the_toy_demo_with_a_lora_cache(app):
    from jaxdrag.ui.app import _mask, _session

    assert app.pipe.lora_cache == {}
    assert app.choices[0].label.startswith("toy: demo") and len(app.choices) == 11
    s = _session(app.first)
    assert s["points"] == [[33, 69], [53, 69]] and _mask(s).shape == (128, 128) and _mask(s).any()
    view, text = app.points_view(s)
    assert view.shape == (512, 512, 3) and text == "1: handle (33, 69) → target (53, 69)"
    for c in app.choices:  # every sample loads
        value, prompt, _, view, text, ns, status = app.load_sample(c.label, s)
        assert value["background"].shape == (128, 128, 3) and prompt and status.startswith("loaded")


def test_app_bad_input_shows_one_line_and_runs_nothing(app):
    from jaxdrag.ui.app import _session

    s = {**_session(app.first), "points": []}
    out = app.run(*_run_args(app, s))
    assert "no points: click a handle" in out[5] and out[6] is s
    s = {**s, "points": [[40, 72]]}
    assert "point 1 (a handle at (40, 72)) has no target" in app.run(*_run_args(app, s))[5]
    s = {**s, "points": [[40, 72], [68, 72]]}
    bad = list(_run_args(app, s))
    bad[4 + ui_settings.KEYS.index("max_iters")] = "lots"
    assert "setting max iterations = 'lots': must be a number" in app.run(*bad)[5]
    view, text, s2, status = app.load_mask(np.zeros((64, 48), np.uint8), s)
    assert "the mask file is 48×64 but the image is 128×128" in status and s2 is s
    assert app.fake_run.calls == []
    # an unknown sample or a click before any image: messages too
    assert "no sample named" in app.load_sample("nope", s)[-1]
    assert "no image" in app.on_click(_session(), (3, 3))[-1]


def test_app_run_saves_and_shows_the_result(app):
    from jaxdrag.ui.app import _session

    s = _session(app.first)
    view, text, s, status = app.on_click({**s, "points": []}, (40 * 4 + 1, 72 * 4 + 3))
    view, text, s, status = app.on_click(s, (60 * 4, 70 * 4))
    assert s["points"] == [[40, 72], [60, 70]]
    result, overlay, sbs, files, slider, status, ns = app.run(*_run_args(app, s, interpolate=True))
    assert status.startswith("done in") and "batch of 1" in status and "cached LoRA" in status
    names, method, settings, overrides = app.fake_run.calls[0]
    assert method == "dragtext" and overrides == {"max_iters": 3} and settings.lora.steps == 2
    assert settings.interpolation == ui_settings.INTERPOLATION
    assert result.shape == (512, 512, 3) and overlay.shape == (512, 512, 3) and sbs.shape[0] == 384
    got = sorted(p.rsplit("/", 1)[1] for p in files)
    assert got == ["edited.png", "input.png", "interpolation.png", "overlay.png", "report.json", "side_by_side.png"]
    assert np.asarray(Image.open([p for p in files if p.endswith("input.png")][0])).tolist() == \
        app.first.image.tolist()
    assert slider.visible is True and (slider.minimum, slider.maximum, slider.step) == (0.0, 1.5, 0.25)
    # the interpolation slider: the nearest α's image, upscaled like the result
    assert app.on_alpha(0.3, ns)[0, 0, 0] == 25 and app.on_alpha(1.5, ns).shape == (512, 512, 3)
    assert ns["run"] == 1


def test_app_generate_then_edit_the_generation(app):
    from jaxdrag.ui.app import _session

    value, prompt, edit_prompt, view, text, s, status = app.generate("a blue square", 3, 2.0, _session())
    assert prompt == "a blue square" and edit_prompt == ""
    assert value["background"].shape == (128, 128, 3) and value["background"][0, 0, 0] == 43
    assert s["generation"] == Generation(seed=3, guidance_scale=2.0) and status.startswith("generated")
    s = {**s, "points": [[10, 10], [20, 10]]}
    req, settings, overrides = app.build_request(s, "a blue square", "", "dragtext", SETTINGS_TEXT, "", 0, False)
    assert req.image is None and req.generation == Generation(seed=3, guidance_scale=2.0)
    # the page's edits share canvases: sizes rounded up to the canvas step, no merging
    assert settings.buckets == "fixed"
    # a bad spec: a message, no image
    assert "guidance_scale must be a number ≥ 1" in app.generate("x", 0, 0.5, _session())[-1]
    assert "must be numbers" in app.generate("x", None, 7.5, _session())[-1]
    assert "write the prompt" in app.generate("", 0, 7.5, _session())[-1]
    # the editor handing back the same image keeps the generation; a new upload drops it
    same = {"background": np.concatenate([s["image"], np.full((128, 128, 1), 255, np.uint8)], -1), "layers": []}
    assert app.on_editor(same, s) is None  # nothing changed: nothing written (a later click stays)
    painted = np.zeros((128, 128, 4), np.uint8)
    painted[40:60, 40:60] = 255
    *_, s2, _, new = app.on_editor({**same, "layers": [painted]}, s)
    assert not new and s2["generation"] is not None and s2["points"] == s["points"]
    assert s2["painted"].sum() == 400
    other = {"background": np.zeros((128, 128, 3), np.uint8), "layers": []}
    *_, s3, status, new = app.on_editor(other, s)
    assert new and s3["generation"] is None and s3["points"] == [] and "new image" in status


def test_ui_command_rejects_bad_options(tmp_path, capsys):
    from jaxdrag.cli import main

    for argv, message in ((["--samples", str(tmp_path / "none")], f"--samples {tmp_path / 'none'}: not a folder"),
                          (["--method", "dragwhat"], "--method 'dragwhat': choose one of dragdiffusion, "),
                          (["--max-batch", "0"], "--max-batch 0: must be ≥ 1"),
                          (["--batch-window", "-1"], "--batch-window -1.0: must be ≥ 0 seconds"),
                          (["--port", "70000"], "--port 70000: must be in 1…65535")):
        assert main(["ui", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_warm_up_compiles_every_canvas_of_the_default_method_in_the_background(app):
    """At start-up the page compiles, in a thread, the default method's programs for the first
    sample's canvas and the common aspect ratios' — the requests a click on Run with the default
    fields would make, in fixed buckets; a failure is one logged line."""
    calls, logs = [], []

    def fake_compile(pipe, reqs, method, *, settings, workers, progress, **overrides):
        calls.append((reqs[0].image.shape[:2], method, settings.buckets, len(reqs[0].points), overrides))

    assert app.warm_shapes() == [(128, 128), (192, 128)]  # toy model: 96 → 128, 128, 171 → 192 rows
    app.warm_up(fake_compile, logs.append).join(10)
    assert [c[0] for c in calls] == [(128, 128), (192, 128)]
    assert all(c[1] == app.default_method and c[2] == "fixed" and c[3] == 2 for c in calls)
    assert logs[-1].startswith(f"compiled the {app.default_method} programs of 2 canvas(es)")

    def broken(*a, **k):
        raise RuntimeError("no memory")
    app.warm_up(broken, logs.append).join(10)
    assert logs[-1] == "start-up compile failed (RuntimeError: no memory); edits compile when first run"
