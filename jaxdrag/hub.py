"""Models named by Hugging Face Hub id, resolved through ``huggingface_hub``'s cache.

Wherever jaxdrag takes a model (``load_pipeline``, ``--model``, ``--vae``, ``--clip``, ``--dift``,
the UI), it also takes a Hub id:

    org/name                      the repository at its default branch
    org/name@revision             a branch, tag or commit hash
    org/name[@revision]/sub/dir   a model in a subfolder of the repository (e.g. ``…/vae``)
    org/name[@revision]/file.safetensors   one file (an LDM single-file checkpoint)

A local path that exists always wins. Only the files the loaders read are fetched — configs,
``.safetensors`` weights (plain, sharded, or the fp16 variant when the plain file is absent) and
tokenizer files; never pickled ``.bin``/``.ckpt``. The user's cache (``HF_HUB_CACHE`` /
``HF_HOME``) and token are used as ``huggingface_hub`` uses them, and ``HF_HUB_OFFLINE=1`` is
honoured: the cache alone is read. Anything that cannot be resolved is one ``WeightsError``
line naming the id and saying what to do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .weights import WeightsError

_ID = re.compile(r"^(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[\w.-]+?)(?:@(?P<rev>[\w.-]+))?(?:/(?P<sub>.+))?$")

# the files each kind of model folder is read from (relative to the folder)
_WEIGHTS = ("{stem}.safetensors", "{stem}.safetensors.index.json", "{stem}-*-of-*.safetensors")
_TOKENIZER = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")
_PARTS = {
    "vae": {"": ("diffusion_pytorch_model",)},
    "clip": {"": ("model",)},
    "sd": {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
           "text_encoder": ("model",)},
}
_EXTRA = {
    "vae": ("config.json",),
    "clip": ("config.json", "preprocessor_config.json") + _TOKENIZER,
    "sd": ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
           "scheduler/*", "tokenizer/*"),
}
KINDS = tuple(_PARTS)


@dataclass(frozen=True)
class HubId:
    repo: str
    revision: str | None
    subfolder: str

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "") + (f"/{self.subfolder}" if self.subfolder else "")


def parse(name: str) -> HubId | None:
    """The Hub id in ``name``, or None if it does not have the form ``org/name[@rev][/sub]``."""
    m = _ID.match(str(name))
    if m is None or str(name).startswith(("/", ".", "~")) or "\\" in str(name):
        return None
    return HubId(f"{m['org']}/{m['name']}", m["rev"], (m["sub"] or "").strip("/"))


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read at call time, as a test or a user may set it late)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def patterns(kind: str, subfolder: str = "", variant: str | None = None) -> list[str]:
    """The ``allow_patterns`` for a model folder of ``kind`` ("sd", "vae", "clip") at ``subfolder``."""
    if kind not in _PARTS:
        raise ValueError(f"unknown model kind {kind!r}; one of {KINDS}")
    pre = f"{subfolder}/" if subfolder else ""
    out = [pre + e for e in _EXTRA[kind]]
    for part, stems in _PARTS[kind].items():
        d = f"{pre}{part}/" if part else pre
        for stem in stems:
            s = f"{stem}.{variant}" if variant else stem
            out += [d + w.format(stem=s) for w in _WEIGHTS]
    return out


def _missing_weights(folder: Path, kind: str) -> list[str]:
    out = []
    for part, stems in _PARTS[kind].items():
        d = folder / part if part else folder
        for stem in stems:
            if not any(list(d.glob(w.format(stem=s))) for s in (stem, f"{stem}.fp16") for w in _WEIGHTS):
                out.append(str(Path(part) / f"{stem}.safetensors") if part else f"{stem}.safetensors")
    return out


def _explain(hid: HubId, e: Exception) -> str:
    from huggingface_hub import errors as E

    fix = "pass a local folder instead"
    if isinstance(e, E.RevisionNotFoundError):
        return f"{hid}: the Hub repository {hid.repo} has no revision {hid.revision!r}; check the branch, tag or commit"
    if isinstance(e, E.RepositoryNotFoundError):
        return (f"{hid}: no Hub repository {hid.repo!r} (or it is private/gated and no token with access is set: "
                f"`hf auth login`); check the id or {fix}")
    if isinstance(e, (E.EntryNotFoundError,)) and not isinstance(e, E.LocalEntryNotFoundError):
        return f"{hid}: the Hub repository {hid.repo} has no file {hid.subfolder!r}; {fix}"
    if isinstance(e, (E.LocalEntryNotFoundError, E.OfflineModeIsEnabled)) or offline():
        why = "HF_HUB_OFFLINE is set and" if offline() else "the Hub could not be reached and"
        return (f"{hid}: {why} the Hugging Face cache has no copy of it; run once with network (unset "
                f"HF_HUB_OFFLINE) to fill the cache, or {fix}")
    return f"{hid}: could not be fetched from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]}); {fix}"


def resolve(name: str | Path, kind: str) -> Path:
    """A local path for the model ``name``: the path itself if it exists (or if ``name`` is no Hub
    id, for the loader's own "not found" message), else the Hub id's snapshot folder (or file) in
    the Hugging Face cache, fetching what is missing unless offline.
    ``kind``: "sd" (a diffusers pipeline folder), "vae" or "clip" (one model folder)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    hid = parse(str(name))
    if hid is None:  # not an id either: the loader names what it expected
        return path
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:  # pragma: no cover - installed with transformers
        raise WeightsError(f"{name}: not a local path, and huggingface_hub is not installed to read Hub ids") from None
    cache = os.environ.get("HF_HUB_CACHE") or None
    kw = dict(revision=hid.revision, cache_dir=cache, local_files_only=offline())
    try:
        if hid.subfolder.endswith(".safetensors"):
            return Path(hf_hub_download(hid.repo, hid.subfolder, **kw))
        if hid.subfolder.endswith((".bin", ".ckpt", ".pt", ".pth")):
            raise WeightsError(f"{hid}: a pickled PyTorch file; jaxdrag reads .safetensors only (pickles can run code)")
        root = Path(snapshot_download(hid.repo, allow_patterns=patterns(kind, hid.subfolder), **kw))
        folder = root / hid.subfolder if hid.subfolder else root
        missing = _missing_weights(folder, kind)
        if missing and not offline():  # a repository with only the fp16 variant of some weights
            snapshot_download(hid.repo, allow_patterns=patterns(kind, hid.subfolder, "fp16"), **kw)
            missing = _missing_weights(folder, kind)
    except WeightsError:
        raise
    except Exception as e:  # huggingface_hub's errors, and the HTTP client's when the network is down
        raise WeightsError(_explain(hid, e)) from None
    if not folder.is_dir():
        raise WeightsError(f"{hid}: the Hub repository {hid.repo} has no folder {hid.subfolder!r}")
    if missing:
        where = "in the Hugging Face cache" if offline() else "in the Hub repository"
        raise WeightsError(f"{hid}: no {', '.join(missing)} {where} (a {kind} model needs it; .bin/.ckpt "
                           f"pickles are not read); pass a local folder instead")
    return folder
