"""The persistent XLA compilation cache, switched on by the library.

Compiling the SD-1.5 stages takes minutes per working shape; with the cache a second run (or a
later shape group after ``Pipeline.release_compiled``) loads the programs from disk instead.
``load_pipeline`` calls ``enable``. Set ``JAXDRAG_COMPILE_CACHE=0`` to turn it off and
``JAXDRAG_CACHE_DIR`` to move it (default ``~/.cache/jaxdrag/xla``); a cache directory the user
already configured in JAX is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

_OFF = ("0", "false", "no", "off")


def default_dir() -> Path:
    return Path(os.environ.get("JAXDRAG_CACHE_DIR", Path.home() / ".cache" / "jaxdrag" / "xla"))


def enable(directory: str | Path | None = None, min_compile_s: float = 0.5) -> Path | None:
    """Turn the persistent cache on (programs that took ≥ ``min_compile_s`` to compile are
    stored). Returns the directory in use, or None when ``JAXDRAG_COMPILE_CACHE`` turns it off."""
    if os.environ.get("JAXDRAG_COMPILE_CACHE", "1").strip().lower() in _OFF:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current and directory is None:
        return Path(current)
    d = Path(directory) if directory is not None else default_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
    return d
