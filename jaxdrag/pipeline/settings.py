"""``EditSettings``: the pipeline-level settings of an edit (working size, inversion strength, LoRA,
reference attention, batch size, remat, interpolation); the drag loop's settings are the method
preset's (``jaxdrag.drag.settings``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .lora import LoRASettings, check_remat


@dataclass(frozen=True)
class EditSettings:
    """Pipeline-level settings of an edit (the drag loop's are the method preset + overrides).

    width: working width (None: the model's native width, 512 for SD-1.5 — the reference UI's
    resize; 0: keep the input size). inversion_strength: None = the method's (0.7 → 35 DDIM
    steps, t* = 681; GoodDrag 0.75 → t* = 741). ``lora`` fields left None are the method's too.
    reference_attention: mutual self-attention in the final denoise (MasaCtrl, on by default;
    DragNoise never uses it).
    clip_double_unit_map: reproduce CLIPDrag's double [0, 1] mapping of the CLIP input (QUIRK).
    remat: the drag step's rematerialisation policy ("off" | "blocks" | "dots"; LoRA training
    has its own, ``lora.remat``). batch_size: edits per vmapped batch, or "auto": the largest
    batch whose every stage fits ``memory_fraction`` of a device's memory (``plan_batch``).
    interpolation: DragText §6's α values (e.g. (0, 0.25, 0.5, 0.75, 1, 1.25, 1.5)): each result
    also holds the images of (z*, c) → (ẑ, ĉ) interpolated linearly (``EditResult.interpolation``),
    denoised like the edit in batches of its size.
    buckets: "exact" — one group per working shape (each stage compiles per shape); "auto" —
    the run's shapes share a few masked canvases (``buckets.plan_buckets``: at most
    ``max_buckets``, merged while the padding waste stays ≤ ``bucket_waste``), edits of different
    sizes batched together, each computed exactly on its own size (a bucket that holds one shape
    runs that shape's own programs); "fixed" — every edit on the canvas of its size rounded up to
    the canvas step, whatever else runs (the UI's: the same programs serve every size that rounds
    alike, so they can be compiled before the first edit).
    """

    method: str = "dragtext"
    width: int | None = None
    inversion_strength: float | None = None
    lora: LoRASettings = LoRASettings()
    reference_attention: bool = True
    clip_double_unit_map: bool = False
    batch_size: int | str = 8
    remat: str = "off"
    memory_fraction: float = 0.85  # of each device's memory that ``batch_size="auto"`` plans to use
    interpolation: tuple[float, ...] = ()
    buckets: str = "exact"
    bucket_waste: float = 0.25
    max_buckets: int = 8

    def __post_init__(self):
        from ..errors import SettingsError, check_number

        if self.buckets not in ("exact", "auto", "fixed"):
            raise SettingsError(f"setting buckets = {self.buckets!r}: must be 'exact', 'auto' or 'fixed'")
        waste = check_number("bucket_waste", self.bucket_waste, low=0.0, high=1.0)
        if waste >= 1.0:
            raise SettingsError(f"setting bucket_waste = {self.bucket_waste!r}: must be < 1 (a share of the canvas)")
        object.__setattr__(self, "bucket_waste", waste)
        object.__setattr__(self, "max_buckets", check_number("max_buckets", self.max_buckets, positive=True,
                                                             integer=True))

        if isinstance(self.interpolation, (str, bytes)) or not hasattr(self.interpolation, "__iter__"):
            raise SettingsError(f"setting interpolation = {self.interpolation!r}: must be a list of α values")
        object.__setattr__(self, "interpolation", tuple(check_number("interpolation", a) for a in self.interpolation))

        object.__setattr__(self, "remat", check_remat("remat", self.remat))

        if self.inversion_strength is not None:
            s = check_number("inversion_strength", self.inversion_strength, low=0.0, high=1.0, low_open=True)
            if round(s * 50) < 1:
                raise SettingsError(f"setting inversion_strength = {s!r}: must give at least one of the 50 "
                                    f"DDIM steps (≥ 0.01)")
            object.__setattr__(self, "inversion_strength", s)
        if self.width is not None:
            w = check_number("width", self.width, nonnegative=True, integer=True)
            if 0 < w < 16:
                raise SettingsError(f"setting width = {w}: must be 0 (keep the input size) or ≥ 16")
            object.__setattr__(self, "width", w)
        object.__setattr__(self, "memory_fraction", check_number("memory_fraction", self.memory_fraction,
                                                                 low=0.0, high=1.0, low_open=True))
        if self.batch_size != "auto":
            object.__setattr__(self, "batch_size", check_number("batch_size", self.batch_size, positive=True,
                                                                integer=True))

    def for_method(self, method: str) -> "EditSettings":
        """These settings with every field left None filled from ``method``'s defaults."""
        from ..drag.methods import pipeline_defaults

        d = pipeline_defaults(method)
        lora = replace(self.lora, steps=d["lora_steps"] if self.lora.steps is None else self.lora.steps,
                       lr=d["lora_lr"] if self.lora.lr is None else self.lora.lr)
        inv = d["inversion_strength"] if self.inversion_strength is None else self.inversion_strength
        return replace(self, method=method, lora=lora, inversion_strength=inv)
