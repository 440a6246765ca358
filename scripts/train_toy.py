"""Train the toy models and write ``weights/toy-sd15/`` (diffusers layout) and
``weights/toy-clip/`` (HF CLIP layout).

    python scripts/train_toy.py --init-from weights [--workdir DIR] [--out weights] \
        [--stages vae,data,unet,clip,vae_decoder,export] [--unet-steps N]

Every stage resumes from its newest orbax checkpoint in ``--workdir`` (default
``~/.cache/jaxdrag/toy-train``), so an interrupted run continues where it stopped (the data of
step k depend only on the stage seed and k) and rerunning a finished stage costs nothing.
A later session, whose machine has no such checkpoints, continues from the committed model:
``--init-from weights`` starts every network from the weights in that folder (a warm restart:
new optimiser state, the same recipe), and a larger ``--unet-steps`` trains longer. Such a
continuation says which session it is (``--session 2``: fresh data seeds) and may lower the
UNet's peak rate; the command of each session is in ``weights/toy-sd15/README.md``.
The UNet stage runs data-parallel over ``--devices`` host devices (default 2: one per core).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "jaxdrag" / "toy-train")
    ap.add_argument("--out", type=Path, default=None, help="weights folder (default: the repository's weights/)")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="a weights folder holding toy-sd15/ and toy-clip/: start each network from it "
                         "(when its stage has no checkpoint yet) instead of a random init")
    ap.add_argument("--stages", default="vae,data,unet,clip,vae_decoder,export")
    ap.add_argument("--devices", type=int, default=2, help="host devices for data-parallel steps (one per core)")
    ap.add_argument("--vae-steps", type=int, default=None)
    ap.add_argument("--unet-steps", type=int, default=None)
    ap.add_argument("--clip-steps", type=int, default=None)
    ap.add_argument("--vae-decoder-steps", type=int, default=None)
    ap.add_argument("--scenes", type=int, default=None, help="training scenes encoded for the UNet")
    ap.add_argument("--session", type=int, default=1,
                    help="which training session this is (1 = from scratch or the first warm start): offsets "
                         "every stage's data seed so that a warm restart does not replay the batches of the last")
    ap.add_argument("--unet-lr", type=float, default=None,
                    help="peak learning rate of the UNet stage (default the recipe's; lower it for a warm restart)")
    ap.add_argument("--latent-scale", type=float, default=1.0,
                    help="input scaling b (Chen 2023, 'On the importance of noise scheduling'): the UNet is "
                         "trained on latents of std b instead of 1 (scaling factor b / std), which shifts every "
                         "timestep's log-SNR by 2 log b (noisier for b < 1); exported as the VAE's scaling_factor")
    return ap.parse_args(argv)


def _initial(init_from: Path | None):
    """The networks' parameters from a committed model folder, or None (random init)."""
    if init_from is None:
        return None
    import jax.numpy as jnp
    import numpy as np
    from safetensors.numpy import load_file

    from jaxdrag import weights as W

    sd, clip = Path(init_from) / "toy-sd15", Path(init_from) / "toy-clip"
    f32 = jnp.float32
    return {"vae": W.load_diffusers_vae(sd / "vae", dtype=f32).params,
            "unet": W.load_diffusers_unet(sd / "unet", dtype=f32, lora_rank=0).params,
            "text": W.load_hf_text_encoder(sd / "text_encoder", dtype=f32).params,
            "clip": W.load_hf_clip(clip, dtype=f32).params,
            "logit_scale": jnp.float32(np.asarray(load_file(clip / "model.safetensors")["logit_scale"]))}


def _like(init, template, what: str):
    """``init`` checked to have ``template``'s tree structure and shapes (a model of another
    architecture cannot be a starting point)."""
    import jax

    if jax.tree.structure(init) != jax.tree.structure(template) or any(
            a.shape != b.shape for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(template))):
        raise SystemExit(f"error: --init-from: the {what} there has another architecture than the toy model's")
    return init


def main(argv=None) -> int:
    args = _args(argv)
    if args.devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdrag.tiny import default_weights_dir
    from jaxdrag.toy import export, models as M, train as T, world

    pick = lambda v, d: d if v is None else v
    args.vae_steps = pick(args.vae_steps, T.VAE_STAGE.steps)
    args.unet_steps = pick(args.unet_steps, T.UNET_STAGE.steps)
    args.clip_steps = pick(args.clip_steps, T.CLIP_STAGE.steps)
    args.vae_decoder_steps = pick(args.vae_decoder_steps, T.VAE_DECODER_STAGE.steps)
    args.scenes = pick(args.scenes, T.N_TRAIN_SCENES)
    if args.session < 1:
        raise SystemExit(f"error: --session {args.session}: sessions count from 1")
    if not args.latent_scale > 0:  # also rejects nan
        raise SystemExit(f"error: --latent-scale {args.latent_scale}: must be > 0")
    reseed = lambda st: replace(st, seed=st.seed + 1000 * (args.session - 1))
    init = _initial(args.init_from)
    stages = set(args.stages.split(","))
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or default_weights_dir()
    logf = open(work / "train.log", "a")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    summary_path = work / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    committed = None if args.init_from is None else Path(args.init_from) / "toy-sd15" / "training.json"
    if committed is not None and committed.exists() and "earlier_sessions" not in summary:
        # a warm restart keeps the record of the sessions it continues
        old = json.loads(committed.read_text())
        summary["earlier_sessions"] = old.pop("earlier_sessions", []) + [old]
    summary["session"] = args.session

    def note(key, value):
        summary[key] = value
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")

    # ---- VAE
    vae_stage = reseed(replace(T.VAE_STAGE, steps=args.vae_steps))
    vae = M.net(M.build_vae())

    def heldout_psnr(params) -> np.ndarray:
        """PSNR (dB) of reconstructions (posterior mean) of 64 held-out scenes."""
        imgs, _ = world.batch(np.arange(T.HELD_OUT_SEED, T.HELD_OUT_SEED + 64))
        rec = jax.jit(lambda p, x: vae.module(p).decode(vae.module(p).encode(x)[0]))(
            params, jnp.asarray(T.to_unit(imgs)))
        return T.psnr(np.asarray(jnp.clip((rec + 1) * 127.5, 0, 255).round()).astype(np.uint8), imgs)
    t0 = time.perf_counter()
    vae0 = T.vae_init(0) if init is None else _like(init["vae"], vae.template, "VAE")
    vae_params, hist = T.train("vae", work, vae0, T.vae_loss(vae),
                               lambda k: T.vae_batch(vae_stage, k), vae_stage, log)
    if "vae" in stages:
        ps = heldout_psnr(vae_params)
        log(f"[vae] held-out PSNR mean {ps.mean():.2f} dB, min {ps.min():.2f} dB")
        note("vae", {"stage": T.stage_dict(vae_stage), "history": hist, "heldout_psnr_mean": float(ps.mean()),
                     "heldout_psnr_min": float(ps.min()), "wall_s": time.perf_counter() - t0})
    if not stages & {"data", "unet", "clip", "export"}:
        return 0

    # ---- encoded data
    data = T.encode_dataset(vae, vae_params, args.scenes, work, log)
    sf = float(data["scaling_factor"]) * args.latent_scale
    log(f"[data] {len(data['means'])} scenes, scaling factor {sf:.5f} (latent scale {args.latent_scale:g})")

    # ---- UNet + text encoder
    unet_stage = reseed(replace(T.UNET_STAGE, steps=args.unet_steps, lr=pick(args.unet_lr, T.UNET_STAGE.lr)))
    unet, text = M.net(M.build_unet()), M.net(M.build_text())
    t0 = time.perf_counter()
    params0 = ({"unet": M.init_params(M.build_unet(), 10), "text": M.init_params(M.build_text(), 11)}
               if init is None else {"unet": _like(init["unet"], unet.template, "UNet"),
                                     "text": _like(init["text"], text.template, "text encoder")})
    ut, hist = T.train("unet", work, params0, T.unet_loss(unet, text, sf, min_snr=unet_stage.min_snr),
                       lambda k: T.unet_batch(unet_stage, data, k), unet_stage, log,
                       trainable=T.is_not_token_embedding)
    if "unet" in stages:
        note("unet", {"stage": T.stage_dict(unet_stage), "history": hist, "wall_s": time.perf_counter() - t0})

    # ---- CLIP
    from jaxdrag.tokenizer import Tokenizer

    tok = Tokenizer()
    clip_stage = reseed(replace(T.CLIP_STAGE, steps=args.clip_steps))
    clip = M.net(M.build_clip())
    t0 = time.perf_counter()
    params0 = ({"clip": M.init_params(M.build_clip(), 20), "logit_scale": jnp.float32(2.6592)}
               if init is None else {"clip": _like(init["clip"], clip.template, "CLIP"),
                                     "logit_scale": init["logit_scale"]})
    cp, hist = T.train("clip", work, params0, T.clip_loss(clip),
                       lambda k: T.clip_batch(clip_stage, k, tok), clip_stage, log, parallel=False)
    if "clip" in stages:
        note("clip", {"stage": T.stage_dict(clip_stage), "history": hist, "wall_s": time.perf_counter() - t0})

    # ---- VAE decoder fine-tune (encoder and latent space fixed)
    dec_stage = reseed(replace(T.VAE_DECODER_STAGE, steps=args.vae_decoder_steps))
    t0 = time.perf_counter()
    vae_params, hist = T.train("vae_decoder", work, vae_params, T.vae_decoder_loss(vae),
                               lambda k: T.vae_batch(dec_stage, k), dec_stage, log, trainable=T.is_decoder)
    if "vae_decoder" in stages:
        ps = heldout_psnr(vae_params)
        log(f"[vae_decoder] held-out PSNR mean {ps.mean():.2f} dB, min {ps.min():.2f} dB")
        note("vae_decoder", {"stage": T.stage_dict(dec_stage), "history": hist,
                             "heldout_psnr_mean": float(ps.mean()), "heldout_psnr_min": float(ps.min()),
                             "wall_s": time.perf_counter() - t0})

    # ---- export
    if "export" in stages:
        info = {"world": "jaxdrag.toy.world", "world_version": world.VERSION, "scaling_factor": sf,
                "latent_scale": args.latent_scale,
                "init_from": None if args.init_from is None else "the committed model (warm start)",
                "session": args.session,
                "steps": {"vae": vae_stage.steps, "unet": unet_stage.steps, "clip": clip_stage.steps,
                          "vae_decoder": dec_stage.steps}}
        p = export.write_sd(out, vae_params, ut["unet"], ut["text"], sf, info)
        log(f"wrote {p}")
        p = export.write_clip(out, cp["clip"], float(cp["logit_scale"]), info)
        log(f"wrote {p}")
        (out / export.SD_NAME / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
