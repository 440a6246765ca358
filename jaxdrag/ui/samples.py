"""The samples the UI offers: the toy world's demo drag and held-out ToyBench tasks (always there),
and every sample of the DragBench / Drag100 folders given with ``--samples``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..data import EditRequest, find_samples

N_TOY = 10  # ToyBench tasks offered


@dataclass
class Choice:
    """A sample in the picker: ``load()`` gives the request (image, points, mask, prompts)."""

    label: str
    load: Callable[[], EditRequest]


def _toy_request(task) -> EditRequest:
    return EditRequest(image=task.image, points=task.points, prompt=task.prompt, mask=task.mask,
                       edit_prompt=task.edit_prompt, name=task.name)


def toy_choices(n: int = N_TOY) -> list[Choice]:
    """The demo drag first, then ``n`` ToyBench tasks (each labelled with its drag)."""
    from ..toy.bench import demo_task, make_tasks

    out = [Choice("toy: demo — red disc 20 px right", lambda: _toy_request(demo_task()))]
    for t in make_tasks(n):
        moves = ", ".join(f"({dx:+d}, {dy:+d}) px" for _, dx, dy in t.moves)
        out.append(Choice(f"toy: {t.name} — {t.kind}, {moves}", lambda t=t: _toy_request(t)))
    return out


def folder_choices(roots: Sequence[str | Path]) -> list[Choice]:
    """Every sample of each DragBench / Drag100 folder (RequestError names a folder that is
    neither)."""
    out = []
    for root in roots:
        for s in find_samples(root):
            out.append(Choice(f"{s.kind}: {s.name}", s.load))
    return out
