import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# development data next to the checkout (../shared), or $JAXDRAG_SHARED; tests using it skip when absent
SHARED = Path(os.environ.get("JAXDRAG_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def pytest_configure(config):
    """One persistent XLA cache for the session, shared by pytest-xdist's workers (the first
    process makes it, the workers inherit its place): a program compiled in one worker or for one
    pipeline object is loaded by the others. The CLI's commands keep their pipelines
    (``keep_loaded``), so the CLI tests share one toy pipeline and its compiled programs."""
    import tempfile

    import jax

    from jaxdrag.cli.models import keep_loaded

    d = os.environ.get("JAXDRAG_TEST_XLA_CACHE")
    if not d:
        d = os.environ["JAXDRAG_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="jaxdrag-xla-")
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    keep_loaded(True)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(tiny SD folder, tiny CLIP folder), generated fresh for the session."""
    from jaxdrag.tiny import ensure_tiny

    return ensure_tiny(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_models):
    import jaxdrag

    sd, clip = tiny_models
    return jaxdrag.load_pipeline(sd, clip=clip, dtype="float32")


def shared_data(*parts) -> Path:
    """A path under the shared data folder, or skip the test when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


@pytest.fixture(scope="session")
def readme_demo(tmp_path_factory):
    """``jaxdrag demo`` exactly as the README gives it, once, in a fresh process (writing
    ./demo_out in a temporary folder) with the session's persistent XLA cache: (the printed
    summary, the demo_out folder). The README test and the toy model's DragText test read it."""
    import json
    import shutil
    import subprocess

    import jax

    cwd = tmp_path_factory.mktemp("demo")
    exe = shutil.which("jaxdrag") or f"{sys.executable} -m jaxdrag.cli"
    env = {k: v for k, v in os.environ.items() if k != "JAXDRAG_COMPILE_CACHE"}
    env["JAXDRAG_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    proc = subprocess.run(f"{exe} demo", shell=True, cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), cwd / "demo_out"


# pytest-xdist (``-n 2 --dist loadgroup``, pyproject's addopts): tests that share compiled programs
# run in the same worker so they share them in memory as in one process: every test of the
# session's tiny pipeline in one group, the command line, toy-model and UI tests (one kept toy
# pipeline, the README demo run) in another; the rest (parity tests with their own small programs)
# go wherever a worker is free.
_TOY_ROOMS = ("cli", "toy", "ui", "sweep")


def pytest_collection_modifyitems(config, items):
    for item in items:
        room = Path(str(item.fspath)).parent.name
        if {"tiny_pipe", "tiny_models"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("tiny"))
        elif room in _TOY_ROOMS:
            item.add_marker(pytest.mark.xdist_group("toy"))
