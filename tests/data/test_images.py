"""The one image reader (jaxdrag.images): EXIF orientation applied so coordinates are those of the
image as displayed, recorded for the report; 16-bit, palette, CMYK, grayscale and RGBA inputs."""

import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from jaxdrag.data import RequestError, find_samples
from jaxdrag.eval.image import EvalInputError, read_rgb
from jaxdrag.images import read


def _shown(h=64, w=80):
    """An 80-wide × 64-high picture with a red marker near its top-left corner."""
    a = np.full((h, w, 3), 200, np.uint8)
    a[4:10, 6:14] = (255, 0, 0)
    return a


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_every_exif_orientation_is_undone(tmp_path, orientation):
    shown = Image.fromarray(_shown())
    # the stored pixels that display as `shown` under this orientation: invert exif_transpose
    inverse = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
               7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}[orientation]
    stored = shown if inverse is None else shown.transpose(inverse)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    stored.save(path, exif=exif)
    with Image.open(path) as im:  # our inverse is right: PIL's own transpose gives `shown` back
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(im).convert("RGB")), _shown())
    arr, info = read(path)
    assert np.array_equal(arr, _shown())  # the marker at the displayed top-left, 80 × 64
    assert info.orientation == orientation and info.applied == (orientation != 1)
    assert info.size == (80, 64) and info.stored_size == stored.size


def test_a_rotated_jpeg_is_read_as_displayed(tmp_path):
    """A phone JPEG: 80×64 stored, EXIF "rotate 90°", displayed 64×80."""
    stored = Image.fromarray(_shown())
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "p.jpg", exif=exif, quality=95)
    arr, info = read(tmp_path / "p.jpg")
    assert arr.shape == (80, 64, 3) and info.stored_size == (80, 64) and info.size == (64, 80)
    # rotated 90° clockwise: the stored top-left marker is now at the top-right
    assert arr[9, 56, 0] > 200 and arr[9, 56, 1] < 60 and arr[9, 7, 0] < 215
    assert read_rgb(tmp_path / "p.jpg").size == (64, 80)  # the evaluation reads it the same way


def test_modes_16bit_palette_cmyk_gray_rgba(tmp_path):
    shown = _shown()
    cases = {
        "rgba.png": Image.fromarray(np.dstack([shown, np.full(shown.shape[:2], 128, np.uint8)]), "RGBA"),
        "palette.png": Image.fromarray(shown).quantize(colors=4),
        "cmyk.jpg": Image.fromarray(shown).convert("CMYK"),
        "gray.png": Image.fromarray(shown[..., 0]),
        "gray16.png": Image.fromarray(shown[..., 0].astype(np.uint16) * 257),
    }
    for name, im in cases.items():
        im.save(tmp_path / name, **({"quality": 98} if name.endswith(".jpg") else {}))
        arr, info = read(tmp_path / name)
        assert arr.shape == (64, 80, 3) and arr.dtype == np.uint8, name
        ref = shown if name.startswith(("rgba", "palette", "cmyk")) else np.repeat(shown[..., :1], 3, -1)
        tol = 6 if name.endswith(".jpg") else 0
        assert np.abs(arr.astype(int) - ref).max() <= tol, (name, np.abs(arr.astype(int) - ref).max())
    assert read(tmp_path / "gray16.png")[1].mode.startswith("I")
    mask, _ = read(tmp_path / "gray16.png", "L")
    assert mask.shape == (64, 80) and mask.max() == 255


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(RequestError, match=r"bad.png: cannot read image \(UnidentifiedImageError"):
        read(tmp_path / "bad.png", error=RequestError)
    with pytest.raises(EvalInputError, match="missing.png: not found"):
        read_rgb(tmp_path / "missing.png")


def test_datasets_read_photos_as_displayed(tmp_path):
    root = tmp_path / "d100" / "cat_0"
    root.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(_shown()).save(root / "original.jpg", exif=exif, quality=95)  # shown 64 × 80
    (root / "points.json").write_text(json.dumps({"points": [[10, 70], [30, 60]]}))
    Image.fromarray(np.full((80, 64), 255, np.uint8)).save(root / "mask.png")
    req = find_samples(tmp_path / "d100")[0].load()
    assert req.image.shape == (80, 64, 3) and req.mask.shape == (80, 64)
    assert req.source["orientation"] == 8 and req.source["applied"] and req.source["size"] == [64, 80]
