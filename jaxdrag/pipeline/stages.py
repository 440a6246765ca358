"""Compiled stages: every stage of an edit is compiled ahead of time once per shape and kept in a
cache (``Stages``), exported for another platform, spread over devices with ``shard_map``, or
measured for memory planning; and the progress plumbing (``Bar``, ``ProgressRelay``)."""

from __future__ import annotations

import copy
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .pixels import tree_bytes


CUDNN_TARGETS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward", "__cudnn$fmhaScaleBiasSoftmax",
                  "__cudnn$fmhaScaleBiasSoftmaxBackward", "__cudnn$fmhaSoftmaxDropout",
                  "__cudnn$fmhaSoftmaxDropoutBackward", "__cudnn$fmhaScaleBiasSoftmaxDropout",
                  "__cudnn$fmhaScaleBiasSoftmaxDropoutBackward", "__cudnn$fmhaSoftmaxF8",
                  "__cudnn$fmhaSoftmaxBackwardF8")


class ProgressRelay:
    """The one host callback compiled into drag loops: forwards ``(it, done)`` to whatever
    listener the current run set (``target``), so a cached loop never calls a stale one."""

    def __init__(self):
        self.target: Callable | None = None

    def __call__(self, it, done):
        if self.target is not None:
            self.target(it, done)


class Bar:
    """One stage's progress for ``edit_batch(progress=…)``: a tqdm bar (True), a callback
    ``progress(stage, done, total)`` (a callable, e.g. a UI's), or nothing (False/None)."""

    def __init__(self, progress, stage: str, total: int, desc: str):
        self.stage, self.total, self.n = stage, int(total), 0
        self.fn = progress if callable(progress) else None
        self.tqdm = None
        if progress is True:
            from tqdm import tqdm
            self.tqdm = tqdm(total=self.total, desc=desc, leave=False)
        self._emit()

    def _emit(self):
        if self.fn is not None:
            self.fn(self.stage, self.n, self.total)

    def set(self, n: int) -> None:
        self.n = min(int(n), self.total)
        if self.tqdm is not None:
            self.tqdm.n = self.n
            self.tqdm.refresh()
        self._emit()

    def update(self, n: int) -> None:
        self.set(self.n + n)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


class Stages:
    """Ahead-of-time compiled stage functions, cached per (jitted function, input shapes/dtypes).

    The function object is part of the key: stage functions bake static settings in (the drag
    config, max_iters, the output size), so equal input shapes do not imply the same program."""

    def __init__(self):
        self._cache: dict = {}
        self.last_compile_s: dict[str, float] = {}
        # totals since the pipeline was made: programs compiled per stage, and their seconds
        self.compiles: dict[str, int] = {}
        self.compile_s: dict[str, float] = {}
        # export mode: build every stage for another platform with ``jax.export`` instead of
        # running it (outputs are zeros of the right shapes, so a whole edit can be walked through)
        self.export_platform: str | None = None
        self.exported: dict[str, list] = {}
        # several devices: stages run under ``shard_map`` over the edit axis (``use_devices``)
        self.mesh: jax.sharding.Mesh | None = None
        self._sharded: dict = {}
        # one compile per program when several threads ask for it (``editing.compile_ahead``):
        # the second caller waits for the first's program
        self._guard = threading.Lock()
        self._compiling: dict[tuple, threading.Lock] = {}
        # a measuring view (``measuring``, for ``plan_batch``): compile, record each stage's memory, return zeros
        self.measured: dict[str, dict] | None = None

    def measuring(self, one_device: bool = True) -> "Stages":
        """A view of this cache that compiles without running: the same compiled programs and
        counters; every call records its stage's memory in the view's ``measured`` and returns
        zeros of its outputs. ``one_device``: one device's programs (memory planning) rather
        than this object's (compiling ahead). This object is not changed."""
        view = copy.copy(self)
        view.measured, view.last_compile_s = {}, {}
        if one_device:
            view.mesh = None
        return view

    def export_for(self, platform: str | None) -> None:
        """``platform`` ("cuda", "tpu", …): from now on export stages for it instead of running
        them (``self.exported[stage]`` collects the ``jax.export.Exported`` objects); None: run.
        JAX's in-memory trace caches are cleared on every switch: a jitted function traced for
        one platform (say with cuDNN attention) must not be reused for another."""
        if platform != self.export_platform:
            jax.clear_caches()
            self._cache.clear()
        self.export_platform = platform
        self.exported = {}

    @staticmethod
    def _key(name: str, fn, args) -> tuple:
        leaves, tree = jax.tree.flatten(args)
        return (name, fn, tree, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))

    def _export(self, key: tuple, name: str, fn, *args):
        """Build (or reuse, e.g. the LoRA program for another method) the stage's program for
        ``export_platform``; returns zeros of its output shapes."""
        from ..precision import target_platform

        exp = self._cache.get(key)
        if exp is None:
            # cuDNN's fused attention has no serialization guarantee; the program is for
            # inspection and building, not for storing, so allow it
            checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in CUDNN_TARGETS]
            with target_platform(self.export_platform):
                exp = jax.export.export(fn, platforms=[self.export_platform], disabled_checks=checks)(*args)
            self._cache[key] = exp
            self.exported.setdefault(name, []).append(exp)
        return jax.tree.unflatten(exp.out_tree, [jnp.zeros(a.shape, a.dtype) for a in exp.out_avals])

    def _over_devices(self, fn, args):
        """``fn`` under ``shard_map`` over the mesh's edit axis: the first argument (the shared
        weights) replicated, every other argument and every output split along its leading edit
        axis. Each device runs its own program — its own drag ``while_loop``, so a slow edit on
        one device does not hold the others. None when the batch does not split evenly."""
        from jax.sharding import PartitionSpec as P

        n = self.mesh.size
        if any(np.ndim(x) == 0 or np.shape(x)[0] % n for x in jax.tree.leaves(args[1:])):
            return None
        with self._guard:
            wrapped = self._sharded.get(fn)
            if wrapped is None:
                spec = (P(),) + (P("edits"),) * (len(args) - 1)
                wrapped = jax.jit(jax.shard_map(fn, mesh=self.mesh, in_specs=spec, out_specs=P("edits"),
                                                check_vma=False))
                self._sharded[fn] = wrapped
        return wrapped

    def __call__(self, name: str, fn, *args):
        if self.mesh is not None and self.export_platform is None:
            sharded = self._over_devices(fn, args)
            if sharded is not None:
                fn = sharded
        key = self._key(name, fn, args)
        if self.export_platform is not None:
            return self._export(("export", self.export_platform) + key, name, fn, *args)
        exe = self._cache.get(key)
        if exe is None:
            exe = self._compile(key, name, fn, args)
        if self.measured is not None:  # plan_batch: kept, it serves a planned batch of 1
            return self._measure(name, exe, args)
        return exe(*args)

    def _compile(self, key: tuple, name: str, fn, args):
        """Compile (once: a concurrent caller of the same key waits for this one) and cache."""
        with self._guard:
            lock = self._compiling.setdefault(key, threading.Lock())
        with lock:
            exe = self._cache.get(key)
            if exe is not None:  # compiled by another thread meanwhile
                return exe
            t0 = time.perf_counter()
            exe = fn.lower(*args).compile()
            dt = time.perf_counter() - t0
            with self._guard:
                self.last_compile_s[name] = self.last_compile_s.get(name, 0.0) + dt
                self.compiles[name] = self.compiles.get(name, 0) + 1
                self.compile_s[name] = self.compile_s.get(name, 0.0) + dt
                self._cache[key] = exe
                self._compiling.pop(key, None)
        return exe

    def _measure(self, name, exe, args):
        """Record the stage's memory (bytes): ``shared`` = its first argument (the weights,
        one copy whatever the batch), ``edit`` = everything else it needs at this batch
        (other arguments, outputs, temporaries). Returns zeros of its outputs."""
        m = exe.memory_analysis()
        shared = tree_bytes(args[0])
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        prev = self.measured.get(name, {"shared": 0, "edit": 0})
        self.measured[name] = {"shared": max(prev["shared"], int(shared)),
                               "edit": max(prev["edit"], int(total - shared))}
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), exe.out_info)

    @property
    def live(self) -> int:
        """Compiled programs currently held."""
        return len(self._cache)

    def clear(self) -> None:
        with self._guard:
            self._cache.clear()
            self._sharded.clear()


