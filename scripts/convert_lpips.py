"""Write the LPIPS-AlexNet weights `jaxdrag eval --lpips` reads (one .safetensors file) from the
PyTorch files users have: torchvision's AlexNet checkpoint (``alexnet-owt-7be5be79.pth``, ImageNet)
and lpips' linear heads (``lpips/weights/v0.1/alex.pth``, shipped inside the ``lpips`` package), or
one state dict of an ``lpips.LPIPS(net='alex')`` module.

    python scripts/convert_lpips.py --alexnet alexnet-owt-7be5be79.pth --lin alex.pth --out lpips_alex.safetensors
    python scripts/convert_lpips.py --lpips-state lpips_module.pth --out lpips_alex.safetensors

``--lin`` defaults to the installed lpips package's file. torch is needed by this script only
(``torch.load(weights_only=True)``: tensors only, no code); the result is checked by loading it
with jaxdrag's loader (every key and shape).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _load(path: Path) -> dict:
    import torch

    if not path.is_file():
        sys.exit(f"error: {path}: not found")
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        sys.exit(f"error: {path}: expected a state dict, got {type(sd).__name__}")
    return {k: v.float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}


def _default_lin() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth"
    return p if p.is_file() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alexnet", type=Path, help="torchvision AlexNet .pth (features.* keys)")
    ap.add_argument("--lin", type=Path, default=None, help="lpips v0.1 alex.pth (lin*.model.1.weight)")
    ap.add_argument("--lpips-state", type=Path, help="a whole lpips.LPIPS(net='alex') state dict instead")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from jaxdrag.eval.networks import lpips_name, load_lpips
    from jaxdrag.weights import save_safetensors

    if args.lpips_state:
        tensors = _load(args.lpips_state)
    else:
        if args.alexnet is None:
            ap.error("give --alexnet (with --lin) or --lpips-state")
        lin = args.lin or _default_lin()
        if lin is None:
            ap.error("--lin not given and the lpips package's weights/v0.1/alex.pth was not found")
        trunk = {k: v for k, v in _load(args.alexnet).items() if k.startswith("features.")}
        tensors = {**trunk, **_load(lin)}
    keep = {k: v for k, v in tensors.items() if lpips_name(k) is not None}
    save_safetensors(keep, args.out)
    load_lpips(args.out)  # every key and shape checked
    print(f"wrote {args.out} ({len(keep)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
