"""Does an object's contrast in the latent set how far a drag moves it? Reads a ToyBench run's
``toybench.json`` (no editing) and the committed toy VAE: per dragged object, the L2 norm of the mean
scaled latent over the cells inside the object (> 90 % covered) minus the mean over the ring of
cells just outside it, against the fraction of its drag the object moved (displacement projected on
the drag; 0 for a vanished object). Prints Spearman's rank correlation (scipy, from the test
extra's torch/lpips stack) and the median moved fraction per tercile of contrast.

    python scripts/toy_contrast.py weights/toy-sd15/toybench.json [--methods dragdiffusion,dragtext,gooddrag]
"""

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from scipy.ndimage import binary_dilation
from scipy.stats import spearmanr

import jaxdrag
from jaxdrag.toy import toy_paths
from jaxdrag.toy.bench import make_tasks, segment
from jaxdrag.toy.breakdown import objects


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("toybench_json", type=Path)
    ap.add_argument("--methods", default="dragdiffusion,dragtext,gooddrag")
    args = ap.parse_args()
    per_task = json.loads(args.toybench_json.read_text())["per_task"]
    methods = args.methods.split(",")
    n = len(per_task[methods[0]])
    pipe = jaxdrag.load_pipeline(toy_paths()[0], dtype="float32")
    tasks = make_tasks(n)
    z = np.asarray(pipe.vae_encode(jnp.asarray(np.stack([t.image for t in tasks]))))
    cells = z.shape[1]
    k = tasks[0].image.shape[0] // cells
    # breakdown's fraction moved, per method: {(task, j): fraction} for the task's j-th move
    fractions = {}
    for m in methods:
        seen: dict = {}
        for r in objects(per_task[m]):
            j = seen[r["task"]] = seen.get(r["task"], -1) + 1
            fractions[m, r["task"], j] = 0.0 if np.isnan(r["fraction"]) else r["fraction"]
    rows = {m: [] for m in methods}
    for t, zt in zip(tasks, z):
        for j, (i, _, _) in enumerate(t.moves):
            f = segment(t.image, t.spec.objects[i].colour).reshape(cells, k, cells, k).mean(axis=(1, 3))
            inside, ring = f > 0.9, binary_dilation(f > 0.05) & (f == 0)
            if not inside.any() or not ring.any():
                continue
            contrast = float(np.linalg.norm(zt[inside].mean(0) - zt[ring].mean(0)))
            for m in methods:
                rows[m].append((contrast, fractions[m, t.name, j]))
    for m, r in rows.items():
        c, fr = np.array(r).T
        q = np.quantile(c, [1 / 3, 2 / 3])
        thirds = [c <= q[0], (c > q[0]) & (c <= q[1]), c > q[1]]
        rho, p = spearmanr(c, fr)
        print(f"{m}: {len(c)} objects, contrast {c.min():.2f}–{c.max():.2f}; Spearman(contrast, moved) {rho:+.2f} "
              f"(p = {p:.2f}); median moved by tercile (low, mid, high): "
              + ", ".join(f"{np.median(fr[s]):.0%}" for s in thirds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
