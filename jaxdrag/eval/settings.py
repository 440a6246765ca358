"""What ``jaxdrag eval`` computes and how (defaults: the DragBench scripts and GoodDrag's DAI)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SettingsError

METRICS = ("lpips", "clip", "md", "dai")
# the command-line option giving each metric's network (DAI needs none)
WEIGHT_FLAGS = {"lpips": "--lpips", "clip": "--clip", "md": "--dift"}


@dataclass(frozen=True)
class EvalSettings:
    """What is computed and how (defaults: the DragBench scripts and GoodDrag's DAI)."""

    metrics: tuple[str, ...] = METRICS
    t: int = 261                     # DIFT timestep
    up_index: int = 1                # DIFT: output of up_blocks[1]
    ensemble: int = 8                # DIFT ensemble size
    seed: int = 42                   # noise: fold_in(seed, crc32(sample name)), stable under resume
    gammas: tuple[int, ...] = (1, 5, 10, 20)  # DAI patch radii
    dai_double_n: bool = False       # GoodDrag code's quirk (divide by N twice)
    batch_size: int = 4              # samples per network batch (DIFT: × ensemble × 2 images)
    rows: int = 64                   # full-resolution rows per chunk of the MD cosine map

    def __post_init__(self):
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise SettingsError(f"unknown metric(s) {bad}; choose from {', '.join(METRICS)}")
        for name in ("ensemble", "batch_size", "rows"):
            if int(getattr(self, name)) < 1:
                raise SettingsError(f"setting {name} = {getattr(self, name)}: must be ≥ 1")
        if not 0 <= self.t < 1000:
            raise SettingsError(f"setting t = {self.t}: must be in [0, 999]")
        if any(int(g) < 0 for g in self.gammas):
            raise SettingsError(f"setting gammas = {list(self.gammas)}: DAI radii must be ≥ 0")

    def key(self, metric: str) -> dict:
        """The settings a metric's value depends on (a stored value is reused only if equal)."""
        if metric == "md":
            return {"t": self.t, "up_index": self.up_index, "ensemble": self.ensemble, "seed": self.seed}
        if metric == "dai":
            return {"gammas": list(self.gammas), "double_n": self.dai_double_n}
        return {}
