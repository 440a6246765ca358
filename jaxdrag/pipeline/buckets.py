"""Buckets: a few canvas shapes for a run's edits of many sizes, so each stage compiles once per
bucket instead of once per working shape, and edits of different sizes fill the same batches
(each computed exactly on its own size: ``models.canvas``).

A bucket is a working-image canvas (H, W) whose sides are multiples of ``step`` pixels (8 × the
UNet's 2^levels: 64 for SD-1.5, so the latent canvas has sides that are multiples of 8). The
run's working shapes are rounded up to ``step``; then the two buckets whose merger (their
elementwise maximum) adds the least padded area are merged, again and again, while the run's
padding waste stays under ``max_waste`` — or while there are more than ``max_buckets``. Waste is
the share of canvas cells that hold no edit: 1 − Σ valid areas / Σ canvas areas over the edits.
"""

from __future__ import annotations

from dataclasses import dataclass


def round_up(n: int, step: int) -> int:
    return -(-int(n) // step) * step


@dataclass(frozen=True)
class BucketPlan:
    """``canvases``: the bucket shapes (H, W); ``of``: each input shape's bucket index."""

    canvases: tuple[tuple[int, int], ...]
    of: dict

    def canvas(self, hw) -> tuple[int, int]:
        return self.canvases[self.of[tuple(int(s) for s in hw)]]

    def waste(self, shapes) -> float:
        """The padding waste of ``shapes`` (one entry per edit) in their buckets."""
        valid = sum(h * w for h, w in shapes)
        total = sum(self.canvas(s)[0] * self.canvas(s)[1] for s in shapes)
        return 1.0 - valid / max(total, 1)


def plan_buckets(shapes, *, step: int, max_waste: float = 0.25, max_buckets: int = 8) -> BucketPlan:
    """Buckets for ``shapes`` (the working (h, w) of every edit, repeats counted): at most
    ``max_buckets`` canvases, merged further while the waste stays ≤ ``max_waste``."""
    if step < 1:
        raise ValueError(f"bucket step {step}: must be ≥ 1")
    if not 0.0 <= max_waste < 1.0:
        raise ValueError(f"max_waste {max_waste}: must be in [0, 1)")
    if max_buckets < 1:
        raise ValueError(f"max_buckets {max_buckets}: must be ≥ 1")
    shapes = [(int(h), int(w)) for h, w in shapes]
    counts: dict = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    # bucket → {input shape: count}
    buckets: dict = {}
    for s, n in counts.items():
        c = (round_up(s[0], step), round_up(s[1], step))
        buckets.setdefault(c, {})[s] = n
    valid = sum(h * w * n for (h, w), n in counts.items())

    def area(c, members):
        return c[0] * c[1] * sum(members.values())

    while len(buckets) > 1:
        total = sum(area(c, m) for c, m in buckets.items())
        keys = sorted(buckets)
        best = None
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                u = (max(a[0], b[0]), max(a[1], b[1]))
                merged = {**buckets[a]}
                for s, n in buckets[b].items():
                    merged[s] = merged.get(s, 0) + n
                if u in buckets and u not in (a, b):
                    for s, n in buckets[u].items():
                        merged[s] = merged.get(s, 0) + n
                    extra = area(u, merged) - area(a, buckets[a]) - area(b, buckets[b]) - area(u, buckets[u])
                else:
                    extra = area(u, merged) - area(a, buckets[a]) - area(b, buckets[b])
                if best is None or extra < best[0]:
                    best = (extra, a, b, u, merged)
        extra, a, b, u, merged = best
        waste_after = 1.0 - valid / (total + extra)
        if len(buckets) <= max_buckets and waste_after > max_waste:
            break
        for k in {a, b, u}:
            buckets.pop(k, None)
        buckets[u] = merged
    canvases = tuple(sorted(buckets))
    of = {s: canvases.index(c) for c, members in buckets.items() for s in members}
    return BucketPlan(canvases, of)
