"""What a run downloads from the Hugging Face hub, whether it is cached, and one-line errors.

A run can need two kinds of hub files: open_clip weights (a ``model.pretrained`` tag such
as ``openai``, or a ``hf-hub:org/repo`` model name) and a diffusers pipeline (GIFT's
``generator.model``). This module describes each as a :class:`HubFiles`, answers "is it
in the local cache?" without touching the network, and fetches it with errors that say
what failed (repository and file), why (offline mode, no network, gated, missing) and
what to do. It never switches offline mode on: users download weights, and only the
tests and CI set ``HF_HUB_OFFLINE``.

Clusters whose compute nodes have no internet: ``cl-proxyfda prefetch RUN.yaml`` on the
login node fills the standard caches (``HF_HOME`` / ``HF_HUB_CACHE``, open_clip's URL
cache ``~/.cache/clip``), then ``HF_HUB_OFFLINE=1 cl-proxyfda run RUN.yaml`` on the nodes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cl_proxyfda.errors import UserError

_TRUE = {"1", "on", "yes", "true"}
HF_HUB_PREFIX = "hf-hub:"
OPENCLIP_CONFIG = "open_clip_config.json"
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's order
URL_CACHE = Path("~/.cache/clip")  # where open_clip keeps weights fetched by URL


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for no downloads."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().lower() in _TRUE for f in flags)


class DownloadError(UserError):
    """A file a run needs could not be had: the message says what, why and what to do."""


@dataclass(frozen=True)
class HubFiles:
    """Files a run needs from one place: a hub repository or a plain URL.

    ``groups`` lists what must be present; each group is a tuple of alternatives in the
    order the loader tries them (open_clip prefers ``.safetensors`` over ``.bin``).
    """

    key: str  # the config key the files come from, for error messages
    what: str  # e.g. "weights of ViT-B-16 (openai)"
    repo_id: str = ""
    groups: tuple[tuple[str, ...], ...] = ()
    url: str = ""
    snapshot: bool = False  # a whole repository (a diffusers pipeline)

    def describe(self) -> str:
        if self.url:
            return self.url
        if self.snapshot:
            return f"hub repository {self.repo_id}"
        files = ", ".join(" or ".join(group) for group in self.groups)
        return f"hub file {self.repo_id}/{files}"


# -------------------------------------------------------------- what is needed
def open_clip_files(name: str, pretrained: str | None) -> HubFiles | None:
    """The hub files behind ``model.name`` / ``model.pretrained``; None when nothing is
    downloaded (random weights, a shipped tag, a local file)."""
    import open_clip

    if name.startswith(HF_HUB_PREFIX):
        repo = name[len(HF_HUB_PREFIX):].strip("/")
        return HubFiles("model.name", f"model {name}", repo, ((OPENCLIP_CONFIG,), OPENCLIP_WEIGHTS))
    if not pretrained:
        return None
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        return None
    what = f"weights of {name} ({pretrained})"
    if "file" in cfg:
        return None
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        candidates = (filename,) if filename else OPENCLIP_WEIGHTS
        if filename.endswith((".bin", ".pth")):  # open_clip looks for a .safetensors twin first
            candidates = (filename[: -len(Path(filename).suffix)] + ".safetensors", filename)
        return HubFiles("model.pretrained", what, repo, (candidates,))
    if cfg.get("url"):
        return HubFiles("model.pretrained", what, url=cfg["url"])
    return None


def pipeline_files(model: str) -> HubFiles | None:
    """The hub repository of a diffusers pipeline; None for a local folder."""
    if Path(model).expanduser().is_dir():
        return None
    return HubFiles("generator.model", f"text-to-image pipeline {model}", model, (("model_index.json",),), snapshot=True)


# ------------------------------------------------------------------- the cache
def _cached_hub_file(repo_id: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


def cached_location(files: HubFiles) -> Path | None:
    """Where the files lie in the local cache (the last group's file), or None if any is missing."""
    if files.url:
        path = URL_CACHE.expanduser() / os.path.basename(files.url)
        return path if path.is_file() else None
    found: Path | None = None
    for group in files.groups:
        found = next((p for p in (_cached_hub_file(files.repo_id, f) for f in group) if p is not None), None)
        if found is None:
            return None
    return found


def availability(files: HubFiles | None) -> tuple[bool, str]:
    """(usable, one line): cached, or what a run would download, or why it cannot."""
    if files is None:
        return True, "nothing to download"
    where = cached_location(files)
    if where is not None:
        return True, f"{files.what}: in the local cache ({where})"
    if hub_offline():
        return False, f"{files.what}: {files.describe()} is not in the local cache and offline mode is on (HF_HUB_OFFLINE=1); run `cl-proxyfda prefetch` where there is internet, or unset HF_HUB_OFFLINE"
    return True, f"{files.what}: not cached yet; the run will download {files.describe()}"


# --------------------------------------------------------------------- fetching
def _why(exc: BaseException, files: HubFiles, filename: str) -> str:
    """The reason and the remedy for a failed download, in one sentence."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return "the repository is gated: accept its terms on huggingface.co and log in (`hf auth login` or HF_TOKEN)"
    if isinstance(exc, RepositoryNotFoundError):
        return f"the hub has no repository {files.repo_id!r} (or it is private: log in with `hf auth login`)"
    if isinstance(exc, LocalEntryNotFoundError):
        if hub_offline():
            return "it is not in the local cache and offline mode is on (HF_HUB_OFFLINE=1): run `cl-proxyfda prefetch RUN.yaml` on a machine with internet (same HF_HOME), or unset HF_HUB_OFFLINE"
        return "the hub could not be reached (no network?) and it is not in the local cache: check the connection, or run `cl-proxyfda prefetch RUN.yaml` where there is internet and share HF_HOME"
    if isinstance(exc, EntryNotFoundError):
        return f"the repository has no file {filename!r}"
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return f"the hub answered HTTP {status}: {str(exc).strip().splitlines()[0]}"
    if isinstance(exc, urllib.error.URLError):
        return f"the download failed ({exc.reason}): check the connection, or download {files.url} into {URL_CACHE}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _fail(files: HubFiles, exc: BaseException, filename: str) -> DownloadError:
    target = files.url or (f"{files.repo_id}/{filename}" if filename else files.repo_id)
    where = "" if target in files.what else f" ({target})"
    return DownloadError(f"{files.key}: cannot get the {files.what}{where}: {_why(exc, files, filename)}")


@contextlib.contextmanager
def quiet_library_logs() -> Iterator[None]:
    """Hold back the libraries' own log lines (open_clip's ``ERROR:root``, the hub
    client's retry warnings) while our one-line message says it better."""
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub"), logging.getLogger("diffusers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fetch(files: HubFiles | None) -> Path | None:
    """Download (or find in the cache) every file of ``files``; returns the last one's path.

    Raises :class:`DownloadError` with one line naming the repository and file.
    """
    if files is None:
        return None
    if files.url:
        from open_clip.pretrained import download_pretrained_from_url

        try:
            return Path(download_pretrained_from_url(files.url, cache_dir=str(URL_CACHE.expanduser())))
        except (OSError, RuntimeError) as exc:
            raise _fail(files, exc, "") from None
    if files.snapshot:
        return _fetch_pipeline(files)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    path: Path | None = None
    for group in files.groups:
        first_error: BaseException | None = None
        for filename in group:
            try:
                with quiet_library_logs():
                    path = Path(hf_hub_download(files.repo_id, filename))
                break
            except (EntryNotFoundError, LocalEntryNotFoundError) as exc:  # try the next alternative
                first_error = first_error or exc
            except Exception as exc:  # noqa: BLE001 - classified into one line
                raise _fail(files, exc, filename) from None
        else:
            raise _fail(files, first_error or RuntimeError("no file"), " or ".join(group)) from None
    return path


def _fetch_pipeline(files: HubFiles) -> Path:
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        with quiet_library_logs():
            return Path(DiffusionPipeline.download(files.repo_id))
    except Exception as exc:  # noqa: BLE001 - classified into one line
        cause = _hub_cause(exc)
        if cause is None and hub_offline():
            cause = LocalEntryNotFoundError("not cached")
        raise _fail(files, cause or exc, "") from None


def _hub_cause(exc: BaseException) -> BaseException | None:
    """The hub error in an exception's chain (diffusers wraps them), if any."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    seen = exc
    while seen is not None:
        if isinstance(seen, (HfHubHTTPError, LocalEntryNotFoundError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
