"""Models named by Hub id (jaxdrag.hub): resolved through a Hugging Face cache laid out on disk as
huggingface_hub lays it out (refs/, snapshots/<commit>/ of symlinks into blobs/), offline; the
one-line errors for a missing repository, revision or file, and for no network."""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import jaxdrag
from jaxdrag import hub
from jaxdrag.toy import toy_paths
from jaxdrag.weights import WeightsError

PATHS = toy_paths()
needs_toy = pytest.mark.skipif(PATHS is None, reason="trained toy model not present in weights/")
C1, C2 = "1" * 40, "2" * 40


def _add_snapshot(cache: Path, repo: str, commit: str, src: Path, refs=("main",), skip=()) -> Path:
    """Put the files of ``src`` into ``cache`` as the snapshot ``commit`` of ``repo``."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if not f.is_file() or any(str(rel).startswith(s) for s in skip):
            continue
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copy(f, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for r in refs:
        (root / "refs" / r).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / r).write_text(commit)
    return snap


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    c = tmp_path / "hub"
    c.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so that no relative local path shadows the ids
    return c


def test_ids_parse_and_local_paths_win(tmp_path, monkeypatch):
    assert hub.parse("org/name") == hub.HubId("org/name", None, "")
    assert hub.parse("org/name@v1.0/vae") == hub.HubId("org/name", "v1.0", "vae")
    assert hub.parse("stabilityai/stable-diffusion-2-1@" + C1 + "/v2-1_512.safetensors").subfolder == \
        "v2-1_512.safetensors"
    assert hub.parse("/abs/path") is None and hub.parse("./rel/path") is None and hub.parse("single") is None
    # a local folder that looks like an id is the local folder
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("org/name", "sd") == Path("org/name")
    assert "vae/config.json" in hub.patterns("sd") and not any(p.endswith(".bin") for p in hub.patterns("sd"))
    assert hub.patterns("vae", "vae") == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors",
                                         "vae/diffusion_pytorch_model.safetensors.index.json",
                                         "vae/diffusion_pytorch_model-*-of-*.safetensors"]


@needs_toy
def test_load_by_id_revision_and_subfolder_from_the_cache(cache):
    sd, clip = PATHS
    _add_snapshot(cache, "jaxdrag/toy-sd15", C1, sd, refs=("main", "v2"))
    _add_snapshot(cache, "jaxdrag/toy-clip", C1, clip)
    local = jaxdrag.load_pipeline(sd, clip=clip, dtype="float32")
    for name in ("jaxdrag/toy-sd15", "jaxdrag/toy-sd15@v2", f"jaxdrag/toy-sd15@{C1}"):
        pipe = jaxdrag.load_pipeline(name, clip="jaxdrag/toy-clip", vae="jaxdrag/toy-sd15/vae", dtype="float32")
        assert Path(pipe.sd.source).parts[-2:] == ("snapshots", C1)
        a = np.asarray(pipe.encode_prompt(["a red disc"]))
        np.testing.assert_array_equal(a, np.asarray(local.encode_prompt(["a red disc"])))
        assert pipe.clip is not None and pipe.scaling_factor == local.scaling_factor
    # the resolved folders are the cache's snapshot (symlinks into blobs/), nothing copied
    assert hub.resolve("jaxdrag/toy-sd15/vae", "vae") == cache / "models--jaxdrag--toy-sd15" / "snapshots" / C1 / "vae"
    assert (hub.resolve("jaxdrag/toy-sd15", "sd") / "unet" / "config.json").is_symlink()


@needs_toy
def test_missing_repo_revision_and_file_are_one_line_errors(cache, monkeypatch):
    sd, _ = PATHS
    _add_snapshot(cache, "jaxdrag/no-unet", C2, sd, skip=("unet/diffusion_pytorch_model",))
    cases = {
        "jaxdrag/absent": "HF_HUB_OFFLINE is set and the Hugging Face cache has no copy of it",
        "jaxdrag/no-unet@nope": "HF_HUB_OFFLINE is set and the Hugging Face cache has no copy of it",
        "jaxdrag/no-unet": "no unet/diffusion_pytorch_model.safetensors in the Hugging Face cache",
        "jaxdrag/no-unet/model.ckpt": "a pickled PyTorch file",
        "not an id": "no such model folder or file",
    }
    for name, msg in cases.items():
        with pytest.raises(WeightsError) as e:
            jaxdrag.load_pipeline(name, dtype="float32")
        text = str(e.value)
        assert msg in text and "\n" not in text and name.split("/")[0] in text, text
    # online with no reachable Hub: the id, the reason and the fix in one line
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(WeightsError) as e:
        hub.resolve("jaxdrag/absent", "sd")
    assert "jaxdrag/absent" in str(e.value) and "pass a local folder" in str(e.value) and "\n" not in str(e.value)


@needs_toy
def test_cli_takes_hub_ids(cache, capsys):
    from jaxdrag.cli import main

    from PIL import Image

    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save("in.png")
    assert main(["edit", "in.png", "--points", "10,10 20,20", "--prompt", "x", "--model", "jaxdrag/absent", "--out", "out"]) == 2
    err = capsys.readouterr().err
    assert "jaxdrag/absent" in err and "HF_HUB_OFFLINE" in err and "Traceback" not in err
