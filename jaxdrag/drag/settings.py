"""Every drag setting, declared once: its type, valid range or choices, which hosts read it, a
sentence of help a user understands, and (for the settings the UI shows) its label. The method
presets (``methods.py``) give each method's defaults; the validation in ``methods.resolve``, the
command line's options and help (``cli/options.py``), the "not used by method X" errors
(``methods.valid_settings``) and the UI's fields (``ui/settings.py``) are generated from this table.

A setting is *compiled* (part of ``DragConfig``: changing it builds another program) or
*continuous* (part of ``DragHypers``: an array per edit, so edits that differ only in it share
a batch — a sweep is a batch).
"""

from __future__ import annotations

from dataclasses import dataclass

HOSTS_ALL = ("*",)  # every host of the registry (hosts.py), a new one included
_DD_LIKE = ("dragdiffusion", "dragnoise")  # the hosts of loop.py, CLIPDrag included


@dataclass(frozen=True)
class Setting:
    """One drag setting. kind: "int" | "float" | "bool" | "choice" | "ints" (a list of counts);
    range: "positive" | "nonnegative" | None; hosts: the hosts whose loop reads it; extra: read
    only by DragText methods ("text"), CLIPDrag methods ("clip"), or DragText methods on the
    split-loop hosts ("split_text"), on top of ``hosts``; continuous: a ``DragHypers`` field."""

    name: str
    kind: str
    help: str
    hosts: tuple[str, ...] = ()
    range: str | None = None
    choices: tuple[str, ...] = ()
    extra: str | None = None
    continuous: bool = False
    label: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


# the order is the order users see (help, error messages listing a method's settings)
SETTINGS: tuple[Setting, ...] = (
    Setting("r_m", "int", "motion-supervision patch radius r1 in supervision pixels (DragDiffusion 1, "
            "CLIPDrag and GoodDrag 4; FreeDrag's template radius)", HOSTS_ALL, "nonnegative"),
    Setting("r_p", "int", "point-tracking search radius r2 in supervision pixels (DragDiffusion 3, "
            "CLIPDrag and GoodDrag 12)", ("dragdiffusion", "gooddrag", "dragnoise"), "nonnegative"),
    Setting("max_step", "float", "longest handle step per motion-supervision update, in supervision "
            "pixels (1 = DragDiffusion's unit step; GoodDrag's β 4)", ("dragdiffusion", "gooddrag", "dragnoise"),
            "positive"),
    Setting("ms_reference", "choice", "features the moved patch is pulled towards: the current "
            "iteration's (DragDiffusion) or the initial image's (CLIPDrag, GoodDrag)", _DD_LIKE,
            choices=("current", "initial")),
    Setting("ms_weight", "float", "weight of the motion-supervision L1 sum (default (2r1+1)²; "
            "GoodDrag (2r1)²)", ("dragdiffusion", "gooddrag", "dragnoise"), "positive"),
    Setting("tracking", "choice", "point tracking: nearest neighbour in the window (DragDiffusion) or "
            "CLIPDrag's fast tracking (only moves that bring a handle closer)", _DD_LIKE,
            choices=("nearest", "fast")),
    Setting("max_iters", "int", "largest number of latent updates (DragDiffusion 80, CLIPDrag 40, "
            "FreeDrag 300)", ("dragdiffusion", "freedrag", "dragnoise"), "positive", label="max iterations"),
    Setting("block_steps", "int", "FreeDrag: Adam steps per line-search block", ("freedrag",), "positive"),
    Setting("background", "choice", "the background term: only when a mask is drawn ('masked', "
            "DragDiffusion) or always over the whole image ('always': GoodDrag, DragNoise)", HOSTS_ALL,
            choices=("masked", "always")),
    Setting("bg_reduction", "choice", "how the background L1 is reduced over the latent: 'sum' or "
            "'mean' (FreeDrag)", HOSTS_ALL, choices=("sum", "mean")),
    Setting("drag_end_step", "int", "GoodDrag: drag over the first this many denoising timesteps",
            ("gooddrag",), "positive"),
    Setting("track_per_step", "int", "GoodDrag: point trackings per timestep", ("gooddrag",), "positive"),
    Setting("max_drag_per_track", "int", "GoodDrag: motion-supervision steps between trackings",
            ("gooddrag",), "positive"),
    Setting("max_track_no_change", "int", "GoodDrag: stop after this many trackings that moved no handle",
            ("gooddrag",), "positive"),
    Setting("end_step", "int", "DragNoise: inject the optimised bottleneck while the denoising step "
            "index is below 50 − end_step", ("dragnoise",), "nonnegative"),
    Setting("stale_latent_grad", "bool", "reproduce the reference code's stale latent gradient "
            "(DragText's and FreeDrag's released code; the papers' update is the default)", ("freedrag",),
            extra="text"),
    Setting("latent_lr", "float", "learning rate of the optimised latent (DragDiffusion 0.01, GoodDrag "
            "and DragNoise 0.02)", HOSTS_ALL, "positive", continuous=True, label="latent learning rate"),
    Setting("lam", "float", "weight λ of the background term (DragDiffusion 0.1, FreeDrag 10, DragNoise "
            "0.2)", HOSTS_ALL, "nonnegative", continuous=True, label="λ (background)"),
    Setting("drag_loss_threshold", "float", "GoodDrag: skip motion supervision of a handle whose loss "
            "is below this", ("gooddrag",), "nonnegative", continuous=True),
    Setting("l_expected", "float", "FreeDrag: the feature distance L its line search aims for",
            ("freedrag",), "positive", continuous=True),
    Setting("d_max", "float", "FreeDrag: largest step of a line search, in supervision pixels",
            ("freedrag",), "positive", continuous=True),
    Setting("text_lr", "float", "DragText: learning rate of the text embedding (0.004)", (), "positive",
            extra="text", continuous=True, label="text learning rate (DragText)"),
    Setting("text_lam", "float", "DragText: weight λ_t of the text embedding's regulariser (0.1)", (),
            "nonnegative", extra="text", continuous=True, label="λ_t (DragText)"),
    Setting("snapshots", "ints", "iteration caps at which (z, ĉ) is kept and denoised too, e.g. "
            "10,20,40,80,160 (CLIPDrag's Tables 1–2 in one run); max_iters becomes the largest unless given",
            _DD_LIKE),
    Setting("text_feature_block", "int", "DragText App. H: the up_blocks index whose features drive the "
            "text embedding's motion term (the paper's Block #k is k − 1)", (), "nonnegative", extra="split_text"),
    Setting("fusion", "choice", "CLIPDrag's gradient fusion rule: paper (eq. 6), code (the released "
            "sign), project, add, prograd (Fig. 7a's baselines)", (), extra="clip",
            choices=("paper", "code", "project", "add", "prograd")),
    Setting("fuse_weight", "float", "CLIPDrag: weight of the global CLIP gradient in the fusion (0.7)", (),
            "nonnegative", extra="clip", continuous=True, label="fusion weight (CLIPDrag)"),
    Setting("clip_coef", "float", "CLIPDrag: scale of the CLIP loss κ (300)", (), "nonnegative", extra="clip",
            continuous=True),
)
BY_NAME = {s.name: s for s in SETTINGS}


def read_by(host: str, optimize_text: bool, use_clip: bool) -> tuple[str, ...]:
    """The settings a method reads: its host's, DragText's when it optimises the text embedding,
    CLIPDrag's when it uses CLIP (in table order within each group)."""
    from .hosts import host as host_of  # the registry imports the host modules, which import this one

    keys = [s.name for s in SETTINGS if host in s.hosts or "*" in s.hosts]
    if optimize_text:
        keys += [s.name for s in SETTINGS if s.extra == "text" and s.name not in keys]
        if host_of(host).splits:
            keys += [s.name for s in SETTINGS if s.extra == "split_text"]
    if use_clip:
        keys += [s.name for s in SETTINGS if s.extra == "clip"]
    return tuple(keys)


def check(name: str, value):
    """``value`` checked against the table (SettingsError naming the setting); returns it as its
    type (ints as int, floats as float)."""
    from ..errors import SettingsError, check_number

    s = BY_NAME[name]
    if s.kind in ("int", "float"):
        kw = {s.range: True} if s.range else {}
        return check_number(name, value, integer=s.kind == "int", **kw)
    if s.kind == "choice" and value not in s.choices:
        raise SettingsError(f"setting {name} = {value!r}: choose one of {', '.join(s.choices)}")
    if s.kind == "bool" and not isinstance(value, bool):
        raise SettingsError(f"setting {name} = {value!r}: must be true or false")
    return value
