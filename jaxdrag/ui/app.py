"""The Gradio app: image and mask (left), points to click (middle), result (right), prompts and
method settings below, Run. Handlers are thin: they turn the page's values into requests
(``canvas``, ``settings``), hand them to the batching queue (``batcher``) and turn results into
images and files; any input they cannot run becomes one line in the status box, never a
traceback, and the server keeps serving."""

from __future__ import annotations

import json
import re
import threading
import time
import traceback
from pathlib import Path
from typing import Sequence

import gradio as gr
import numpy as np
from PIL import Image

from ..data import EditRequest, Generation, RequestError, result_overlay, side_by_side, write_result
from ..drag.methods import METHODS
from ..errors import SettingsError
from . import canvas
from . import settings as ui_settings
from .batcher import EditQueue
from .samples import Choice, folder_choices, toy_choices

CSS = """
#status { min-height: 2.5em; }
#status.error p, #status .error { color: #b00020; }
"""


def _same_image(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """The editor hands back its background re-encoded by the browser: equal shape and colours
    within 2 levels on average mean the same image (then the exact one kept here is used)."""
    if a is None or b is None or a.shape != b.shape:
        return False
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16)))) < 2.0


def _same_mask(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Two painted masks (None: nothing painted) mark the same pixels."""
    if a is None or b is None:
        return (a is None or not a.any()) and (b is None or not b.any())
    return a.shape == b.shape and bool(np.array_equal(a, b))


def _shown(v) -> str:
    """A settings field's text: the number, or empty where the method does not read it."""
    return "" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _error(msg: str) -> str:
    return f"<span class='error'>⚠ {msg}</span>"


def _session(request: EditRequest | None = None) -> dict:
    """A browser session's state: the image being edited (exact, as loaded), its points, the
    generation it came from (None: uploaded or a sample), the mask loaded with it (a sample's or a
    file's) and the one painted in the editor (the editable region is their union), the last result."""
    s = {"image": None, "points": [], "generation": None, "name": "upload", "loaded_mask": None, "painted": None,
         "result": None, "run": 0}
    if request is not None:
        s.update(image=request.image, points=[list(map(int, p)) for p in request.points], name=request.name,
                 loaded_mask=None if request.mask is None else np.asarray(request.mask).astype(bool))
    return s


def _mask(s: dict) -> np.ndarray | None:
    """The editable region: the loaded mask ∪ the painted one (None: nothing marked)."""
    a, b = s["loaded_mask"], s["painted"]
    if a is None or b is None:
        return b if a is None else a
    return a | b if a.shape == b.shape else b  # a painted mask of another size is reported at Run


class App:
    """The UI's server side: a pipeline, its batching queue, the samples and the output folder.
    ``blocks()`` builds the Gradio page; ``launch()`` serves it."""

    def __init__(self, pipe, *, samples: Sequence[str | Path] = (), out: str | Path = "ui_out",
                 window_s: float = 1.0, max_batch: int = 8, model_name: str = "", default_method: str = "dragtext",
                 run=None):
        """``run``: what the queue calls with each batch (``pipeline.edit_batch``; a stand-in in tests)."""
        self.pipe = pipe
        self.pipe.enable_lora_cache()  # one LoRA per image, prompt and seed, whatever the method
        self.queue = EditQueue(pipe, run=run, window_s=window_s, max_batch=max_batch)
        self.choices: list[Choice] = toy_choices() + folder_choices(samples)
        self.out = Path(out)
        self.model_name = model_name or str(getattr(pipe.sd, "source", "model"))
        self.default_method = default_method
        self.first = self.choices[0].load()

    # ------------------------------------------------------------------ start-up compiles
    def warm_shapes(self) -> list[tuple[int, int]]:
        """The working shapes compiled at start-up: the first sample's and the canvases of the
        common aspect ratios 4:3, 1:1 and 3:4 at the model's width (each a bucket canvas of
        ``buckets="fixed"``, so every image whose size rounds into one finds its programs)."""
        from ..data.geometry import working_size
        from ..pipeline.buckets import round_up
        from ..pipeline.editing import bucket_step

        n, step = self.pipe.native_width, bucket_step(self.pipe)
        first = working_size(*self.first.image.shape[:2], n)
        shapes = [first] + [(round_up(n * r, step), n) for r in (0.75, 1.0, 4 / 3)]
        canvases = [(round_up(h, step), round_up(w, step)) for h, w in shapes]
        return list(dict.fromkeys(canvases))

    def warm_requests(self, method: str) -> list[tuple]:
        """(request, settings, overrides) per warm shape, built as a click on Run with the page's
        default fields builds them: one drag, the method's defaults."""
        values = {k: _shown(v) for k, v in ui_settings.defaults(method).items()}
        out = []
        for h, w in self.warm_shapes():
            img = np.zeros((h, w, 3), np.uint8)
            st = {**_session(), "image": img, "points": [[w // 4, h // 2], [w // 2, h // 2]]}
            out.append(self.build_request(st, "warm-up", "", method, values, "", 0, False))
        return out

    def warm_up(self, compile_fn=None, log=print) -> threading.Thread:
        """Compile (or load from the persistent cache) the programs of the default method's edits
        of every ``warm_shapes`` canvas in a background thread, so a first click waits for no
        compile; a failure is logged, never raised. ``compile_fn``: ``pipeline.compile_for`` (a
        stand-in in tests). Returns the thread."""
        from ..pipeline import compile_for

        compile_fn = compile_fn or compile_for

        def work():
            t0 = time.perf_counter()
            try:
                for req, settings, overrides in self.warm_requests(self.default_method):
                    compile_fn(self.pipe, [req], self.default_method, settings=settings, workers=1, progress=True,
                               **overrides)
                log(f"compiled the {self.default_method} programs of {len(self.warm_shapes())} canvas(es) "
                    f"in {time.perf_counter() - t0:.0f} s")
            except Exception as e:  # noqa: BLE001 - a warm-up that fails costs only the first edit's wait
                log(f"start-up compile failed ({type(e).__name__}: {e}); edits compile when first run")

        thread = threading.Thread(target=work, name="jaxdrag-warm-up", daemon=True)
        thread.start()
        return thread

    # ------------------------------------------------------------------ handlers (pure-ish)
    def points_view(self, s: dict):
        if s["image"] is None:
            return None, canvas.describe_points([])
        k = canvas.display_scale(s["image"].shape[:2])
        return canvas.draw_points(s["image"], _mask(s), s["points"], k), canvas.describe_points(s["points"])

    def on_editor(self, value, s: dict):
        """The editor's value saved (an upload, strokes, a cleared canvas): (points view, points
        text, state, status, new image?). A new image resets the points, masks and prompts.
        Returns None when the value changes nothing (the same image, the same painted mask): the
        editor fires ``change`` after it initialises on page load, carrying the state of the moment
        the event was sent, and writing that state back would undo a click or a clear made since."""
        try:
            image, mask = canvas.from_editor(value)
        except canvas.InputError as e:
            return (*self.points_view(s), s, _error(str(e)), False)
        if image is None:
            s = {**_session(), "run": s["run"]}
            return (*self.points_view(s), s, "", True)
        new = not _same_image(image, s["image"])
        if not new and _same_mask(mask, s["painted"]):
            return None
        if new:
            s = {**_session(), "image": image, "run": s["run"]}
        s = {**s, "painted": mask}
        status = "new image: write its prompt, mark the editable region, click the points" if new else ""
        return (*self.points_view(s), s, status, new)

    def on_click(self, s: dict, index):
        if s["image"] is None:
            return (*self.points_view(s), s, _error("no image: upload one, pick a sample or generate one"))
        k = canvas.display_scale(s["image"].shape[:2])
        s = {**s, "points": canvas.add_point(s["points"], canvas.click_to_pixel(index, k, s["image"].shape[:2]))}
        return (*self.points_view(s), s, "")

    def on_undo(self, s: dict):
        s = {**s, "points": canvas.undo_point(s["points"])}
        return (*self.points_view(s), s, "")

    def on_clear(self, s: dict):
        s = {**s, "points": []}
        return (*self.points_view(s), s, "")

    def load_sample(self, label: str, s: dict):
        """(editor value, prompt, edit prompt, points view, points text, state, status)."""
        choice = next((c for c in self.choices if c.label == label), None)
        if choice is None:
            return (None, "", "", *self.points_view(s), s, _error(f"no sample named {label!r}"))
        try:
            req = choice.load()
        except (RequestError, OSError) as e:
            return (None, "", "", *self.points_view(s), s, _error(f"sample {label}: {e}"))
        ns = {**_session(req), "run": s["run"]}
        value = canvas.editor_value(req.image)
        return (value, req.prompt, req.edit_prompt or "", *self.points_view(ns), ns,
                f"loaded {label}: {len(req.points) // 2} drag(s); press Run, or click new points")

    def load_mask(self, mask_image, s: dict):
        """A mask from a file (white = editable) replaces the loaded mask; another size → message.
        (points view, points text, state, status)."""
        if mask_image is None:
            return (*self.points_view(s), s, "")
        m = canvas.mask_from_file(mask_image)
        if s["image"] is None:
            return (*self.points_view(s), s, _error("no image: load the image before its mask"))
        h, w = s["image"].shape[:2]
        if m.shape != (h, w):
            return (*self.points_view(s), s,
                    _error(f"the mask file is {m.shape[1]}×{m.shape[0]} but the image is {w}×{h}: "
                           f"use a mask of the image's size"))
        s = {**s, "loaded_mask": m if m.any() else None}
        return (*self.points_view(s), s, f"mask loaded: {int(m.sum())} editable px")

    def clear_mask(self, s: dict):
        """(editor value, points view, points text, state, status): no editable region marked."""
        s = {**s, "loaded_mask": None, "painted": None}
        return (None if s["image"] is None else canvas.editor_value(s["image"]), *self.points_view(s), s,
                "mask cleared: the whole image may change")

    def generate(self, prompt: str, seed, guidance, s: dict):
        """(editor value, prompt, edit prompt, points view, points text, state, status)."""
        try:
            if not (prompt or "").strip():
                raise RequestError("generate: write the prompt of the image first")
            try:
                seed_i, scale = int(seed), float(guidance)
            except (TypeError, ValueError):
                raise RequestError(f"generate: seed {seed!r} and guidance scale {guidance!r} must be numbers") from None
            gen = Generation(seed=seed_i, guidance_scale=scale).check("generate")
            t0 = time.perf_counter()
            images, _ = self.queue.exclusive(self.pipe.generate, [prompt], seed=gen.seed,
                                             guidance_scale=gen.guidance_scale, hw=gen.size(self.pipe.native_width))
            image = np.asarray(images[0])
        except (RequestError, SettingsError) as e:
            return (gr.skip(), prompt, gr.skip(), *self.points_view(s), s, _error(str(e)))
        ns = {**_session(), "image": image, "generation": gen, "name": "generated", "run": s["run"]}
        return (canvas.editor_value(image), prompt, "", *self.points_view(ns), ns,
                f"generated in {time.perf_counter() - t0:.1f} s; the drag will start from its own latent")

    def method_fields(self, method: str):
        """Each settings field's value and whether the method reads it."""
        d = ui_settings.defaults(method)
        return [(d[k], d[k] is not None) for k in ui_settings.KEYS]

    def build_request(self, s: dict, prompt: str, edit_prompt: str, method: str, values: dict, extra: str,
                      seed, interpolate: bool):
        """(request, EditSettings, overrides) of the page, or InputError/SettingsError/RequestError."""
        from ..pipeline import EditSettings, LoRASettings

        canvas.check_inputs(s["image"], _mask(s), s["points"])
        if method not in METHODS:
            raise SettingsError(f"method {method!r}: choose one of {', '.join(METHODS)}")
        pipe_fields, overrides, hypers = ui_settings.split(method, values, extra)
        # fixed buckets: each image's working size rounded up to the canvas step, whoever is online,
        # so edits of sizes that round alike share a batch and the programs compiled at start-up serve them
        settings = EditSettings(method=method, inversion_strength=pipe_fields.get("inversion_strength"),
                                lora=LoRASettings(steps=pipe_fields.get("lora_steps")),
                                interpolation=ui_settings.INTERPOLATION if interpolate else (),
                                buckets="fixed")
        try:
            seed_i = int(seed)
        except (TypeError, ValueError):
            raise SettingsError(f"seed {seed!r}: must be a whole number") from None
        gen = s["generation"]
        req = EditRequest(image=None if gen is not None else s["image"], points=s["points"],
                          prompt=(prompt or "").strip(), mask=_mask(s),
                          edit_prompt=(edit_prompt or "").strip() or None, name=s["name"], hypers=hypers,
                          seed=seed_i, generation=gen)
        return req, settings, overrides

    def run(self, s: dict, prompt, edit_prompt, method, *rest, progress=None):
        """Run the edit: (result, overlay, side by side, files, slider, status, state)."""
        values = dict(zip(ui_settings.KEYS, rest[:len(ui_settings.KEYS)]))
        extra, seed, interpolate = rest[len(ui_settings.KEYS):]
        nothing = (gr.skip(),) * 5  # the last result stays on the page
        try:
            req, settings, overrides = self.build_request(s, prompt, edit_prompt, method, values, extra, seed,
                                                          interpolate)
            job = self.queue.submit(req, method, settings, overrides)
        except (canvas.InputError, SettingsError, RequestError) as e:
            return (*nothing, _error(str(e)), s)
        t0 = time.perf_counter()
        while not job.wait(0.25):
            if progress is not None:
                stage, done, total = job.stage
                if stage == "queued":
                    progress(0.0, desc=f"queued ({self.queue.ahead(job)} edit(s) ahead)")
                else:
                    progress((done, max(total, 1)), desc=f"{stage} (batch of {job.batch_edits})")
        if job.error is not None:
            return (*nothing, _error(job.error), s)
        res = job.result
        if res.failure is not None:
            return (*nothing, _error(f"the edit failed: {json.dumps(res.failure)}"), s)
        image = s["image"]  # as loaded, or the generation the drag started from
        run = s["run"] + 1
        sbs = side_by_side(image, res) if image is not None and image.shape == res.image.shape else None
        folder = self._save(res, image, sbs, run)
        k = canvas.display_scale(res.image.shape[:2])
        files = [str(p) for p in sorted(folder.iterdir()) if p.is_file()]
        ns = {**s, "result": res, "run": run}
        lora = "cached LoRA" if res.timings.get("lora", 1.0) == 0.0 else "LoRA trained"
        status = (f"done in {time.perf_counter() - t0:.1f} s (batch of {job.batch_edits}, {lora}): "
                  f"{res.iterations} updates, handles {'reached' if res.reached else 'not all reached'} "
                  f"their targets; final handles {np.round(res.handles).astype(int).tolist()}; saved in {folder}")
        slider = self._slider(res)
        return canvas.upscale(res.image, k), result_overlay(res, k), sbs, files, slider, status, ns

    def _slider(self, res):
        if not res.interpolation:
            return gr.Slider(visible=False)
        alphas = [a for a, _ in res.interpolation]
        return gr.Slider(minimum=min(alphas), maximum=max(alphas), step=alphas[1] - alphas[0] if len(alphas) > 1 else 1,
                         value=1.0, visible=True)

    def on_alpha(self, alpha, s: dict):
        """The interpolation image nearest to α (the edit itself when there is none)."""
        res = s.get("result")
        if res is None:
            return None
        k = canvas.display_scale(res.image.shape[:2])
        if not res.interpolation or alpha is None:
            return canvas.upscale(res.image, k)
        _, im = min(res.interpolation, key=lambda p: abs(p[0] - float(alpha)))
        return canvas.upscale(im, k)

    def _save(self, res, image, sbs, run: int) -> Path:
        """write_result + input.png + side_by_side.png (``sbs``, when there is one) in a new folder."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(res.name)).strip("-") or "edit"
        self.out.mkdir(parents=True, exist_ok=True)
        k = 1
        while True:  # mkdir claims the folder atomically: sessions finishing together never share one
            folder = self.out / (f"{stamp}-{run:03d}-{name}" + (f"-{k}" if k > 1 else ""))
            try:
                folder.mkdir()
                break
            except FileExistsError:
                k += 1
        write_result(res, folder)
        if image is not None:
            Image.fromarray(image).save(folder / "input.png")
        if sbs is not None:
            Image.fromarray(sbs).save(folder / "side_by_side.png")
        return folder

    # ------------------------------------------------------------------ the page
    def blocks(self):
        """The Gradio page. One function on purpose: ``gr.Blocks`` declares the layout and its event
        wiring in one ``with`` context (components must exist inside it before they are wired),
        so the page reads top to bottom as it is shown; the behaviour lives in the methods it wires."""
        first = _session(self.first)
        labels = [c.label for c in self.choices]
        d = self.method_fields(self.default_method)
        with gr.Blocks(title="jaxdrag") as page:
            state = gr.State(first)
            gr.Markdown(f"## jaxdrag — drag editing\nModel: `{self.model_name}`. Load or paint an image, "
                        f"paint the editable region, click a **handle** then its **target** (red → blue), "
                        f"press **Run**. Edits from every open page run together in batches.")
            with gr.Row():
                with gr.Column():
                    editor = gr.ImageEditor(value=canvas.editor_value(self.first.image),
                                            label="1. image — upload or paint the editable region, then ✓ (save changes)",
                                            type="numpy", image_mode="RGBA", format="png", elem_id="editor",
                                            sources=("upload", "clipboard"), transforms=(), layers=gr.LayerOptions(allow_additional_layers=False),
                                            brush=gr.Brush(colors=[("#ffffff", 0.6)], color_mode="fixed"),
                                            height=420)
                    with gr.Row():
                        sample = gr.Dropdown(labels, value=labels[0], label="sample", elem_id="sample", scale=3)
                        load = gr.Button("Load sample", elem_id="load_sample", scale=1)
                    clear_mask = gr.Button("Clear mask", elem_id="clear_mask", size="sm")
                    with gr.Accordion("mask from a file", open=False):
                        mask_file = gr.Image(label="mask (white = editable)", type="numpy", image_mode="L",
                                             sources=("upload",), elem_id="mask_file", height=160)
                    with gr.Accordion("generate an image", open=False):
                        gen_prompt = gr.Textbox(label="prompt", elem_id="gen_prompt")
                        with gr.Row():
                            gen_seed = gr.Number(0, label="seed", precision=0, elem_id="gen_seed")
                            gen_scale = gr.Number(7.5, label="guidance scale", elem_id="gen_scale")
                        gen_btn = gr.Button("Generate", elem_id="generate")
                with gr.Column():
                    view0, text0 = self.points_view(first)
                    points_img = gr.Image(view0, label="2. points — click a handle, then its target "
                                                       "(the editable region is bright)",
                                          interactive=False, elem_id="points", format="png", height=420)
                    with gr.Row():
                        undo = gr.Button("Undo point", elem_id="undo")
                        clear = gr.Button("Clear points", elem_id="clear")
                    points_text = gr.Textbox(text0, label="drags", lines=3, interactive=False, elem_id="points_text")
                with gr.Column():
                    with gr.Tabs():
                        with gr.Tab("result"):
                            result = gr.Image(label="3. result", interactive=False, elem_id="result", format="png",
                                              height=420)
                        with gr.Tab("overlay"):
                            overlay = gr.Image(label="overlay", interactive=False, elem_id="overlay", format="png")
                        with gr.Tab("side by side"):
                            side = gr.Image(label="side by side", interactive=False, elem_id="side", format="png")
                    alpha = gr.Slider(0, 1.5, value=1.0, step=0.25, visible=False, elem_id="alpha",
                                      label="DragText interpolation α (0 = reconstruction, 1 = the edit)")
                    files = gr.File(label="download (also saved on the server)", file_count="multiple",
                                    interactive=False, elem_id="files")
            with gr.Row():
                prompt = gr.Textbox(self.first.prompt, label="prompt (describes the image)", elem_id="prompt")
                edit_prompt = gr.Textbox(self.first.edit_prompt or "", label="edit prompt (CLIPDrag; empty = prompt)",
                                         elem_id="edit_prompt")
            with gr.Row():
                method = gr.Dropdown(list(METHODS), value=self.default_method, label="method", elem_id="method")
                seed = gr.Number(0, label="LoRA seed", precision=0, elem_id="seed")
                interpolate = gr.Checkbox(False, label="DragText interpolation (α 0 … 1.5)", elem_id="interpolate")
            with gr.Row():
                fields = [gr.Textbox(_shown(v), label=label, interactive=on, elem_id=f"set_{k}")
                          for (k, label), (v, on) in zip(ui_settings.FIELDS, d)]
            extra = gr.Textbox("", label="more settings (key=value, …; e.g. r_m=2, tracking=fast)", elem_id="extra")
            run = gr.Button("Run", variant="primary", elem_id="run")
            status = gr.Markdown("", elem_id="status")

            view_out = [points_img, points_text, state, status]
            def editor_saved(value, s):
                saved = self.on_editor(value, s)
                if saved is None:  # nothing changed: write nothing (a click made meanwhile stays)
                    return (gr.skip(),) * (len(view_out) + 2)
                *out, new = saved
                return (*out, *(("", "") if new else (gr.skip(), gr.skip())))
            for event in (editor.upload, editor.change, editor.apply, editor.clear):
                event(editor_saved, [editor, state], [*view_out, prompt, edit_prompt], queue=False)

            def click(s, evt: gr.SelectData):
                return self.on_click(s, evt.index)
            points_img.select(click, [state], view_out, queue=False)
            undo.click(self.on_undo, [state], view_out, queue=False)
            clear.click(self.on_clear, [state], view_out, queue=False)
            load.click(self.load_sample, [sample, state], [editor, prompt, edit_prompt, *view_out], queue=False)
            mask_file.change(self.load_mask, [mask_file, state], view_out, queue=False)
            clear_mask.click(self.clear_mask, [state], [editor, *view_out], queue=False)
            def generate(p, seed_, scale, s):
                try:
                    return self.generate(p, seed_, scale, s)
                except Exception as e:  # noqa: BLE001 - one line in the page, the trace in the log
                    traceback.print_exc()
                    return (*(gr.skip(),) * 5, s, _error(f"{type(e).__name__}: {e}"))
            gen_btn.click(generate, [gen_prompt, gen_seed, gen_scale, state], [editor, prompt, edit_prompt, *view_out],
                          concurrency_limit=1)

            def on_method(m):
                return [gr.Textbox(value=_shown(v), interactive=on) for v, on in self.method_fields(m)]
            method.change(on_method, [method], fields, queue=False)

            def run_edit(s, p, ep, m, *rest, progress=gr.Progress()):
                try:
                    return self.run(s, p, ep, m, *rest, progress=progress)
                except Exception as e:  # noqa: BLE001 - one line in the page, the trace in the log
                    traceback.print_exc()
                    return (*(gr.skip(),) * 5, _error(f"{type(e).__name__}: {e}"), s)
            run.click(run_edit, [state, prompt, edit_prompt, method, *fields, extra, seed, interpolate],
                      [result, overlay, side, files, alpha, status, state], concurrency_limit=None)
            alpha.change(self.on_alpha, [alpha, state], [result], queue=False)
        return page

    def launch(self, host: str = "127.0.0.1", port: int = 7860, quiet: bool = False):
        page = self.blocks()
        page.queue(default_concurrency_limit=None)
        self.out.mkdir(parents=True, exist_ok=True)
        return page.launch(server_name=host, server_port=port, css=CSS, theme=gr.themes.Default(),
                           allowed_paths=[str(self.out.resolve())], quiet=quiet, footer_links=[],
                           prevent_thread_lock=False)
