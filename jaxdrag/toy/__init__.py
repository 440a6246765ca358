"""The toy world and its trained models: scenes with exact ground truth (``world``), the model
architectures and their training (``models``, ``train``, ``export``), and ToyBench (``bench``,
``runner``)."""

from __future__ import annotations

from pathlib import Path

SD_NAME = "toy-sd15"
CLIP_NAME = "toy-clip"


def toy_paths(root: Path | None = None) -> tuple[Path, Path] | None:
    """(toy SD folder, toy CLIP folder) under the weights folder, or None if not present."""
    from ..tiny import default_weights_dir

    root = Path(root) if root is not None else default_weights_dir()
    sd, clip = root / SD_NAME, root / CLIP_NAME
    if (sd / "model_index.json").exists() and (clip / "config.json").exists():
        return sd, clip
    return None
