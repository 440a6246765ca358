"""Programs per stage a whole DragBench run compiles, computed from the samples' working shapes and
handle counts: the grouping before issue 10 (batches flushed at 8 per shape in dataset order, each
batch at its own size and handle count) and the fixed shapes now (``edit_batch``).

    python benchmarks/dragbench_programs.py ../shared/data/DragBench --width 128   # the tiny model
"""

import argparse
from collections import OrderedDict

from jaxdrag.data import find_samples, prepare
from jaxdrag.pipeline import pow2_bucket


def count(batches) -> dict:
    """batches: [(prepared edits, batch size, handle slots)] → distinct programs per stage."""
    drag, lat, img, lora = set(), set(), set(), set()
    for grp, b, n in batches:
        p = grp[0]
        drag.add((p.sup_hw, p.latent_hw, b, n))
        lat.add((p.latent_hw, b))
        img.add((p.image.shape, b))
        lora.add((p.lora_image.shape, b))
    return {"drag": len(drag), "invert/denoise": len(lat), "encode/decode": len(img), "lora": len(lora)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    ps = [prepare(s.load(), args.width, args.width) for s in find_samples(args.dataset)]
    old, buckets = [], OrderedDict()
    for p in ps:
        buckets.setdefault(p.image.shape[:2], []).append(p)
        if len(buckets[p.image.shape[:2]]) >= args.batch_size:
            old.append(buckets.pop(p.image.shape[:2]))
    old += list(buckets.values())
    groups = OrderedDict()
    for p in ps:
        groups.setdefault(p.image.shape[:2], []).append(p)
    new = [(g, min(args.batch_size, pow2_bucket(len(g))), pow2_bucket(max(len(p.handles) for p in g)))
           for g in groups.values()]
    print(f"{len(ps)} samples, {len(groups)} working shapes")
    print("before:", count([(g, len(g), max(len(p.handles) for p in g)) for g in old]))
    print("now:   ", count(new))


if __name__ == "__main__":
    main()
