"""Training of the toy models: pure jitted train steps (optax), orbax checkpoints so an
interrupted run resumes exactly (the data of step k depend only on the stage seed and k).

Stages (each resumable, run in this order by ``scripts/train_toy.py``):
  vae   — KL autoencoder on random 64×64 crops of scenes (fully convolutional, so it runs on the
          full 128×128 scenes afterwards): L1 + L2 reconstruction + a small KL term.
  data  — the training scenes (seeds 0…N−1) encoded once: posterior means and standard deviations,
          caption token ids; the VAE's scaling factor = 1 / std of the latent means (as SD's 0.18215).
  unet  — ε-prediction on SD-1.5's scaled-linear 1000-step schedule, jointly with the CLIP text
          tower (the caption conditions the image); captions dropped to "" 10 % of the time so
          classifier-free guidance works.
  clip  — a CLIP of the ViT-B/16 architecture, contrastive (symmetric InfoNCE, learned temperature)
          on fresh scene/caption pairs, with CLIPDrag's differentiable preprocessing.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..schedule import DDIM, add_noise
from . import models as M
from . import world

Array = jax.Array


@dataclass(frozen=True)
class Stage:
    """Optimisation settings of one stage: AdamW with linear warm-up then cosine decay to
    ``lr·final_frac``, global-norm clipping 1; ``ema`` > 0 keeps an exponential moving average of
    the parameters (decay per step, with the usual (1 + k)/(10 + k) ramp) that ``train`` returns
    instead of the raw parameters; ``min_snr`` > 0 weights the UNet's ε loss per timestep by
    min(SNR, γ)/SNR (Hang et al. 2023, "Min-SNR")."""

    steps: int
    batch: int
    lr: float
    warmup: int = 100
    final_frac: float = 0.1
    weight_decay: float = 0.0
    ckpt_every: int = 100
    seed: int = 0
    ema: float = 0.0
    min_snr: float = 0.0

    def optimizer(self) -> optax.GradientTransformation:
        sched = optax.warmup_cosine_decay_schedule(0.0, self.lr, min(self.warmup, self.steps // 2),
                                                   max(self.steps, 1), self.lr * self.final_frac)
        return optax.chain(optax.clip_by_global_norm(1.0),
                           optax.adamw(sched, b1=0.9, b2=0.999, weight_decay=self.weight_decay))


# defaults of world v2, sized for one ≈ 2 h session of a 2-core CPU when the stages start from
# the v1 weights (``--init-from``; measured step times in weights/toy-sd15/README.md)
VAE_STAGE = Stage(steps=800, batch=16, lr=5e-4, warmup=50, seed=11)
UNET_STAGE = Stage(steps=6000, batch=32, lr=6e-4, warmup=200, seed=12, ema=0.999, min_snr=5.0)
CLIP_STAGE = Stage(steps=300, batch=96, lr=5e-4, weight_decay=0.01, warmup=30, seed=13)
N_TRAIN_SCENES = 16000
HELD_OUT_SEED = 1_000_000  # seeds ≥ this are never trained on (evaluation, ToyBench)
CROP = 64
KL_WEIGHT = 1e-6  # per latent element vs per pixel: SD's VAE uses 1e-6 on sums
CAPTION_DROP = 0.1


# ----------------------------------------------------------------------------------------------
# the resumable loop


def _key(k) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def _flat(tree) -> dict[str, np.ndarray]:
    return {f"{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def _unflat(like, flat: dict) -> Any:
    leaves, treedef = jax.tree.flatten(like)
    if len(flat) != len(leaves):
        raise ValueError(f"checkpoint has {len(flat)} arrays, the model {len(leaves)}: "
                         f"it was written for another architecture")
    return jax.tree.unflatten(treedef, [jnp.asarray(flat[f"{i:05d}"]) for i in range(len(leaves))])


def _grad_fn(loss_fn: Callable, batch_size: int) -> Callable:
    """(params, batch, key) → ((loss, aux), grads), data-parallel over the host's devices when
    there are several and they divide the batch: each device takes a slice of the batch (and
    its own noise key), gradients and losses are averaged. On a 2-core CPU, two host devices
    (``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set by scripts/train_toy.py) run
    1.3–1.4× more examples per second than one (measured in weights/toy-sd15/README.md)."""
    vg = jax.value_and_grad(loss_fn, has_aux=True)
    devices = jax.devices()
    if len(devices) < 2 or batch_size < len(devices) or batch_size % len(devices):
        return vg
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.asarray(devices), ("data",))

    def shard(params, batch, key):
        key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        (loss, aux), g = vg(params, batch, key)
        return jax.lax.pmean(((loss, aux), g), "data")

    return jax.shard_map(shard, mesh=mesh, in_specs=(P(), P("data"), P()), out_specs=P(),
                         check_vma=False)


def ema_update(ema, params, decay: float, k):
    """One EMA step with the warm-up ramp min(decay, (1 + k)/(10 + k)) (k = step index)."""
    d = jnp.minimum(decay, (1.0 + k) / (10.0 + k))
    return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)


def train(name: str, workdir: Path, params, loss_fn: Callable, batch_fn: Callable[[int], Any],
          stage: Stage, log: Callable[[str], None] = print, trainable: Callable[[tuple], bool] | None = None,
          parallel: bool = True):
    """Run ``stage.steps`` steps of ``loss_fn(params, batch, key) -> (loss, aux)``, resuming from
    the newest orbax checkpoint under ``workdir/name``; returns (params, history) where history is
    a list of (step, loss), and params are the EMA parameters when ``stage.ema`` > 0.
    ``batch_fn(step)`` must be deterministic in ``step``.
    ``trainable(path)`` (optional) selects the parameters to update; the others stay fixed.
    ``parallel``: split each batch over the host's devices (``_grad_fn``); off for losses that
    couple the examples of a batch (CLIP's contrastive loss)."""
    import orbax.checkpoint as ocp

    tx = stage.optimizer()
    if trainable is not None:
        labels = jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if trainable(tuple(_key(k) for k in path)) else "fixed", params)
        tx = optax.multi_transform({"train": tx, "fixed": optax.set_to_zero()}, labels)
    opt = tx.init(params)
    ema = params  # the average (unused, and not saved, when stage.ema == 0)
    mngr = ocp.CheckpointManager(Path(workdir).resolve() / name,
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    start, history = 0, []
    latest = mngr.latest_step()
    if latest is not None:
        items = dict(params=ocp.args.StandardRestore(_flat(params)), opt=ocp.args.StandardRestore(_flat(opt)),
                     meta=ocp.args.JsonRestore())
        if stage.ema > 0:
            items["ema"] = ocp.args.StandardRestore(_flat(ema))
        state = mngr.restore(latest, args=ocp.args.Composite(**items))
        params, opt = _unflat(params, state["params"]), _unflat(opt, state["opt"])
        ema = _unflat(ema, state["ema"]) if stage.ema > 0 else params
        start, history = int(latest), [tuple(h) for h in state["meta"]["history"]]
        log(f"[{name}] resumed at step {start}")
    if start >= stage.steps:
        return (ema if stage.ema > 0 else params), history

    grad_fn = _grad_fn(loss_fn, stage.batch if parallel else 1)

    @jax.jit
    def step_fn(params, opt, ema, batch, key, k):
        (loss, aux), g = grad_fn(params, batch, key)
        upd, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, upd)
        if stage.ema > 0:
            ema = ema_update(ema, params, stage.ema, k)
        return params, opt, ema, loss, aux

    def save(k):
        items = dict(params=ocp.args.StandardSave(_flat(params)), opt=ocp.args.StandardSave(_flat(opt)),
                     meta=ocp.args.JsonSave({"history": history}))
        if stage.ema > 0:  # a stage without an average saves no copy of its parameters
            items["ema"] = ocp.args.StandardSave(_flat(ema))
        mngr.save(k, args=ocp.args.Composite(**items))

    base = jax.random.PRNGKey(stage.seed)
    t0, recent = time.perf_counter(), []
    for k in range(start, stage.steps):
        params, opt, ema, loss, _ = step_fn(params, opt, ema, batch_fn(k), jax.random.fold_in(base, k),
                                            jnp.float32(k))
        recent.append(float(loss))
        if (k + 1) % 25 == 0 or k + 1 == stage.steps:
            history.append((k + 1, float(np.mean(recent))))
            dt = (time.perf_counter() - t0) / len(recent)
            log(f"[{name}] step {k + 1}/{stage.steps} loss {np.mean(recent):.5f} ({dt:.2f} s/step)")
            recent, t0 = [], time.perf_counter()
        if (k + 1) % stage.ckpt_every == 0 or k + 1 == stage.steps:
            save(k + 1)
    mngr.wait_until_finished()
    return (ema if stage.ema > 0 else params), history


# ----------------------------------------------------------------------------------------------
# VAE


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 → float32 in [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def vae_batch(stage: Stage, k: int) -> np.ndarray:
    """(B, CROP, CROP, 3) crops of random training scenes, in [-1, 1]: three in four centred
    (± CROP/4) on a random object, the rest anywhere (objects cover a few % of a scene, so
    uniform crops would show the autoencoder mostly background)."""
    rng = np.random.default_rng((stage.seed, k))
    lim = world.IMAGE_SIZE - CROP
    crops = []
    for seed in rng.integers(0, HELD_OUT_SEED, stage.batch):
        sc = world.random_scene(int(seed))
        if rng.random() < 0.75:
            o = sc.spec.objects[rng.integers(len(sc.spec.objects))]
            jx, jy = rng.integers(-CROP // 4, CROP // 4 + 1, 2)
            x = int(np.clip(round(o.x) - CROP // 2 + jx, 0, lim))
            y = int(np.clip(round(o.y) - CROP // 2 + jy, 0, lim))
        else:
            x, y = (int(v) for v in rng.integers(0, lim + 1, 2))
        crops.append(sc.image[y:y + CROP, x:x + CROP])
    return to_unit(np.stack(crops))


LOGVAR_INIT = -6.0


def vae_init(seed: int = 0):
    """The VAE's initial parameters, with the log-variance half of ``quant_conv``'s bias at
    ``LOGVAR_INIT`` (posterior σ ≈ 0.05): with σ ≈ 1 from a plain init the sampled latents are so
    noisy that the decoder learns shapes long before colours."""
    from .. import weights

    params = M.init_params(M.build_vae(), seed)
    flat = weights.flat(params)
    b = np.asarray(flat[("quant_conv", "bias")]).copy()
    b[b.shape[0] // 2:] = LOGVAR_INIT
    flat[("quant_conv", "bias")] = jnp.asarray(b)
    return weights.from_flat(params, flat)


def vae_loss(vae: M.Net):
    def loss(params, x, key):
        m = vae.module(params)
        mean, logvar = m.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        err = m.decode(z) - x
        rec = jnp.mean(jnp.abs(err)) + jnp.mean(jnp.square(err))
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        return rec + KL_WEIGHT * kl, kl
    return loss


VAE_DECODER_STAGE = Stage(steps=1000, batch=16, lr=3e-4, warmup=20, seed=14)


def is_decoder(path: tuple) -> bool:
    """The decoder's parameters (``decoder.*``, ``post_quant_conv.*``): fine-tuned alone after the
    UNet has been trained on the encoder's latents (as SD's ``sd-vae-ft-mse``), so the latent
    space the UNet learnt stays exactly the same."""
    return bool(path) and str(path[0]) in ("decoder", "post_quant_conv")


def vae_decoder_loss(vae: M.Net):
    """Reconstruction only (the encoder, hence the posterior, is fixed)."""
    def loss(params, x, key):
        m = vae.module(params)
        mean, logvar = m.encode(x)
        z = jax.lax.stop_gradient(mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape))
        err = m.decode(z) - x
        rec = jnp.mean(jnp.abs(err)) + jnp.mean(jnp.square(err))
        return rec, rec
    return loss


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 (or 0–255 float) images (B, H, W, 3)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=(1, 2, 3))
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


# ----------------------------------------------------------------------------------------------
# encoded training data


def encode_dataset(vae: M.Net, params, n: int, workdir: Path, log=print) -> dict:
    """Encode training scenes 0…n−1 once (cached in ``workdir/latents.npz``): posterior means and
    stds (unscaled), caption ids, and the scaling factor 1/std(means)."""
    from ..tokenizer import Tokenizer

    path = Path(workdir) / "latents.npz"
    if path.exists():
        d = dict(np.load(path))
        if len(d["means"]) == n:
            return d
    enc = jax.jit(lambda p, x: vae.module(p).encode(x))
    tok = Tokenizer()
    means, stds, ids = [], [], []
    for s in range(0, n, 64):
        seeds = np.arange(s, min(n, s + 64))
        imgs, caps = world.batch(seeds)
        m, lv = enc(params, jnp.asarray(to_unit(imgs)))
        means.append(np.asarray(m))
        stds.append(np.asarray(jnp.exp(0.5 * lv)))
        ids.append(tok.ids(caps))
        if s % 1280 == 0:
            log(f"[data] encoded {s + len(seeds)}/{n}")
    d = {"means": np.concatenate(means), "stds": np.concatenate(stds), "ids": np.concatenate(ids),
         "empty_ids": tok.ids([""])[0]}
    d["scaling_factor"] = np.float32(1.0 / d["means"].std())
    tmp = path.with_name("latents.tmp.npz")
    np.savez(tmp, **d)
    tmp.replace(path)
    return d


# ----------------------------------------------------------------------------------------------
# UNet + text encoder


def unet_batch(stage: Stage, data: dict, k: int) -> dict:
    rng = np.random.default_rng((stage.seed, k))
    idx = rng.integers(0, len(data["means"]), stage.batch)
    ids = data["ids"][idx].copy()
    drop = rng.random(stage.batch) < CAPTION_DROP
    ids[drop] = data["empty_ids"]
    return {"mean": data["means"][idx], "std": data["stds"][idx], "ids": ids}


def snr_weight(sched: DDIM, t: Array, gamma: float) -> Array:
    """Min-SNR-γ weight of the ε loss at timesteps t: min(SNR_t, γ)/SNR_t, SNR_t = ᾱ_t/(1 − ᾱ_t)
    (1 everywhere when γ ≤ 0). It down-weights the low-noise timesteps whose ε targets are
    nearly unlearnable, so the capacity goes to the structure-forming ones."""
    if gamma <= 0:
        return jnp.ones(t.shape, jnp.float32)
    ab = jnp.asarray(sched.alphas_cumprod, jnp.float32)[t]
    snr = ab / (1.0 - ab)
    return jnp.minimum(snr, gamma) / snr


def unet_loss(unet: M.Net, text: M.Net, scaling_factor: float, sched: DDIM = DDIM(), min_snr: float = 0.0):
    """ε-prediction MSE (per example weighted by ``snr_weight``); aux = the unweighted MSE."""
    def loss(params, b, key):
        k1, k2, k3 = jax.random.split(key, 3)
        ctx = text.module(params["text"])(b["ids"])[0]
        z0 = (b["mean"] + b["std"] * jax.random.normal(k1, b["mean"].shape)) * scaling_factor
        t = jax.random.randint(k2, (z0.shape[0],), 0, sched.num_train_timesteps)
        noise = jax.random.normal(k3, z0.shape)
        eps = unet.module(params["unet"])(add_noise(sched, z0, noise, t), t, ctx)[0]
        per = jnp.mean(jnp.square(eps - noise), axis=(1, 2, 3))
        return jnp.mean(snr_weight(sched, t, min_snr) * per), jnp.mean(per)
    return loss


def is_not_token_embedding(path: tuple) -> bool:
    """Everything but the text encoder's 49408-row token table: it stays at its (initial or
    loaded) values, since the toy captions use a few dozen of its rows and its dense gradient and
    AdamW update over 3.2 M entries cost more than the rest of the text encoder's training."""
    return "token_embedding" not in [str(p) for p in path]


# ----------------------------------------------------------------------------------------------
# CLIP


def clip_batch(stage: Stage, k: int, tok) -> dict:
    rng = np.random.default_rng((stage.seed, k))
    imgs, caps = world.batch(rng.integers(0, HELD_OUT_SEED, stage.batch))
    return {"images": to_unit(imgs), "ids": tok.ids(caps)}


def clip_loss(clip: M.Net):
    from ..pipeline import clip_pixels

    def loss(params, b, key):
        m = clip.module(params["clip"])
        ei = m.image_embeds(clip_pixels(jnp.asarray(b["images"]), m.vision_cfg.image_size))
        et = m.text_embeds(b["ids"])
        ei = ei / jnp.linalg.norm(ei, axis=-1, keepdims=True)
        et = et / jnp.linalg.norm(et, axis=-1, keepdims=True)
        logits = jnp.exp(jnp.minimum(params["logit_scale"], np.log(100.0))) * ei @ et.T
        labels = jnp.arange(logits.shape[0])
        ce = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                    + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
        acc = jnp.mean(jnp.argmax(logits, axis=1) == labels)
        return ce, acc
    return loss


def stage_dict(stage: Stage) -> dict:
    return asdict(stage)


def write_history(path: Path, history: dict) -> None:
    path.write_text(json.dumps(history, indent=1) + "\n")
