"""Measure the trained toy models' quality and write ``weights/toy-sd15/quality.json`` (and a
strip of samples, ``samples.png``).

    python scripts/eval_toy.py [--weights weights] [--samples 50] [--guidance 4]

VAE reconstruction PSNR on 64 held-out scenes; DDIM-50 samples from held-out captions checked by
colour segmentation (``jaxdrag.toy.quality``); CLIP caption retrieval on held-out scenes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    import jaxdrag
    from jaxdrag.tiny import default_weights_dir
    from jaxdrag.toy import quality, toy_paths

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=4.0)
    args = ap.parse_args(argv)
    paths = toy_paths(args.weights or default_weights_dir())
    if paths is None:
        raise SystemExit("error: no trained toy model found (weights/toy-sd15, weights/toy-clip); "
                         "run scripts/train_toy.py first")
    t0 = time.perf_counter()
    pipe = jaxdrag.load_pipeline(paths[0], clip=paths[1], dtype="float32")
    res, checks, images = quality.evaluate(pipe, args.samples, args.guidance)
    from PIL import Image

    k = min(10, len(images))
    Image.fromarray(np.concatenate(list(images[:k]), axis=1)).save(paths[0] / "samples.png")
    res["captions_of_samples_png"] = [c["caption"] for c in checks[:k]]
    res["failed_samples"] = [c for c in checks if not c["objects_found"]]
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    (paths[0] / "quality.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
