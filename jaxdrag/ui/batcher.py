"""Edits from many browser sessions, run as batches: each session submits a job and waits on it;
one worker thread collects the jobs that arrive within a short window (and all that arrived while
the last batch ran), groups them by what must be equal inside one ``edit_batch`` call — method,
pipeline settings and compile-time drag settings — and runs each group as one call. Continuous
hyperparameters travel in each request's ``hypers``, so edits that differ only in them still share
a batch. The pipeline is used by this worker only (``exclusive`` lends it to other work, e.g. a
generation, between batches)."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from ..data import EditRequest, EditResult, RequestError
from ..errors import SettingsError


def _settings_key(method: str, settings, overrides: dict) -> tuple:
    return (method, settings, tuple(sorted(overrides.items())))


@dataclass(eq=False)
class Job:
    """One submitted edit. ``stage`` = (name, done, total) of the batch it runs in: "queued",
    then the pipeline's "lora", "drag", "denoise". ``batch_edits``: how many edits shared its
    ``edit_batch`` call. Exactly one of ``result`` / ``error`` is set once ``finished`` is."""

    request: EditRequest
    method: str
    settings: Any
    overrides: dict
    submitted: float = field(default_factory=time.monotonic)
    stage: tuple = ("queued", 0, 0)
    result: EditResult | None = None
    error: str | None = None
    batch_edits: int = 0
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple:
        return _settings_key(self.method, self.settings, self.overrides)

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)


class EditQueue:
    """The batching worker. ``run`` is ``pipeline.edit_batch`` (a stand-in in tests).

    window_s: how long the worker waits after the first job of an idle queue for more to join
    its batch. max_batch: the most edits in one ``edit_batch`` call (the call splits them into
    its own vmapped batches of ``settings.batch_size``)."""

    def __init__(self, pipe, run: Callable | None = None, window_s: float = 1.0, max_batch: int = 8,
                 log: Callable[[str], None] | None = None):
        if run is None:
            from ..pipeline import edit_batch as run
        self.pipe, self.run, self.window_s, self.max_batch = pipe, run, float(window_s), int(max_batch)
        self.log = log or (lambda s: print(s, file=sys.stderr))
        self.pending: list[Job] = []
        self.running: list[Job] = []
        self.cond = threading.Condition()
        self.lock = threading.RLock()  # held while the pipeline works
        self.batches: list[int] = []  # the size of every edit_batch call made (for tests and logs)
        self._stop = False
        self.thread = threading.Thread(target=self._worker, name="jaxdrag-edit-queue", daemon=True)
        self.thread.start()

    # -------------------------------------------------------------- sessions' side
    def submit(self, request: EditRequest, method: str, settings, overrides: dict | None = None) -> Job:
        """Queue one edit (checked first: RequestError / SettingsError name the problem)."""
        from ..data import validate
        from ..drag.methods import check_hypers, resolve

        overrides = dict(overrides or {})
        resolve(method, **overrides)
        check_hypers(request.hypers)
        if request.generation is None:
            validate(request)
        job = Job(request, method, settings, overrides)
        with self.cond:
            self.pending.append(job)
            self.cond.notify_all()
        return job

    def ahead(self, job: Job) -> int:
        """How many edits run before ``job`` starts (0 once it runs)."""
        with self.cond:
            if job in self.pending:
                return len(self.running) + self.pending.index(job)
            return 0

    def exclusive(self, fn: Callable, *args, **kw):
        """``fn(*args, **kw)`` with the pipeline to itself (waits for a running batch)."""
        with self.lock:
            return fn(*args, **kw)

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self.thread.join(timeout=5)

    # -------------------------------------------------------------- the worker
    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.pending and not self._stop:
                self.cond.wait()
            if self._stop:
                return None
            deadline = self.pending[0].submitted + self.window_s
            while len(self.pending) < self.max_batch and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            key = self.pending[0].key
            batch = [j for j in self.pending if j.key == key][:self.max_batch]
            self.pending = [j for j in self.pending if j not in batch]
            self.running = batch
            return batch

    def _worker(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                with self.cond:
                    self.running = []

    def _run(self, jobs: list[Job]) -> None:
        def progress(stage, done, total):
            for j in jobs:
                j.stage = (stage, done, total)

        def failed(idx, exc):
            for i in idx:
                jobs[i].error = _message(exc)

        first = jobs[0]
        t0 = time.perf_counter()
        with self.lock:
            self.batches.append(len(jobs))
            for j in jobs:
                j.batch_edits = len(jobs)
            try:
                results = self.run(self.pipe, [j.request for j in jobs], first.method, settings=first.settings,
                                   progress=progress, on_error=failed, **first.overrides)
            except (RequestError, SettingsError) as e:
                if len(jobs) == 1:
                    first.error = _message(e)
                    results = [None]
                else:  # one request's fault: the others run on their own
                    self.log(f"batch of {len(jobs)} refused ({e}); running its edits one by one")
                    self.batches.pop()
                    for j in jobs:
                        self._run([j])
                    return
            except Exception as e:  # noqa: BLE001 - the server keeps serving; the page shows one line
                traceback.print_exc()
                results = [None] * len(jobs)
                for j in jobs:
                    j.error = _message(e)
        self.log(f"batch of {len(jobs)} edit(s), {first.method}: {time.perf_counter() - t0:.1f} s")
        for j, r in zip(jobs, results):
            if r is not None and j.error is None:
                j.result = r
            elif j.error is None:
                j.error = "the edit produced no result"
            j.finished.set()


def _message(e: BaseException) -> str:
    if isinstance(e, (RequestError, SettingsError)):
        return str(e)
    return f"{type(e).__name__}: {e}"
