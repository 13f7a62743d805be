"""Fetching a model from the Hugging Face Hub: only the files chunktui needs, with progress.

`fetch_hub_model(repo_id)` returns a local snapshot folder (config, safetensors
weights, tokenizer, generation config). A model already in the local Hub cache
is used without touching the network. Otherwise it is downloaded with
`huggingface_hub`, which honours `HF_TOKEN`, `HF_HOME` / `HF_HUB_CACHE` and
`HF_ENDPOINT`; `HF_HUB_OFFLINE=1` (or `offline=True`, the CLI's `--offline`)
never goes to the network.

Every failure becomes a `ModelLoadError` that says which of these happened:
offline and not cached, no network, gated model without access, unknown
repository, no safetensors weights. Connection attempts time out after
`HF_HUB_ETAG_TIMEOUT` seconds (10 by default), so a machine without a route
to the Hub fails in seconds, not minutes.

`_hub_model_info` and `_hub_snapshot` are the only calls into
`huggingface_hub`; tests replace them with stand-ins.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

from chunktui.shared.errors import ModelLoadError

# Everything a causal LM needs besides its weights. Pickled weights (*.bin, *.pth) are never fetched.
META_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                 "chat_template.jinja", "chat_template.json", "*.tiktoken"]
_HF_WEIGHTS = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def env_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, not when huggingface_hub was imported."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The Hub cache as huggingface_hub computes it, read at call time: HF_HUB_CACHE, else HF_HOME/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def connect_timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or 10)
    except ValueError:
        return 10.0


def _token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # no token file, unreadable config: treat as logged out
        return None


# --------------------------------------------------------------------------- the two calls into huggingface_hub


def _hub_model_info(repo_id: str, revision: str | None, timeout: float):
    from huggingface_hub import HfApi

    return HfApi().model_info(repo_id, revision=revision, timeout=timeout, files_metadata=True)


def _hub_snapshot(repo_id: str, *, revision: str | None, cache_dir: Path, allow_patterns: list[str],
                  local_files_only: bool, tqdm_class=None) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, revision=revision, cache_dir=str(cache_dir), allow_patterns=allow_patterns,
                             local_files_only=local_files_only, etag_timeout=connect_timeout(),
                             tqdm_class=tqdm_class, max_workers=4)


# --------------------------------------------------------------------------- errors


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _named(err: BaseException, *names: str) -> bool:
    return any(cls.__name__ in names for cls in type(err).__mro__)


def _is_offline_error(err: BaseException) -> bool:
    return any(_named(e, "OfflineModeIsEnabled") for e in _chain(err))


def _is_network_error(err: BaseException) -> bool:
    # httpx2 / httpx / requests name their errors alike; the builtins cover sockets and DNS
    for e in _chain(err):
        if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if _named(e, "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError",
                  "ProxyError", "ConnectionError", "Timeout", "RemoteProtocolError"):
            return True
    return False


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def offline_message(repo_id: str) -> str:
    return (f"'{repo_id}' is not in the local Hugging Face cache ({hub_cache_dir()}), and downloads are off "
            f"({'HF_HUB_OFFLINE is set' if env_offline() else '--offline'}). Download it on a machine with network "
            f"access (`hf download {repo_id}`) and copy the cache over, or run without --offline / HF_HUB_OFFLINE.")


def gated_error(repo_id: str) -> ModelLoadError:
    page = f"https://huggingface.co/{repo_id}"
    if _token():
        return ModelLoadError(f"'{repo_id}' is a gated model and your Hugging Face token has no access to it yet. "
                              f"Ask for access on {page} (approval can take a while), then run again.")
    return ModelLoadError(f"'{repo_id}' is a gated model: accept its licence on {page}, then log in with "
                          "`hf auth login` (or set HF_TOKEN) and run again.")


def hub_error(err: BaseException, repo_id: str) -> ModelLoadError:
    """One specific, traceback-free message for each way a Hub download fails."""
    page = f"https://huggingface.co/{repo_id}"
    if any(_named(e, "GatedRepoError") for e in _chain(err)):
        return gated_error(repo_id)
    if any(_named(e, "RevisionNotFoundError") for e in _chain(err)):
        return ModelLoadError(f"'{repo_id}' exists on the Hub but has no such revision.")
    if any(_named(e, "RepositoryNotFoundError") for e in _chain(err)):
        hint = "" if _token() else " If it is private, log in with `hf auth login` (or set HF_TOKEN)."
        return ModelLoadError(f"No model '{repo_id}' on the Hugging Face Hub ({page} does not exist or is not "
                              f"visible to you). Check the spelling; `chunktui models` lists what else works.{hint}")
    if _is_offline_error(err):
        return ModelLoadError(offline_message(repo_id))
    if _is_network_error(err) or _named(err, "LocalEntryNotFoundError"):
        reason = next((str(e).splitlines()[0] for e in _chain(err) if _is_network_error(e) and str(e)), "")
        return ModelLoadError(
            f"Cannot reach the Hugging Face Hub to download '{repo_id}'{f' ({reason})' if reason else ''}, and it is "
            f"not in the local cache ({hub_cache_dir()}). Check the network (or HF_ENDPOINT / the proxy settings), "
            f"or download it elsewhere with `hf download {repo_id}` and copy the cache over.")
    status = _status(err)
    if status is not None:
        server = getattr(err, "server_message", None) or str(err).splitlines()[0]
        return ModelLoadError(f"The Hugging Face Hub answered HTTP {status} for '{repo_id}': {server}")
    if isinstance(err, OSError) and getattr(err, "errno", None) == 28:
        return ModelLoadError(f"The disk holding {hub_cache_dir()} is full: free space or set HF_HOME elsewhere, "
                              "then run again (finished files are kept).")
    return ModelLoadError(f"Downloading '{repo_id}' failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


# --------------------------------------------------------------------------- choosing files


def weight_patterns(files: list[str]) -> list[str]:
    """Which weight files to fetch from a repository's file list (safetensors only).

    Transformers' own names (model.safetensors, or model-0000i-of-0000n.safetensors
    plus their index) win; a repository that also ships a consolidated
    checkpoint (Mistral's consolidated.safetensors) would otherwise be fetched twice.
    """
    top = [f for f in files if "/" not in f]
    hf = [f for f in top if _HF_WEIGHTS.match(f)]
    if hf:
        return hf + [f for f in top if f == "model.safetensors.index.json"]
    return [f for f in top if f.endswith(".safetensors") or f.endswith(".safetensors.index.json")]


def is_complete(folder: Path) -> bool:
    """A snapshot with a config and all its safetensors weights (every shard its index names)."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError):
            return False
        return bool(shards) and all((folder / s).is_file() for s in shards)
    return any(folder.glob("*.safetensors"))


# --------------------------------------------------------------------------- progress


class _NullFile:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _progress_bars(progress, repo_id: str, total_bytes: int | None, n_files: int):
    """A tqdm class that forwards huggingface_hub's download bars to chunktui's progress callback."""
    from tqdm.auto import tqdm

    state = {"bytes": 0, "files": 0, "last": 0.0}
    lock = threading.Lock()

    def report(final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - state["last"] < 0.2:
            return
        state["last"] = now
        if total_bytes:
            fraction = min(state["bytes"] / total_bytes, 1.0)
            text = f"downloading {repo_id}: {state['bytes'] / 2**30:.2f} of {total_bytes / 2**30:.2f} GiB"
        else:
            fraction = state["files"] / n_files if n_files else None
            text = f"downloading {repo_id}: {state['files']} of {n_files} files"
        try:
            progress("download", fraction, text)
        except Exception:  # a progress display must never break a download
            pass

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs.update(file=_NullFile(), disable=False, mininterval=0.2)
            super().__init__(*args, **kwargs)
            desc = str(kwargs.get("desc") or "")
            self._kind = ("files" if desc.startswith("Fetching") else
                          "transfer" if desc.startswith("Downloading bytes") else "bytes")

        def update(self, n=1):
            out = super().update(n)
            if self._kind != "transfer":
                with lock:
                    state[self._kind] = max(state[self._kind], int(self.n))
                    report()
            return out

    return Bar


# --------------------------------------------------------------------------- fetching


def fetch_hub_model(repo_id: str, revision: str | None = None, offline: bool = False,
                    progress=None) -> Path:
    """A local folder with `repo_id`'s config, safetensors weights and tokenizer, downloading what is missing."""
    progress = progress or (lambda *a: None)
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo_id)
    except ImportError:
        pass
    except Exception:  # HFValidationError: a name the Hub could never hold
        raise ModelLoadError(f"'{repo_id}' is not a model chunktui knows (see `chunktui models`) and not a valid "
                             "Hugging Face id: owner/name, with letters, digits, '-', '_' and '.' only "
                             f"(as `hf download {repo_id}` would say).") from None
    cache = hub_cache_dir()
    offline = offline or env_offline()
    patterns = META_PATTERNS + ["*.safetensors", "*.safetensors.index.json"]
    try:  # 1. the local cache, no network
        folder = Path(_hub_snapshot(repo_id, revision=revision, cache_dir=cache, allow_patterns=patterns,
                                    local_files_only=True))
        if is_complete(folder):
            progress("fetch", 1.0, f"{repo_id} in the Hugging Face cache")
            return folder
    except Exception:  # not cached, or a partial snapshot: decided below
        pass
    if offline:
        raise ModelLoadError(offline_message(repo_id))
    # 2. ask the Hub what the repository holds (short timeout: no route means a quick, clear failure)
    progress("fetch", None, f"asking the Hugging Face Hub about {repo_id}")
    try:
        info = _hub_model_info(repo_id, revision, connect_timeout())
    except Exception as err:
        raise hub_error(err, repo_id) from None
    siblings = list(getattr(info, "siblings", None) or [])
    files = [s.rfilename for s in siblings]
    weights = weight_patterns(files)
    if not weights:
        raise ModelLoadError(f"'{repo_id}' has no safetensors weights on the Hub (only pickled checkpoints, "
                             "which chunktui does not load). Convert it to safetensors, or choose another repository.")
    if getattr(info, "gated", False) and not _token():
        raise gated_error(repo_id)
    allow = weights + META_PATTERNS
    from huggingface_hub.utils import filter_repo_objects

    chosen = set(filter_repo_objects(files, allow_patterns=allow))
    sizes = [getattr(s, "size", None) for s in siblings if s.rfilename in chosen]
    total = sum(sizes) if sizes and all(isinstance(x, int) for x in sizes) else None
    progress("download", 0.0, f"downloading {repo_id} ({len(chosen)} files"
                              f"{f', {total / 2**30:.2f} GiB' if total else ''}) into {cache}")
    try:
        folder = Path(_hub_snapshot(repo_id, revision=getattr(info, "sha", None) or revision, cache_dir=cache,
                                    allow_patterns=allow, local_files_only=False,
                                    tqdm_class=_progress_bars(progress, repo_id, total, len(chosen))))
    except Exception as err:
        raise hub_error(err, repo_id) from None
    if not is_complete(folder):
        raise ModelLoadError(f"The download of '{repo_id}' is incomplete (no config.json or missing weight shards "
                             f"in {folder}). Run again to resume.")
    progress("download", 1.0, f"{repo_id} downloaded")
    return folder
