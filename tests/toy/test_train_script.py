"""scripts/train_toy.py rejects bad settings with one line, before any stage runs."""

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_main():
    return runpy.run_path(str(ROOT / "scripts" / "train_toy.py"))["main"]


@pytest.mark.parametrize("argv, message", [
    (["--latent-scale", "0"], "error: --latent-scale 0.0: must be > 0"),
    (["--latent-scale", "nan"], "error: --latent-scale nan: must be > 0"),
    (["--session", "0"], "error: --session 0: sessions count from 1"),
])
def test_bad_settings_stop_with_one_line(train_main, tmp_path, argv, message):
    # --devices 1: the script then leaves XLA_FLAGS alone (later subprocesses of the suite inherit it)
    with pytest.raises(SystemExit) as e:
        train_main(argv + ["--devices", "1", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert str(e.value) == message
    assert not (tmp_path / "work").exists()  # nothing ran
