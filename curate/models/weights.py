"""Weight files: resolved from a local path, a URL or the official source into a cache, checked, loaded safely."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_CACHE = "~/.cache/curate"
DOWNLOAD_TIMEOUT_S = 60.0
HUB_PROBE_TIMEOUT_S = 10.0


class WeightsError(ValueError):
    """A weight file could not be found, fetched or trusted; the message says which option fixes it.

    A ValueError, like every other bad-configuration error, so the CLI reports it as one.
    """


@dataclass(frozen=True)
class Source:
    """One place an official weight file is published: an http(s) URL, or a Hugging Face hub repo and file."""

    location: str
    filename: str
    sha256: str | None = None
    hub_repo: str | None = None

    def describe(self) -> str:
        return f"hf-hub:{self.hub_repo}/{self.filename}" if self.hub_repo else self.location


@dataclass(frozen=True)
class WeightSpec:
    """What a weight is, which option overrides it, and where it is officially published (tried in order)."""

    name: str
    option: str
    sources: tuple[Source, ...] = field(default_factory=tuple)

    @property
    def pinned_sha256(self) -> set[str]:
        return {source.sha256 for source in self.sources if source.sha256}


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(spec: WeightSpec, source: str | os.PathLike | None, cache_dir: str | os.PathLike | None) -> Path:
    """The local file (or open_clip folder) holding spec's weights: a given path, a given URL, or the official one.

    A download lands in cache_dir (default ~/.cache/curate) under a temporary name and is renamed when complete.
    """
    cache = Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE)))
    if source is None:
        return _resolve_official(spec, cache)
    text = str(source)
    if text.startswith(("http://", "https://")):
        name = text.rstrip("/").split("/")[-1].split("?")[0] or "weights"
        return _fetch(spec, Source(text, name), cache)
    if text.startswith("hf-hub:"):
        repo, _, filename = text[len("hf-hub:") :].rpartition("/")
        return _fetch(spec, Source(text, filename, hub_repo=repo), cache)
    path = Path(os.path.expanduser(text))
    if not path.exists():
        raise WeightsError(
            f"{spec.name} weights: no file at {path} (given by {spec.option}). "
            f"Point {spec.option} at a local copy, or leave it out to fetch the official weights into {cache}."
        )
    return path


def _resolve_official(spec: WeightSpec, cache: Path) -> Path:
    for source in spec.sources:
        cached = _cache_path(source, cache)
        if cached.is_file():
            _check_sha256(spec, source, cached)
            return cached
    looked = ", ".join(str(_cache_path(source, cache)) for source in spec.sources)
    if _offline():
        raise WeightsError(
            f"{spec.name} weights: not in the cache ({looked}), and HF_HUB_OFFLINE is set, so not downloaded. "
            f"Pass {spec.option} PATH to a local copy, or set --model-cache to a folder that holds them."
        )
    failures = []
    for source in spec.sources:
        try:
            return _fetch(spec, source, cache)
        except WeightsError as error:
            failures.append(str(error))
    raise WeightsError(
        f"{spec.name} weights: not in the cache ({looked}) and could not be downloaded: {'; '.join(failures)}. "
        f"Download them elsewhere and pass {spec.option} PATH, or set --model-cache to a folder that holds them."
    )


def _offline() -> bool:
    """HF_HUB_OFFLINE, read as huggingface_hub reads it: the user asked for no downloads at all."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _cache_path(source: Source, cache: Path) -> Path:
    if source.hub_repo:
        return cache / "hub" / source.hub_repo.replace("/", "--") / source.filename
    return cache / source.filename


def _fetch(spec: WeightSpec, source: Source, cache: Path) -> Path:
    target = _cache_path(source, cache)
    if target.is_file():
        _check_sha256(spec, source, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s weights from %s to %s", spec.name, source.describe(), target)
    try:
        if source.hub_repo:
            _download_hub(source, target)
        else:
            _download_url(source.location, target)
    except Exception as error:  # any network or hub failure becomes one clear message
        raise WeightsError(f"{spec.name} weights: download from {source.describe()} failed ({error})") from error
    _check_sha256(spec, source, target)
    return target


def _download_url(url: str, target: Path) -> None:
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _download_hub(source: Source, target: Path) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    assert source.hub_repo is not None
    # One short try first: on an unreachable hub, hf_hub_download retries with backoff for ~25 s, logging each twice.
    get_hf_file_metadata(hf_hub_url(source.hub_repo, source.filename), timeout=HUB_PROBE_TIMEOUT_S)
    staging = tempfile.mkdtemp(dir=target.parent, prefix=".hub-")
    try:
        downloaded = hf_hub_download(repo_id=source.hub_repo, filename=source.filename, local_dir=staging)
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_sha256(spec: WeightSpec, source: Source, path: Path) -> None:
    if source.sha256 is None:
        return
    actual = sha256_of(path)
    if actual != source.sha256:
        raise WeightsError(
            f"{spec.name} weights: {path} has sha256 {actual}, expected {source.sha256} for {source.describe()}. "
            f"Delete the file to download it again, or pass a trusted copy with {spec.option}."
        )


def load_state_dict(path: str | Path, spec: WeightSpec) -> dict[str, torch.Tensor]:
    """Tensors of a weight file, read without running code from it.

    safetensors and torch.save files go through `torch.load(weights_only=True)`. A TorchScript archive (the
    original OpenAI CLIP release) needs `torch.jit.load`, so it is opened only when its sha256 is a pinned one.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if _is_torchscript(path):
        if sha256_of(path) not in spec.pinned_sha256:
            raise WeightsError(
                f"{spec.name} weights: {path} is a TorchScript archive whose sha256 is not a published one; "
                f"it will not be loaded. Pass a state dict or .safetensors file with {spec.option}."
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, and the only reader
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise WeightsError(f"{spec.name} weights: cannot read {path} as a weights-only torch file ({error})") from error
    if not isinstance(loaded, dict):
        raise WeightsError(f"{spec.name} weights: {path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Drop a DataParallel-style key prefix when every key carries it."""
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict
