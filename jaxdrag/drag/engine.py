"""The engine's shared types: what every host (``hosts.py``) is written against.

``DragNetworks`` (the network functions), ``DragConfig`` (the compiled settings, every host's),
``DragHypers`` (the continuous settings, arrays per edit), ``DragInputs`` (an edit's constants),
the failure record every host keeps, the batched ``while_live`` loop every host runs, and
``Host``: the interface a host module provides (its preparation, loop, stop flag, update budget
and how its result is denoised). Imports nothing of the hosts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ..schedule import DDIM

Array = jax.Array


@dataclass(frozen=True, eq=False)
class DragNetworks:
    """The two network functions the engine calls (hashed by identity: build once, reuse)."""

    features: Callable
    clip_image: Callable | None = None
    # DragNoise: features_mid(shared, edit, z, c, t, h) is ``features`` with the mid-block output
    # replaced by h; bottleneck(shared, edit, z, c, t) -> h (the mid-block output).
    # Every function takes ``sizes=`` (DragInputs.sizes): the edit's valid sizes in a masked canvas
    features_mid: Callable | None = None
    bottleneck: Callable | None = None


@dataclass(frozen=True)
class DragConfig:
    """Static (structural) settings; changing one recompiles. Defaults: DragDiffusion."""

    r_m: int = 1                    # motion-supervision patch radius r1
    r_p: int = 3                    # tracking window radius r2
    max_step: float = 1.0           # β: step length min(β, distance); 1 = DragDiffusion's unit step
    ms_reference: str = "current"   # "current" (DragDiffusion) | "initial" (CLIPDrag, GoodDrag)
    ms_weight: float | None = None  # None = (2r1+1)² (GoodDrag: (2r1)²)
    tracking: str = "nearest"       # "nearest" | "fast" (CLIPDrag)
    max_iters: int = 80
    optimize_text: bool = False     # DragText
    use_clip: bool = False          # CLIPDrag's global gradient and fusion
    fusion: str = "paper"           # "paper" | "code" | "project" | "add" | "prograd" (fusion.RULES)
    stale_latent_grad: bool = False  # reproduce DragText's / FreeDrag's stale latent gradient (QUIRK)
    host: str = "dragdiffusion"     # the drag algorithm: a name in hosts.REGISTRY (CLIPDrag runs on "dragdiffusion")
    background: str = "masked"      # "masked": no mask drawn → no background term; "always": whole image
    bg_reduction: str = "sum"       # background L1 reduction over the latent: "sum" | "mean" (FreeDrag)
    # GoodDrag (§5): drag over the first ``drag_end_step`` timesteps, ``track_per_step`` trackings
    # per timestep, tracking after every ``max_drag_per_track`` motion-supervision steps, early
    # stop after ``max_track_no_change`` trackings that moved no handle
    drag_end_step: int = 7
    track_per_step: int = 10
    max_drag_per_track: int = 3
    max_track_no_change: int = 5
    block_steps: int = 5            # FreeDrag (§6): Adam steps per line-search block
    end_step: int = 0               # DragNoise (§7): inject h while the step index < 50 − end_step
    # DragText App. H: the decoder block (up_blocks index; the paper's "Block #k" is k − 1) whose
    # features drive the text embedding's motion term; None = the latent's block (up_blocks[2]).
    # The networks must then return that block's map as a third output (Pipeline.drag_networks)
    text_feature_block: int | None = None
    # CLIPDrag Tables 1–2 in one run: snapshots of (z, ĉ) at these iteration caps (each ≤ max_iters);
    # a snapshot equals the final state of a run with max_iters = that cap
    snapshots: tuple[int, ...] = ()
    sup_hw: tuple[int, int] = (256, 256)  # supervision resolution (h_s, w_s) = (H//2, W//2)
    schedule: DDIM = field(default_factory=DDIM)

    def __post_init__(self):
        # choices and ranges from the settings table (settings.py), for configs built directly; the
        # host's capabilities from the registry (imported here: the registry imports the host
        # modules, which import this one)
        from .hosts import REGISTRY, splitting
        from .settings import SETTINGS

        if self.host not in REGISTRY:
            raise ValueError(f"host must be one of {tuple(REGISTRY)}, got {self.host!r}")
        host = REGISTRY[self.host]
        for st in SETTINGS:
            if st.continuous or not hasattr(self, st.name):
                continue
            v = getattr(self, st.name)
            if st.kind == "choice" and v not in st.choices:
                allowed = (" or ".join(repr(c) for c in st.choices) if len(st.choices) == 2
                           else f"one of {st.choices}")
                raise ValueError(f"{st.name} must be {allowed}, got {v!r}")
            if st.kind in ("int", "float") and v is not None and st.range:
                low = 0 if st.range == "nonnegative" else (1 if st.kind == "int" else None)
                if low is None and not v > 0:
                    raise ValueError(f"{st.name} must be > 0, got {v}")
                if low is not None and v < low:
                    raise ValueError(f"{st.name} must be ≥ {low}, got {v}")
        if self.text_feature_block is not None:
            if not self.optimize_text:
                raise ValueError("text_feature_block needs a DragText method (the text embedding is not optimised)")
            if not host.splits:
                raise ValueError(f"text_feature_block is implemented on the hosts {splitting()} (DragText's "
                                 f"Appendix H runs on DragDiffusion), not {self.host!r}")
            if int(self.text_feature_block) < 0:
                raise ValueError(f"text_feature_block must be ≥ 0, got {self.text_feature_block}")
        if self.snapshots:
            caps = tuple(int(c) for c in self.snapshots)
            if not host.splits:
                raise ValueError(f"snapshots are implemented on the hosts {splitting()} (an iteration cap is "
                                 f"max_iters; GoodDrag and FreeDrag count their budgets otherwise), "
                                 f"not {self.host!r}")
            if min(caps) < 1 or max(caps) > self.max_iters:
                raise ValueError(f"snapshots must lie in 1..max_iters = {self.max_iters}, got {list(caps)}")
            if list(caps) != sorted(set(caps)):
                raise ValueError(f"snapshots must be increasing without repeats, got {list(caps)}")
            object.__setattr__(self, "snapshots", caps)


class DragHypers(NamedTuple):
    """Continuous hyperparameters, each a float32 array (per edit when batched)."""

    latent_lr: Array
    text_lr: Array
    lam: Array          # background weight λ
    text_lam: Array     # DragText λ_t
    fuse_weight: Array  # CLIPDrag fusion λ
    clip_coef: Array    # CLIPDrag κ
    drag_loss_threshold: Array  # GoodDrag: also track once L_drag ≤ threshold·(2r1)²
    l_expected: Array   # FreeDrag: expected feature distance L of the line search
    d_max: Array        # FreeDrag: longest line-search step (supervision px)

    @classmethod
    def make(cls, latent_lr=0.01, text_lr=0.004, lam=0.1, text_lam=0.1, fuse_weight=0.7,
             clip_coef=300.0, drag_loss_threshold=0.0, l_expected=1.0, d_max=5.0) -> "DragHypers":
        return cls(*(jnp.asarray(v, jnp.float32) for v in
                     (latent_lr, text_lr, lam, text_lam, fuse_weight, clip_coef, drag_loss_threshold,
                      l_expected, d_max)))


class DragInputs(NamedTuple):
    """Per-edit constants of the loop (see ``prepare``)."""

    z0: Array            # (h, w, 4) the inverted latent z* (t = t*)
    c0: Array            # (T, D) original text embedding
    handles0: Array      # (N, 2)
    targets: Array       # (N, 2)
    mask: Array          # (N,) bool
    keep: Array          # (h, w, 1) background weight map (zeros = no background term)
    token_mask: Array    # (T,) DragText regularised positions
    clip_text: Array     # (P,) CLIP text embedding of the edit prompt ((1,) if unused)
    t_star: Array        # () int32
    hypers: DragHypers
    # a masked canvas (models.canvas): the edit's valid (h, w) latent and (h_s, w_s) supervision
    # sizes inside the arrays above, (4,) int32; None: the arrays are the edit
    sizes: Array | None = None

    @property
    def latent_size(self) -> Array | None:
        """(h, w) of the edit's latent in a masked canvas, or None."""
        return None if self.sizes is None else self.sizes[:2]

    @property
    def sup_size(self) -> Array | None:
        """(h_s, w_s) of the edit's supervision map in a masked canvas, or None."""
        return None if self.sizes is None else self.sizes[2:]


def sized(fn: Callable, sizes: Array | None) -> Callable:
    """A network function with the edit's canvas sizes bound (``DragInputs.sizes``), or itself
    when there are none (then network functions that know no canvases serve as well)."""
    return fn if sizes is None else partial(fn, sizes=sizes)


FAILURES = ("forward", "loss", "latent", "text")


def failure_update(st, fail_now: Array, checks: Array) -> dict:
    """The failure fields of a host's next state: an edit whose ``checks`` (the FAILURES, in
    order, True = finite) failed now is flagged with the iteration and what went non-finite."""
    return dict(failed=st.failed | fail_now, fail_it=jnp.where(fail_now, st.it, st.fail_it),
                fail_what=jnp.where(fail_now, jnp.argmin(checks).astype(jnp.int32), st.fail_what))




def while_live(step_one: Callable, live: Callable, edits, inputs, state,
               progress: Callable[[Any, Any], None] | None = None):
    """``lax.while_loop`` of ``step_one(edit, inputs, state)`` vmapped over edits while any edit is
    live (``live(state)`` → (B,) bool); ``progress(it, done)`` (host callback) once per iteration.
    The loop of every host."""
    batched = jax.vmap(step_one)

    def body(st):
        new = batched(edits, inputs, st)
        if progress is not None:
            jax.debug.callback(progress, new.it, new.done)
        return new

    return jax.lax.while_loop(lambda st: jnp.any(live(st)), body, state)


@dataclass(frozen=True, eq=False)
class Host:
    """A drag algorithm, as the pipeline sees it. Every host module builds one; ``hosts.REGISTRY``
    maps names to them. Per edit, shapes as in ``DragInputs``; batched functions take a leading
    edit axis.

    prepare(nets, cfg, shared, edit, z0, c0, handles0, targets, mask, keep, token_mask, clip_text,
            t_star, hypers) -> (inputs, state)      one edit's constants and initial state
    run(nets, cfg, shared, edits, inputs, state, progress) -> state   the batched while_loop
    reached(cfg, state) -> (B,) bool               every handle reached its target
    update_budget(cfg) -> int                      the most latent updates (the loss record's length)
    denoise_plan(cfg, zt, c0, inputs, state, strength, reference, steps) -> dict
        the keyword arguments of ``Pipeline.denoise`` (all but the LoRAs) after the drag: zt the
        inverted latents (B, h, w, 4), c0 (B, T, D), strength the inversion strength, reference
        mutual self-attention on, steps the DDIM steps of the schedule
    variable: the ``denoise`` keyword holding the optimised variable (DragText's interpolation
        moves it); variable_start(nets, shared, edit, z0, c0, t) -> its value before the drag
        (None: the plan's ``z_src``)
    splits: the loop counts ``max_iters`` and can take ``text_feature_block`` and ``snapshots``
    reference_attention: the final denoise uses mutual self-attention when asked
    guided_generation: drags on generated images with guidance ≠ 1 are possible
    """

    name: str
    title: str
    prepare: Callable
    run: Callable
    reached: Callable
    update_budget: Callable
    denoise_plan: Callable
    variable: str = "z_edit"
    variable_start: Callable | None = None
    splits: bool = False
    reference_attention: bool = True
    guided_generation: bool = True


def max_iters_budget(cfg: DragConfig) -> int:
    """The update budget of a host that counts iterations: ``max_iters``."""
    return cfg.max_iters


def pair_plan(cfg: DragConfig, zt, c0, inputs, state, strength: float, reference: bool, steps: int) -> dict:
    """The denoise after a drag of z: the pair [z*, ẑ] on [c, ĉ] with mutual self-attention
    (DragDiffusion, CLIPDrag, FreeDrag)."""
    return dict(z_src=zt, z_edit=state.z, c_src=c0, c_edit=state.c, strength=strength, reference=reference)
