"""The command line: ``run`` on a dataset folder with bad samples and resumption, ``edit``, the
Drag100 layout, and the README's demo command."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_data
from jaxdrag.cli import main
from jaxdrag.data import find_samples
from helpers import dragbench_sample, synthetic_image

FAST = ["--lora-steps", "4", "--max-iters", "4", "--quiet", "--no-compile-cache"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_run_skips_bad_samples_and_resumes(tmp_path, capsys):
    data, out = tmp_path / "bench", tmp_path / "out"
    for i in (1, 2, 3):
        dragbench_sample(data / "cat" / f"s{i}", i)
    dragbench_sample(data / "cat" / "corrupt", 4)
    blob = (data / "cat" / "corrupt" / "meta_data.pkl").read_bytes()
    (data / "cat" / "corrupt" / "meta_data.pkl").write_bytes(blob[:len(blob) // 3])
    dragbench_sample(data / "cat" / "evil", 5)
    marker = tmp_path / "pwned"
    (data / "cat" / "evil" / "meta_data.pkl").write_bytes(pickle.dumps(_Evil(marker)))
    (data / "cat" / "s1" / ".DS_Store").write_bytes(b"junk")

    args = ["run", str(data), "--out", str(out), "--method", "dragtext", "--batch-size", "1"] + FAST
    # --compile-only: every program of the run compiled, no edit run (the bad samples skipped)
    assert main(args + ["--compile-only"]) == 0
    rep = json.loads((out / "compile.json").read_text())
    assert rep["groups"] == 1 and rep["samples"] == 3 and set(rep["skipped"]) == {"cat/corrupt", "cat/evil"}
    assert rep["programs"] >= 8 and rep["per_stage"]["drag"] == 1 and rep["failed"] == {}
    assert not list(out.rglob("report.json"))
    assert main(args) == 1  # failures are reported in the exit status
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"] == 5 and summary["done"] == 3
    assert set(summary["failed"]) == {"cat/corrupt", "cat/evil"}
    assert "refused: global 'posix.system' is not allowed" in summary["failed"]["cat/evil"] or \
        "refused: global" in summary["failed"]["cat/evil"]
    assert "cannot read" in summary["failed"]["cat/corrupt"]
    assert not marker.exists()  # the malicious pickle ran nothing
    for i in (1, 2, 3):
        rep = json.loads((out / "cat" / f"s{i}" / "report.json").read_text())
        assert rep["config"]["prompt"] == f"sample {i}" and rep["config"]["input_size"] == [96, 128]
        assert (out / "cat" / f"s{i}" / "edited.png").exists() and (out / "cat" / f"s{i}" / "overlay.png").exists()
    assert not list(out.rglob("*.tmp"))

    # an interruption: s2's report never written, a temp file left behind
    (out / "cat" / "s2" / "report.json").unlink()
    (out / "cat" / "s2" / ".edited.png.123.tmp").write_bytes(b"partial")
    before = {i: (out / "cat" / f"s{i}" / "edited.png").stat().st_mtime_ns for i in (1, 3)}
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "5 samples, 2 already done, 3 to run" in err
    for i in (1, 3):
        assert (out / "cat" / f"s{i}" / "edited.png").stat().st_mtime_ns == before[i]
    assert json.loads((out / "cat" / "s2" / "report.json").read_text())["name"] == "cat/s2"
    assert json.loads((out / "summary.json").read_text())["done"] == 3


def _rotated_photo(path: Path, shown: np.ndarray) -> None:
    """Save ``shown`` as a phone would: the pixels stored rotated, with EXIF orientation 6
    ("rotate 90° clockwise to display")."""
    im = Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif)


def test_edit_command(tmp_path, capsys):
    img = tmp_path / "in.png"
    _rotated_photo(img, synthetic_image(seed=7))  # stored 96 wide × 128 high, shown 128 × 96
    assert Image.open(img).size == (96, 128)
    out = tmp_path / "o"
    assert main(["edit", str(img), "--points", "50,40 70,45", "--prompt", "a gradient", "--out", str(out),
                 "--method", "dragtext"] + FAST) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and len(printed["final_handles"]) == 1
    # edited as shown: the points are on the displayed image, the output has its size
    assert Image.open(out / "edited.png").size == (128, 96)
    src = json.loads((out / "report.json").read_text())["config"]["input"]
    assert src["orientation"] == 6 and src["applied"] and src["stored_size"] == [96, 128]
    assert src["size"] == [128, 96] and src["orientation_name"] == "rotated 90° clockwise"
    assert main(["edit", str(img), "--points", "50,40 500,45", "--out", str(out)] + FAST) == 2
    assert "point 1 (target of pair 0) at (x=500, y=45) is outside the 128×96 image" in capsys.readouterr().err
    assert main(["edit", str(img), "--points", "50 70,45", "--out", str(out)] + FAST) == 2
    assert "is not 'x,y'" in capsys.readouterr().err


@pytest.mark.slow  # the CLI of generated-image drags; test_paper_extras covers the pipeline path; ≈ 60 s on 2 cores (run with -m slow)
def test_generate_then_edit_commands(tmp_path, capsys):
    """``generate`` writes the image and its spec; ``edit SPEC.json`` drags on the generation with
    an interpolation strip and iteration-cap snapshots; bad specs are one-line errors."""
    gen = tmp_path / "gen"
    assert main(["generate", "--prompt", "a red disc", "--seed", "2", "--guidance-scale", "3", "--out", str(gen),
                 "--quiet", "--no-compile-cache"]) == 0
    capsys.readouterr()
    spec = json.loads((gen / "generation.json").read_text())
    assert spec == {"prompt": "a red disc", "seed": 2, "guidance_scale": 3.0, "negative_prompt": "",
                    "height": None, "width": None}
    size = Image.open(gen / "generated.png").size
    out = tmp_path / "o"
    assert main(["edit", str(gen / "generation.json"), "--points", "30,30 40,36", "--out", str(out),
                 "--method", "dragdiffusion", "--max-iters", "3", "--snapshots", "1,3", "--interpolate", "0,1",
                 "--quiet", "--no-compile-cache"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["generation"]["seed"] == 2 and rep["iterations"] == 3
    assert rep["interpolation"]["alphas"] == [0.0, 1.0] and [s["max_iters"] for s in rep["snapshots"]] == [1, 3]
    assert Image.open(out / "edited.png").size == size
    assert Image.open(out / "interpolation.png").size == (2 * size[0] + 4, size[1] + 16)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "snapshots" / "iters_0003.png")),
                                  np.asarray(Image.open(out / "edited.png")))
    capsys.readouterr()
    assert main(["edit", str(gen / "generation.json"), "--prompt", "a cat", "--points", "30,30 40,36",
                 "--out", str(out)] + FAST) == 2
    assert "a generated image is dragged with its generation prompt 'a red disc'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"prompt": "x", "guidance_scale": 0.2}))
    assert main(["edit", str(bad), "--points", "30,30 40,36", "--out", str(out)] + FAST) == 2
    assert "generation guidance_scale must be a number ≥ 1, got 0.2" in capsys.readouterr().err


def test_drag100_layout(tmp_path):
    root = tmp_path / "d100"
    (root / "cat_0").mkdir(parents=True)
    Image.fromarray(synthetic_image(seed=1)).save(root / "cat_0" / "original.jpg")
    (root / "cat_0" / "points.json").write_text(json.dumps({"points": [[10, 20], [30, 40]]}))
    Image.fromarray(np.full((96, 128), 255, np.uint8)).save(root / "cat_0" / "mask.png")
    (root / "bad_0").mkdir()
    (root / "bad_0" / "points.json").write_text("{not json")
    samples = find_samples(root)
    assert [s.name for s in samples] == ["bad_0", "cat_0"]
    req = samples[1].load()
    assert req.points == [[10, 20], [30, 40]] and req.prompt == "" and req.mask.shape == (96, 128)
    with pytest.raises(Exception, match="points.json: cannot read points"):
        samples[0].load()
    real = shared_data("data", "Drag100")
    s = find_samples(real)
    assert len(s) == 100 and s[0].load().image.shape[2] == 3


def test_readme_demo_command(readme_demo):
    """The demo exactly as the README gives it, in a fresh process (writes ./demo_out)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "jaxdrag demo" in readme
    out, demo_out = readme_demo
    for f in ("input.png", "edited.png", "overlay.png", "side_by_side.png", "report.json"):
        assert (demo_out / f).exists()
    assert 0 < out["iterations"] <= 80  # the default cap; the handle cannot reach a 20 px drag at once
    if out["model"] == "toy":  # the committed trained model: the measured edit is reported
        assert out["measured"]["drag"] == [[20, 0]] and "error" in out["measured"]
        assert out["measured"]["survived"] and out["measured"]["rel_error"] < 0.8  # measured 0.64 (test_toy_model)
    rep = json.loads((demo_out / "report.json").read_text())
    assert rep["config"]["lora"]["steps"] == 80 and rep["config"]["method"] == "dragtext"
