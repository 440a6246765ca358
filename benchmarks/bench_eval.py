"""DragBench evaluation speed, side by side: ``jaxdrag eval``'s batched LPIPS + DIFT mean distance
vs the reference scripts' PyTorch loop (one image at a time; DIFT repeats the image E times
through the VAE and stops the UNet after ``up_blocks[1]``; the cosine map at full resolution),
on the same weights and samples.

    python benchmarks/bench_eval.py --data path/to/DragBench --samples 16 --ensemble 8 --batch 4

Weights: tiny SD-2.1-architecture / random LPIPS written on the fly (default: a CPU-sized run), or
``--dift`` (an SD-2.1 diffusers folder) and ``--lpips`` (converted .safetensors; the torch side then
needs ``--lpips-pth``, the lpips state dict it came from). The results are the originals rolled
8 px to the right (a non-trivial drag result for every sample). MD values differ between the two
by the noise draws (torch.randn vs jax.random), not by the computation (see
tests/eval/test_eval_parity.py for the equality with given noise).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


from common import device_info  # noqa: E402
from jaxdrag import tiny  # noqa: E402
from jaxdrag.data import find_samples  # noqa: E402
from jaxdrag.eval import EvalSettings, Networks, evaluate, load_dift, load_lpips  # noqa: E402


def make_results(samples, root: Path) -> None:
    for s in samples:
        img = np.asarray(Image.open(s.folder / "original_image.png").convert("RGB"))
        (root / s.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(img, 8, axis=1)).save(root / s.name / "dragged_image.png")


def torch_eval(samples, results: Path, dift_folder: Path, lpips_state: dict, ensemble: int) -> dict:
    """The reference scripts' loops (seed 42 once; per sample: PIL, DIFT ×2, upsample, cosine
    argmax per pair; LPIPS at 224)."""
    import torch
    import torch.nn.functional as F

    from jaxdrag.testing.torch_reference import TorchDift, import_lpips, torch_match

    torch.manual_seed(42)
    dift = TorchDift(dift_folder)
    lp = import_lpips().LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    lp.load_state_dict(lpips_state, strict=False)
    lp.eval()
    t_md = t_lp = 0.0
    dists, lps = [], []
    for s in samples:  # timed as jaxdrag's evaluate: reading the sample and images included
        t0 = time.perf_counter()
        req = s.load()
        src = Image.open(s.folder / "original_image.png").convert("RGB")
        drg = Image.open(results / s.name / "dragged_image.png").convert("RGB")
        drg_r = drg.resize(src.size, Image.BILINEAR)
        xs = (torch.from_numpy(np.array(src)).permute(2, 0, 1)[None] / 255.0 - 0.5) * 2
        xd = (torch.from_numpy(np.array(drg_r)).permute(2, 0, 1)[None] / 255.0 - 0.5) * 2
        h, w = xs.shape[2:]
        fs = F.interpolate(dift.features(xs, req.prompt, ensemble=ensemble), (h, w), mode="bilinear")
        fd = F.interpolate(dift.features(xd, req.prompt, ensemble=ensemble), (h, w), mode="bilinear")
        pts = np.asarray(req.points).reshape(-1, 2)
        d, _ = torch_match(fs, fd, pts[0::2], pts[1::2])
        dists += d
        t1 = time.perf_counter()
        src = Image.open(s.folder / "original_image.png").convert("RGB")
        drg = Image.open(results / s.name / "dragged_image.png").convert("RGB")
        with torch.no_grad():
            a = torch.from_numpy(np.asarray(src, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
            b = torch.from_numpy(np.asarray(drg, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
            lps.append(float(lp(F.interpolate(a, (224, 224), mode="bilinear"),
                                F.interpolate(b, (224, 224), mode="bilinear"))))
        t2 = time.perf_counter()
        t_md += t1 - t0
        t_lp += t2 - t1
    return {"md_s": t_md, "lpips_s": t_lp, "md": float(np.mean(dists)), "lpips": float(np.mean(lps)),
            "pairs": len(dists)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a DragBench folder")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--ensemble", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dift", type=Path, default=None)
    ap.add_argument("--lpips", type=Path, default=None)
    ap.add_argument("--lpips-pth", type=Path, default=None)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    samples = find_samples(args.data)[:args.samples]
    make_results(samples, work / "results")
    dift_folder = args.dift or tiny.write_tiny_sd21(work)
    lpips_file = args.lpips or tiny.write_random_lpips(work / "lpips.safetensors")
    nets = Networks(lpips=load_lpips(lpips_file), dift=load_dift(dift_folder))
    only = [s.name for s in samples]
    res = {"device": device_info(), "samples": len(samples), "ensemble": args.ensemble,
           "batch": args.batch, "tiny": args.dift is None, "command": " ".join(sys.argv)}
    for metric in ("md", "lpips"):
        st = EvalSettings(metrics=(metric,), ensemble=args.ensemble, batch_size=args.batch)
        t0 = time.perf_counter()
        evaluate(work / "results", args.data, work / f"cold_{metric}", nets, st, only=only, progress=False)
        t1 = time.perf_counter()
        summ = evaluate(work / "results", args.data, work / f"warm_{metric}", nets, st, only=only,
                        progress=False)
        t2 = time.perf_counter()
        res[f"jax_{metric}"] = {"cold_s": t1 - t0, "warm_s": t2 - t1, "value": summ["overall"][metric]}
    if not args.no_torch:
        from safetensors.numpy import load_file
        import torch

        if args.lpips_pth:
            state = torch.load(str(args.lpips_pth), map_location="cpu", weights_only=True)
        else:
            state = {k: torch.from_numpy(v) for k, v in load_file(lpips_file).items()}
        res["torch"] = torch_eval(samples, work / "results", dift_folder, state, args.ensemble)
    n = len(samples)
    print(f"\n{n} samples, ensemble {args.ensemble}, batch {args.batch}, "
          f"{'tiny' if args.dift is None else 'given'} networks")
    print(f"{'measurement':40s} {'jaxdrag s':>10s} {'torch s':>10s} {'ratio':>7s}")
    for metric, key in (("md", "md_s"), ("lpips", "lpips_s")):
        j = res[f"jax_{metric}"]["warm_s"] / n
        tt = res["torch"][key] / n if "torch" in res else float("nan")
        print(f"{metric + ' per sample (warm)':40s} {j:10.4f} {tt:10.4f} {tt / j:7.2f}")
        print(f"{metric + ' per sample (incl. compile)':40s} {res[f'jax_{metric}']['cold_s'] / n:10.4f}")
    if "torch" in res:
        print(f"values: MD jaxdrag {res['jax_md']['value']:.2f} vs torch {res['torch']['md']:.2f} "
              f"(different noise draws); LPIPS {res['jax_lpips']['value']:.6f} vs {res['torch']['lpips']:.6f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
