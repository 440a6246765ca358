"""The one image reader: every image jaxdrag reads from a file (the CLI's image and mask,
DragBench/Drag100 samples, the evaluation's results and inputs) goes through ``read``.

Photos are read as people see them: the EXIF orientation (a phone's "rotate 90°") is applied, so
pixel coordinates — the points a user clicked, a dataset's handles — are those of the image as
every viewer displays it, and ``ImageInfo`` records what was done for the report. 16-bit,
palette, CMYK, grayscale and RGBA inputs are converted to 8-bit RGB (alpha dropped) or L
(16-bit samples scaled by 1/256, not clipped).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# EXIF orientation tag values → what displaying the stored pixels takes
ORIENTATIONS = {1: "none", 2: "mirrored", 3: "rotated 180°", 4: "flipped vertically",
                5: "transposed", 6: "rotated 90° clockwise", 7: "transversed", 8: "rotated 90° counter-clockwise"}
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageInfo:
    """What reading an image did: ``orientation`` the EXIF tag (1 when absent), ``applied``
    whether the pixels were transposed to the displayed orientation, ``stored_size`` and
    ``size`` (width, height) before and after, ``mode`` the file's PIL mode."""

    file: str
    orientation: int
    applied: bool
    stored_size: tuple[int, int]
    size: tuple[int, int]
    mode: str

    def to_json(self) -> dict:
        d = asdict(self)
        d["stored_size"], d["size"] = list(self.stored_size), list(self.size)
        d["orientation_name"] = ORIENTATIONS.get(self.orientation, "unknown")
        return d


def _to_8bit(im):
    """16/32-bit grayscale (I;16, I, F) → 8-bit L by scaling the full range of the type."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return Image.fromarray((np.asarray(im, np.uint32) >> 8).astype(np.uint8), "L")
    if im.mode == "I":
        a = np.asarray(im, np.int64)
        return Image.fromarray(np.clip(a >> 8 if a.max() > 255 else a, 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        a = np.asarray(im, np.float64)
        a = a * 255 if a.max() <= 1.0 else a
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    return im


def read(path: str | Path, mode: str = "RGB", error: type[Exception] = ValueError) -> tuple[np.ndarray, ImageInfo]:
    """(pixels, info) of the image file at ``path``: (H, W, 3) uint8 for mode "RGB", (H, W) uint8
    for "L", in the displayed orientation. Any failure is ``error`` with one line naming the file."""
    from PIL import Image, ImageOps

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: not found")
    try:
        with Image.open(path) as im:
            im.load()
            orient = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
            stored, file_mode = im.size, im.mode
            shown = ImageOps.exif_transpose(im)  # a copy without the tag, or the image itself
            arr = np.asarray(_to_8bit(shown).convert(mode))  # alpha dropped, as before
    except Exception as e:  # PIL raises many types for corrupt or unsupported files
        raise error(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    info = ImageInfo(str(path), orient, orient not in (0, 1), stored, (arr.shape[1], arr.shape[0]), file_mode)
    return arr, info
