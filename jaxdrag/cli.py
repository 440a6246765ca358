"""``jaxdrag`` command line: ``edit`` (one image, or a generated one), ``generate``, ``run`` (a DragBench / Drag100 folder), ``demo``,
``ui`` (the browser UI), ``toybench`` (drags with exact ground truth on the toy world), ``eval`` (DragBench metrics of a
results folder).

Every drag setting of the method presets has its own option (``--max-iters``, ``--latent-lr``,
``--r-m``, ``--fusion``, …), generated from ``jaxdrag.drag.methods``; ``--steps`` is an alias of
``--max-iters``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .drag.loop import DragConfig
from .drag.methods import CONFIG_KEYS, HYPER_KEYS, METHODS
from .errors import SettingsError


def _enable_compile_cache(enabled: bool) -> None:
    """``--no-compile-cache`` turns off the library's persistent XLA cache for this process."""
    if not enabled:
        os.environ["JAXDRAG_COMPILE_CACHE"] = "0"


def _batch_size(v: str):
    if v == "auto":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'auto', got {v!r}") from None


def _alphas(v: str) -> tuple[float, ...]:
    try:
        return tuple(float(a) for a in v.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected α values like 0,0.5,1, got {v!r}") from None


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _add_drag_options(p: argparse.ArgumentParser, method: bool = True) -> None:
    g = p.add_argument_group("drag settings (default: the method preset)")
    if method:
        g.add_argument("--method", default="dragtext", choices=METHODS)
    fields = {f.name: f for f in dataclasses.fields(DragConfig)}
    for key in CONFIG_KEYS:
        typ = {"r_m": int, "r_p": int, "max_iters": int, "max_step": float, "ms_weight": float,
               "drag_end_step": int, "track_per_step": int, "max_drag_per_track": int,
               "max_track_no_change": int, "block_steps": int, "end_step": int,
               "stale_latent_grad": _parse_bool, "text_feature_block": int}.get(key, str)
        flags = [f"--{key.replace('_', '-')}"] + (["--steps"] if key == "max_iters" else [])
        g.add_argument(*flags, dest=key, type=typ, default=None,
                       help=f"DragConfig.{key} (default {fields[key].default!r} unless the preset sets it)")
    for key in HYPER_KEYS:
        g.add_argument(f"--{key.replace('_', '-')}", dest=key, type=float, default=None, help=f"hyperparameter {key}")
    p.add_argument("--lora-steps", type=int, default=None,
                   help="LoRA steps (default: the method's: 80; GoodDrag 70; FreeDrag, DragNoise 200)")
    p.add_argument("--lora-lr", type=float, default=None,
                   help="LoRA learning rate (default: the method's: 5e-4; FreeDrag, DragNoise 2e-4)")
    p.add_argument("--lora-batch", type=int, default=4)
    p.add_argument("--inversion-strength", type=float, default=None,
                   help="DDIM inversion strength (default: the method's: 0.7; GoodDrag 0.75)")
    p.add_argument("--width", type=int, default=None,
                   help="working width (default: the model's native width, 512 for SD-1.5; 0 keeps the input size)")
    p.add_argument("--no-reference-attention", action="store_true",
                   help="denoise without mutual self-attention")
    p.add_argument("--remat", choices=("off", "blocks", "dots"), default="off",
                   help="rematerialise UNet activations in the backward passes of LoRA training and the drag "
                        "step (memory for large batches): blocks = keep block inputs only, dots = keep "
                        "matmul/conv/attention outputs")
    p.add_argument("--clip-double-unit-map", action="store_true",
                   help="reproduce CLIPDrag's double [0,1] mapping of the CLIP input (reference quirk)")
    p.add_argument("--interpolate", type=_alphas, default=(),
                   help="DragText §6: also write interpolation.png, the images of (z*, c) → (ẑ, ĉ) "
                        "interpolated at these α, e.g. 0,0.25,0.5,0.75,1,1.25,1.5 (0 = reconstruction, 1 = the edit)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="SD-1.5 diffusers folder or LDM .safetensors (default: the trained toy model, weights/toy-sd15)")
    p.add_argument("--clip", type=Path, default=None,
                   help="HF CLIP folder (ViT-B/16) for CLIPDrag methods (default with the toy model: weights/toy-clip)")
    p.add_argument("--vae", type=Path, default=None,
                   help="a separate VAE (diffusers AutoencoderKL folder or .safetensors file), e.g. GoodDrag's "
                        "stabilityai/sd-vae-ft-mse; default: the model's own")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (bf16 on GPU), float32, bfloat16")
    p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent XLA cache")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def _overrides(args) -> dict:
    return {k: getattr(args, k) for k in CONFIG_KEYS + HYPER_KEYS if getattr(args, k, None) is not None}


def _settings(args):
    """The pipeline settings of the command line (validated: SettingsError names a bad one)."""
    from .pipeline import EditSettings, LoRASettings

    return EditSettings(method=args.method, width=args.width, inversion_strength=args.inversion_strength,
                        lora=LoRASettings(steps=args.lora_steps, lr=args.lora_lr, batch=args.lora_batch,
                                          remat=args.remat),
                        remat=args.remat,
                        reference_attention=not args.no_reference_attention,
                        clip_double_unit_map=args.clip_double_unit_map,
                        batch_size=getattr(args, "batch_size", 8), interpolation=args.interpolate)


def default_models() -> tuple[Path, Path, str]:
    """(SD folder, CLIP folder, kind): the trained toy model when present (it is committed in
    ``weights/``), else the generated tiny random-weight model."""
    from .tiny import ensure_tiny
    from .toy import toy_paths

    toy = toy_paths()
    if toy is not None:
        return toy[0], toy[1], "toy"
    sd, clip = ensure_tiny()
    return sd, clip, "tiny"


def _load(args, need_clip: bool):
    from .pipeline import load_pipeline

    model, clip = args.model, args.clip
    if model is None:
        model, default_clip, kind = default_models()
        clip = clip or default_clip
        what = ("the toy model (trained on 128×128 toy scenes)" if kind == "toy"
                else "the tiny random-weight model")
        print(f"note: using {what} at {model}; pass --model for real edits", file=sys.stderr)
    if need_clip and clip is None:
        raise SettingsError(f"method {args.method!r} needs a CLIP model: pass --clip PATH "
                            f"(an HF openai/clip-vit-base-patch16 folder)")
    from .hub import resolve

    # local paths or Hub ids, resolved (and fetched into the Hugging Face cache) before anything loads
    model = resolve(model, "sd")
    clip = resolve(clip, "clip") if need_clip and clip is not None else None
    vae = getattr(args, "vae", None)
    vae = resolve(vae, "vae") if vae is not None else None
    t0 = time.perf_counter()
    pipe = load_pipeline(model, clip=clip, dtype=args.dtype, vae=vae)
    print(f"loaded {model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return pipe


def _parse_points(text: str) -> list[list[float]]:
    from .data import RequestError

    pts = []
    for tok in text.replace(";", " ").split():
        try:
            x, y = (float(v) for v in tok.split(","))
        except ValueError:
            raise RequestError(f"--points: {tok!r} is not 'x,y'") from None
        pts.append([x, y])
    return pts




def cmd_edit(args) -> int:
    from .data import EditRequest, read_image, validate, write_result
    from .drag.methods import resolve
    from .pipeline import edit_batch

    # everything the user gave is checked before the model is loaded or anything compiled
    cfg, _ = resolve(args.method, **_overrides(args))
    settings = _settings(args)
    mask = None
    if args.mask is not None:
        mask = read_image(args.mask, "L")[0] > 0
    if args.image.suffix.lower() == ".json":  # a generation spec written by `jaxdrag generate`
        gen, prompt = _read_generation(args.image)
        if args.prompt and args.prompt != prompt:
            raise SettingsError(f"--prompt: a generated image is dragged with its generation prompt {prompt!r} "
                                f"({args.image}); leave --prompt out")
        req = EditRequest(image=None, points=_parse_points(args.points), prompt=prompt, mask=mask,
                          edit_prompt=args.edit_prompt, name=args.image.parent.name or "generated", seed=args.seed,
                          generation=gen)
    else:
        img, src = read_image(args.image)
        req = validate(EditRequest(image=img, points=_parse_points(args.points),
                                   prompt=args.prompt, mask=mask, edit_prompt=args.edit_prompt,
                                   name=args.image.stem, seed=args.seed, source=src))
    pipe = _load(args, cfg.use_clip)
    res = edit_batch(pipe, [req], args.method, settings=settings, progress=not args.quiet,
                     **_overrides(args))[0]
    write_result(res, args.out)
    if res.failure is not None:
        d = res.failure.get("diverged", {})
        print(f"error: the edit diverged at iteration {d.get('iteration')} ({d.get('what')} became "
              f"non-finite); no image written, report in {args.out / 'report.json'}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(args.out), "iterations": res.iterations, "reached": res.reached,
                      "final_handles": res.handles.round(1).tolist(),
                      "timings_s": {k: round(v, 2) for k, v in res.timings.items()}}, indent=1))
    return 0


GENERATION_FIELDS = ("seed", "guidance_scale", "negative_prompt", "height", "width")


def _read_generation(path: Path):
    """(Generation, prompt) from a ``generation.json`` of ``jaxdrag generate``."""
    from .data import Generation, RequestError

    try:
        spec = json.loads(Path(path).read_text())
        if not isinstance(spec, dict) or not isinstance(spec.get("prompt"), str):
            raise ValueError("no prompt")
        gen = Generation(**{k: spec[k] for k in GENERATION_FIELDS if k in spec})
    except (OSError, ValueError, TypeError) as e:
        raise RequestError(f"{path}: not a generation spec of `jaxdrag generate` ({e})") from None
    return gen.check(str(path)), spec["prompt"]


def cmd_generate(args) -> int:
    """Sample an image to drag on: DIR/generated.png and DIR/generation.json (pass the JSON to
    ``jaxdrag edit`` with points picked on the PNG)."""
    from .data import Generation, atomic_write, png_bytes, write_json

    if not args.prompt.strip():
        raise SettingsError("--prompt: a generation needs a prompt")
    gen = Generation(seed=args.seed, guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                     height=args.height, width=args.width).check("generate")
    pipe = _load(args, False)
    images, _ = pipe.generate([args.prompt], seed=[gen.seed], guidance_scale=gen.guidance_scale,
                              negative_prompt=gen.negative_prompt, hw=gen.size(pipe.native_width))
    atomic_write(args.out / "generated.png", png_bytes(np.asarray(images[0])))
    write_json(args.out / "generation.json", {"prompt": args.prompt, **dataclasses.asdict(gen)})
    print(json.dumps({"image": str(args.out / "generated.png"), "spec": str(args.out / "generation.json")}))
    return 0


def cmd_run(args) -> int:
    from tqdm import tqdm

    from .data import RequestError, find_samples, is_done, validate, write_json, write_result
    from .drag.methods import resolve
    from .pipeline import edit_batch

    from . import cluster

    t_start = time.perf_counter()
    where = (cluster.place(args.coordinator, args.num_processes, args.process_id) if args.distributed
             else cluster.Place(0, 1, ""))
    pid, nproc = where.pid, where.nproc
    if not args.peer_timeout > 0:
        raise SettingsError(f"--peer-timeout {args.peer_timeout}: must be > 0 seconds")
    cfg, _ = resolve(args.method, **_overrides(args))
    settings = _settings(args)
    samples = find_samples(args.dataset)
    if args.only:
        samples = [s for s in samples if s.name in set(args.only)]
    if args.limit:
        samples = samples[:args.limit]
    out = Path(args.out)
    n_all = len(samples)
    names = [s.name for s in samples]
    samples = samples[pid::nproc]  # this process's share (every process lists the same samples)
    todo = [s for s in samples if not is_done(out / s.name)]
    coord = peer = None
    if nproc > 1:  # heartbeats start now, before the model loads and compiles
        finished = [s.name for s in samples if s not in todo]
        coord = cluster.Coordinator(where) if pid == 0 else None
        peer = cluster.Peer(where, finished) if pid != 0 else None
    if nproc > 1:
        print(f"process {pid} of {nproc}: {len(samples)} of the {n_all} samples", file=sys.stderr)
    print(f"{len(samples)} samples, {len(samples) - len(todo)} already done, {len(todo)} to run", file=sys.stderr)
    failures: dict[str, str] = {}
    done = len(samples) - len(todo)
    # read and check every sample before the model is loaded: bad ones are reported and skipped
    loaded = []
    for s in todo:
        try:
            req = s.load()
            req.seed = args.seed
            loaded.append((s, validate(req)))
        except RequestError as e:
            failures[s.name] = str(e)
            print(f"skipped {s.name}: {e}", file=sys.stderr)
    stats: dict = {}
    ran: list[str] = []
    pipe = None
    try:
        if loaded:
            pipe = _load(args, cfg.use_clip)
            n_dev = pipe.use_devices(_local_devices(args.devices))
            if n_dev > 1:
                print(f"edits spread over {n_dev} devices", file=sys.stderr)
            bar = tqdm(total=len(loaded), desc="samples", disable=args.quiet)

            def on_result(i, res):  # written as each batch finishes: an interrupted run loses nothing
                nonlocal done
                s = loaded[i][0]
                res.name = s.name
                write_result(res, out / s.name)
                ran.append(s.name)
                if peer is not None and res.failure is None:
                    peer.finish(s.name)
                if res.failure is not None:
                    d = res.failure.get("diverged", {})
                    failures[s.name] = (f"diverged at iteration {d.get('iteration')} "
                                        f"({d.get('what')} became non-finite)")
                else:
                    done += 1
                bar.update(1)

            def on_error(indices, e):  # a failing batch is reported, the run goes on
                traceback.print_exception(e, file=sys.stderr)
                for i in indices:
                    failures[loaded[i][0].name] = f"{type(e).__name__}: {e}"
                bar.update(len(indices))

            edit_batch(pipe, [r for _, r in loaded], args.method, settings=settings, progress=not args.quiet,
                       on_result=on_result, on_error=on_error, **_overrides(args))
            bar.close()
    finally:  # a summary even when the run is interrupted or a batch crashes the process
        if pipe is not None:
            stats["compile"] = {"programs": sum(pipe.stages.compiles.values()),
                                "seconds": round(sum(pipe.stages.compile_s.values()), 1),
                                "per_stage": dict(pipe.stages.compiles)}
        summary = {"dataset": str(args.dataset), "method": args.method, "total": len(samples), "done": done,
                   "failed": failures, **stats, "wall_s": round(time.perf_counter() - t_start, 1)}
        missing = []
        if nproc > 1:
            summary.update(process=pid, ran=ran)
            if coord is not None:
                gathered = coord.wait(args.peer_timeout, log=lambda m: print(m, file=sys.stderr))
                coord.close()
                summary = cluster.merge(summary, gathered, {p: names[p::nproc] for p in range(nproc)}, n_all,
                                        on_disk=lambda name: is_done(out / name))
                missing = summary["missing"]
                if missing:
                    print(f"process 0: {len(missing)} sample(s) of lost processes not finished: "
                          f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; rerun the same command "
                          f"to complete them", file=sys.stderr)
            elif not peer.send_summary(summary, give_up_after=args.peer_timeout):
                alone = out / f"summary.process-{pid}.json"
                write_json(alone, summary)
                print(f"process {pid}: process 0 at {where.coordinator} did not take the summary within "
                      f"{args.peer_timeout:g} s; wrote {alone}", file=sys.stderr)
                missing = ["(summary not merged)"]
            summary = summary if pid == 0 else None
        if summary is not None:
            write_json(out / "summary.json", summary)
    print(json.dumps({"done": done, "failed": len(failures), "summary": str(out / "summary.json"),
                      **({"missing": len(missing)} if missing else {})}))
    return 0 if not failures and not missing else 1


def _local_devices(spec: str):
    """``--devices``: "all" local devices or the first N."""
    import jax

    devs = jax.local_devices()
    if spec == "all":
        return devs
    try:
        n = int(spec)
    except ValueError:
        raise SettingsError(f"--devices {spec!r}: expected 'all' or a count") from None
    if not 1 <= n <= len(devs):
        raise SettingsError(f"--devices {n}: this process has {len(devs)} device(s)")
    return devs[:n]


def demo_example(size: int = 128):
    """A built-in example: a soft orange disc on a blue-green gradient; drag its right edge
    outwards, with a mask around the disc."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([0.2 + 0.3 * yy, 0.5 + 0.3 * xx, 0.8 - 0.3 * yy], -1)
    d = np.sqrt((xx - 0.45) ** 2 + (yy - 0.5) ** 2)
    disc = np.clip((0.22 - d) * 40, 0, 1)[..., None]
    img = img * (1 - disc) + np.array([0.95, 0.55, 0.15]) * disc
    mask = (d < 0.38).astype(np.uint8)
    s = size / 128
    points = [[0.45 * size + 26 * s, 0.5 * size], [0.45 * size + 40 * s, 0.5 * size]]
    return (img * 255).astype(np.uint8), points, mask, "an orange ball on a gradient background"


def cmd_demo(args) -> int:
    from PIL import Image

    from .data import EditRequest, side_by_side, write_result
    from .pipeline import edit_batch

    args.model, args.clip = None, None
    _, _, kind = default_models()
    pipe = _load(args, args.method.startswith("clipdrag"))
    if kind == "toy":
        from .toy.bench import demo_task, measure

        task = demo_task()
        img, pts, mask, prompt = task.image, task.points, task.mask, task.prompt
        edit_prompt = task.edit_prompt
    else:
        img, pts, mask, prompt = demo_example(pipe.native_width)
        edit_prompt = None
    req = EditRequest(image=img, points=pts, prompt=prompt, mask=mask, edit_prompt=edit_prompt, name="demo")
    t0 = time.perf_counter()
    res = edit_batch(pipe, [req], args.method, settings=_settings(args), progress=not args.quiet,
                     **_overrides(args))[0]
    write_result(res, args.out)
    Image.fromarray(img).save(Path(args.out) / "input.png")
    Image.fromarray(side_by_side(img, res)).save(Path(args.out) / "side_by_side.png")
    summary = {"out": str(args.out), "model": kind,
               "files": ["input.png", "edited.png", "overlay.png", "side_by_side.png", "report.json"],
               "prompt": prompt, "iterations": res.iterations, "reached": res.reached,
               "final_handles": res.handles.round(1).tolist(), "wall_s": round(time.perf_counter() - t0, 1)}
    if kind == "toy":
        m = measure(task, res.image)
        summary["measured"] = {k: (round(v, 2) if isinstance(v, float) else v)
                               for k, v in m.items()
                               if k in ("error", "rel_error", "spot_error", "iou", "survived", "bg_psnr")}
        summary["measured"]["drag"] = [list(mv[1:]) for mv in task.moves]
        summary["measured"]["moved"] = [[round(v, 1) for v in o["moved"]] for o in m["objects"]]
    print(json.dumps(summary, indent=1))
    if kind == "toy":
        o = m["objects"][0]
        print(f"the {task.spec.objects[0].colour} {task.spec.objects[0].shape} moved "
              f"({o['moved'][0]:.1f}, {o['moved'][1]:.1f}) px for a drag of ({o['drag'][0]}, {o['drag'][1]}): "
              f"error {o['error']:.1f} px = {100 * o['rel_error']:.0f} % of the drag, "
              f"{'intact' if o['survived'] else 'not intact'} (area {o['area_out']} px vs {o['area_in']}, "
              f"spot {'found' if o['spot_found'] else 'lost'}), background PSNR {m['bg_psnr']:.1f} dB",
              file=sys.stderr)
    return 0


def cmd_ui(args) -> int:
    from .ui import check_gradio

    check_gradio()
    from .ui.app import App

    if args.method not in METHODS:
        raise SettingsError(f"--method {args.method!r}: choose one of {', '.join(METHODS)}")
    for root in args.samples:
        if not Path(root).is_dir():
            raise SettingsError(f"--samples {root}: not a folder")
    if not args.batch_window >= 0:
        raise SettingsError(f"--batch-window {args.batch_window}: must be ≥ 0 seconds")
    if args.max_batch < 1:
        raise SettingsError(f"--max-batch {args.max_batch}: must be ≥ 1")
    if not 0 < args.port < 65536:
        raise SettingsError(f"--port {args.port}: must be in 1…65535")
    model = args.model
    if model is None:  # the default model with its CLIP, so every method can be picked in the page
        model, default_clip, _ = default_models()
        args.clip = args.clip or default_clip
    pipe = _load(args, args.clip is not None)
    app = App(pipe, samples=args.samples, out=args.out, window_s=args.batch_window, max_batch=args.max_batch,
              model_name=str(model), default_method=args.method)
    print(f"jaxdrag UI on http://{args.host}:{args.port} (results saved in {args.out})", file=sys.stderr)
    app.launch(host=args.host, port=args.port, quiet=args.quiet)
    return 0


def cmd_toybench(args) -> int:
    from .drag.methods import overrides_per_method, resolve
    from .toy import runner

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.method = methods[0] if methods else "dragdiffusion"
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SettingsError(f"--methods: unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    overrides = _overrides(args)
    # every setting checked before loading; each method gets the ones it reads
    per_method = overrides_per_method(methods, overrides)
    cfgs = [resolve(m, **per_method[m])[0] for m in methods]
    settings = _settings(args)
    pipe = _load(args, any(c.use_clip for c in cfgs))
    runner.run(pipe, methods, args.out, n_tasks=args.tasks, batch_size=args.batch_size,
               settings=settings, overrides=overrides, progress=not args.quiet,
               log=lambda s: print(s, file=sys.stderr))
    print((Path(args.out) / "toybench.md").read_text())
    return 0


def _int_list(flag: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(g) for g in text.split(","))
    except ValueError:
        raise SettingsError(f"{flag} {text!r}: expected comma-separated whole numbers, e.g. 1,5,10,20") from None


def cmd_eval(args) -> int:
    import jax.numpy as jnp

    from .eval import EvalSettings, Networks, evaluate, load_clip_image, load_dift, load_lpips
    from .eval import METRICS
    from .eval.settings import WEIGHT_FLAGS

    given = {"lpips": args.lpips, "clip": args.clip, "md": args.dift}
    if args.metrics:
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    else:  # every metric whose weights are given, and DAI (no network)
        metrics = tuple(m for m in METRICS if m == "dai" or given.get(m) is not None)
    missing = [m for m in metrics if m in given and given[m] is None]
    if missing:
        raise SettingsError(f"--metrics {','.join(missing)} need(s) weights: "
                            f"{', '.join(WEIGHT_FLAGS[m] + ' PATH' for m in missing)}")
    settings = EvalSettings(metrics=metrics, t=args.t, ensemble=args.ensemble, seed=args.seed,
                            dai_double_n=args.dai_double_n, batch_size=args.batch_size,
                            gammas=_int_list("--gammas", args.gammas))
    dtype = {"auto": jnp.float32, "float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(args.dtype)
    if dtype is None:
        raise SettingsError(f"--dtype {args.dtype!r}: choose auto, float32 or bfloat16")
    nets = Networks(lpips=load_lpips(args.lpips) if "lpips" in metrics else None,
                    dift=load_dift(args.dift, dtype=dtype) if "md" in metrics else None,
                    clip=load_clip_image(args.clip, dtype=dtype) if "clip" in metrics else None)
    out = args.out or args.results / "eval"
    summary = evaluate(args.results, args.data, out, nets, settings, only=args.only,
                       progress=not args.quiet)
    print((out / "summary.md").read_text())
    print(json.dumps({"overall": summary["overall"], "skipped": len(summary["skipped"]),
                      "summary": str(out / "summary.json")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxdrag", description="Diffusion point-drag image editing in JAX")
    sub = ap.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("edit", help="edit one image")
    e.add_argument("image", type=Path, help="the image, or the generation.json of `jaxdrag generate` "
                                            "(drag on the generated image's own latent, no inversion)")
    e.add_argument("--points", required=True, help='pixels "x,y x,y …" alternating handle, target')
    e.add_argument("--prompt", default="", help="description of the image")
    e.add_argument("--edit-prompt", default=None, help="CLIPDrag's edit text (default: --prompt)")
    e.add_argument("--mask", type=Path, default=None, help="mask image, nonzero = editable")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--quiet", action="store_true")
    _add_model_options(e)
    _add_drag_options(e)
    e.set_defaults(fn=cmd_edit)

    g = sub.add_parser("generate", help="generate an image to drag on (DDIM-50 with guidance): "
                                        "DIR/generated.png + DIR/generation.json for `jaxdrag edit`")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--height", type=int, default=None, help="default: the model's native size")
    g.add_argument("--width", type=int, default=None, help="default: the model's native size")
    g.add_argument("--quiet", action="store_true")
    _add_model_options(g)
    g.set_defaults(fn=cmd_generate)

    r = sub.add_parser("run", help="edit every sample of a DragBench or Drag100 folder (resumable)")
    r.add_argument("dataset", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--batch-size", type=_batch_size, default=8,
                   help="edits per vmapped batch (same working size), or 'auto': the largest batch whose "
                        "every stage fits in device memory (XLA's memory analysis)")
    r.add_argument("--limit", type=int, default=None, help="only the first N samples")
    r.add_argument("--only", nargs="*", default=None, help="only these sample names")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--devices", default="all",
                   help="local devices to spread each batch over: all (default) or a count")
    r.add_argument("--distributed", action="store_true",
                   help="one of several processes/hosts: each takes every n-th sample; process 0 merges the "
                        "summaries and survives a lost peer (jaxdrag.cluster)")
    r.add_argument("--coordinator", default=None, help="with --distributed: host:port of process 0")
    r.add_argument("--num-processes", type=int, default=None, help="with --distributed: process count")
    r.add_argument("--process-id", type=int, default=None, help="with --distributed: this process's index")
    r.add_argument("--peer-timeout", type=float, default=120.0,
                   help="with --distributed: seconds without a heartbeat after which process 0 declares a peer "
                        "lost and writes the summary without it (default 120)")
    _add_model_options(r)
    _add_drag_options(r)
    r.set_defaults(fn=cmd_run)

    t = sub.add_parser("toybench", help="drag tasks on held-out toy scenes with exact ground truth "
                                        "(displacement error, IoU, survival, background PSNR)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods (default: all ten); each reads the drag settings it uses")
    t.add_argument("--tasks", type=int, default=50, help="number of tasks (deterministic, held-out seeds)")
    t.add_argument("--batch-size", type=int, default=10, help="edits per vmapped batch")
    t.add_argument("--quiet", action="store_true")
    _add_model_options(t)
    _add_drag_options(t, method=False)
    t.set_defaults(fn=cmd_toybench)

    v = sub.add_parser("eval", help="DragBench metrics of a results folder: LPIPS, DIFT mean distance, "
                                    "LPIPS×MD, CLIP similarity, DAI (resumable)")
    v.add_argument("results", type=Path, help="results of `jaxdrag run` or the reference scripts' layout")
    v.add_argument("--data", type=Path, required=True, help="the DragBench or Drag100 folder edited")
    v.add_argument("--out", type=Path, default=None, help="where to write (default: RESULTS/eval)")
    v.add_argument("--dift", type=Path, default=None,
                   help="SD-2.1 diffusers folder or .safetensors single file (mean distance)")
    v.add_argument("--lpips", type=Path, default=None,
                   help="LPIPS-AlexNet .safetensors (scripts/convert_lpips.py makes it)")
    v.add_argument("--clip", type=Path, default=None, help="HF CLIP ViT-B/32 folder (CLIP similarity)")
    v.add_argument("--metrics", default=None,
                   help="comma-separated of lpips,clip,md,dai (default: those whose weights are given, and dai)")
    v.add_argument("--t", type=int, default=261, help="DIFT timestep")
    v.add_argument("--ensemble", type=int, default=8, help="DIFT ensemble size")
    v.add_argument("--seed", type=int, default=42, help="DIFT noise seed")
    v.add_argument("--gammas", default="1,5,10,20", help="DAI patch radii")
    v.add_argument("--dai-double-n", action="store_true",
                   help="DAI as GoodDrag's code computes it (divided by N twice)")
    v.add_argument("--batch-size", type=int, default=4, help="samples per network batch")
    v.add_argument("--only", nargs="*", default=None, help="only these sample names")
    v.add_argument("--dtype", default="float32", help="network dtype: float32 (default, as the papers) or bfloat16")
    v.add_argument("--quiet", action="store_true")
    v.add_argument("--no-compile-cache", action="store_true")
    v.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    v.set_defaults(fn=cmd_eval)

    u = sub.add_parser("ui", help="the browser UI (Gradio): load or generate an image, paint the mask, click "
                                  "handle and target points, run; edits from all open pages run in batches")
    u.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--samples", type=Path, action="append", default=[],
                   help="a DragBench or Drag100 folder whose samples the page offers (repeatable); the toy "
                        "world's samples are always there")
    u.add_argument("--out", type=Path, default=Path("ui_out"), help="where every result is saved")
    u.add_argument("--method", default="dragtext", help="the method selected at start")
    u.add_argument("--batch-window", type=float, default=1.0,
                   help="seconds an idle queue waits for more edits to join a batch")
    u.add_argument("--max-batch", type=int, default=8, help="the most edits run together")
    u.add_argument("--quiet", action="store_true")
    _add_model_options(u)
    u.set_defaults(fn=cmd_ui)

    d = sub.add_parser("demo", help="drag an object on a toy scene with the built-in toy model")
    d.add_argument("--out", type=Path, default=Path("demo_out"))
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--dtype", default="auto")
    d.add_argument("--no-compile-cache", action="store_true")
    d.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    _add_drag_options(d)
    d.set_defaults(fn=cmd_demo)
    return ap


def main(argv=None) -> int:
    """Run a sub-command. Bad input (a request, a setting, a weight file) prints one line
    ``error: …`` and returns 2; any other failure prints ``error: …`` and returns 1; ``--debug``
    shows the traceback instead."""
    from .cluster import ClusterError
    from .data import RequestError
    from .weights import WeightsError

    args = build_parser().parse_args(argv)
    try:
        _enable_compile_cache(not args.no_compile_cache)
        return args.fn(args)
    except (RequestError, SettingsError, WeightsError, ClusterError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - the one place that turns any failure into a message
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
