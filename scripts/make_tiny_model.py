"""Write the tiny default models (deterministic, random init) into weights/ (or --out).

    python scripts/make_tiny_model.py [--out DIR]

Produces DIR/tiny-sd15 (a diffusers folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/)
and DIR/tiny-clip-vit-b16 (an HF CLIPModel folder). The same files are produced on every machine.
"""

import argparse
from pathlib import Path

from jaxdrag.tiny import default_weights_dir, write_tiny_clip, write_tiny_sd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="target folder (default: weights/)")
    args = ap.parse_args()
    root = args.out or default_weights_dir()
    print(write_tiny_sd(root))
    print(write_tiny_clip(root))


if __name__ == "__main__":
    main()
