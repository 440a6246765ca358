"""A picture of ToyBench results: for the first N tasks, the input with its drags (handle red,
target blue), the perfect edit (ground truth), and each method's output with its measured
relative error and whether the object survived.

    python scripts/toybench_figure.py RUN_DIR --methods dragdiffusion,dragtext --tasks 8 \\
        --out weights/toy-sd15/toybench.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _arrows(img: np.ndarray, points, k: int) -> np.ndarray:
    im = Image.fromarray(np.repeat(np.repeat(img, k, 0), k, 1))
    d = ImageDraw.Draw(im)
    for (hx, hy), (tx, ty) in zip(points[0::2], points[1::2]):
        h, t = ((hx + 0.5) * k, (hy + 0.5) * k), ((tx + 0.5) * k, (ty + 0.5) * k)
        d.line([h, t], fill=(255, 255, 255), width=2)
        d.ellipse([h[0] - 4, h[1] - 4, h[0] + 4, h[1] + 4], fill=(230, 20, 20))
        d.ellipse([t[0] - 4, t[1] - 4, t[0] + 4, t[1] + 4], fill=(20, 60, 230))
    return np.asarray(im)


def figure(run: Path, methods: list[str], n: int, k: int = 2) -> np.ndarray:
    from jaxdrag.toy import bench

    tasks = bench.make_tasks(n)
    cols = ["input + drag", "ground truth"] + methods
    s = tasks[0].spec.size * k
    cell_h = s + 18
    W, H = len(cols) * (s + 6), 20 + n * cell_h
    canvas = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(canvas)
    for c, name in enumerate(cols):
        d.text((c * (s + 6) + 4, 4), name, fill=(0, 0, 0))
    for r, t in enumerate(tasks):
        y = 20 + r * cell_h
        imgs = [(_arrows(t.image, t.points, k), t.kind), (np.repeat(np.repeat(t.target.image, k, 0), k, 1), "")]
        for m in methods:
            f = run / m / t.name / "edited.png"
            met = json.loads((run / m / t.name / "metrics.json").read_text()) if f.exists() else None
            img = np.asarray(Image.open(f).convert("RGB")) if f.exists() else np.full((t.spec.size,) * 2 + (3,), 255, np.uint8)
            label = (f"err {100 * met['rel_error']:.0f} % {'ok' if met['survived'] else 'broken'}"
                     if met else "missing")
            imgs.append((np.repeat(np.repeat(img, k, 0), k, 1), label))
        for c, (im, label) in enumerate(imgs):
            canvas.paste(Image.fromarray(im), (c * (s + 6), y))
            d.text((c * (s + 6) + 4, y + s + 3), label, fill=(0, 0, 0))
    return np.asarray(canvas)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--methods", default="dragdiffusion,dragtext")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    Image.fromarray(figure(args.run, args.methods.split(","), args.tasks)).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
