"""Hub downloads with stand-ins for huggingface_hub: nothing here goes to the network.

`chunktui.engine.hub._hub_model_info` and `_hub_snapshot` are the only calls into
huggingface_hub; every test replaces both, and an autouse fixture makes any
call that was not replaced fail loudly.
"""

from types import SimpleNamespace

import httpx2
import pytest
from click.testing import CliRunner
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from chunktui.cli import main
from chunktui.engine import hub
from chunktui.shared.errors import ModelLoadError
from chunktui.engine.models import load_model

REPO = "some-owner/tiny-model"


def _http_error(cls, status: int, message: str):
    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}")
    return cls(message, response=httpx2.Response(status, request=request))


def _not_cached(repo_id, *, revision, cache_dir, allow_patterns, local_files_only, tqdm_class=None):
    assert local_files_only, "this stand-in only answers cache look-ups"
    raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")


def _no_network(*args, **kwargs):
    raise AssertionError("the network was asked although it must not be")


@pytest.fixture(autouse=True)
def isolated_hub(tmp_path, monkeypatch):
    """A fresh HF_HOME, no token, online unless a test says otherwise, and no real Hub calls."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hub, "_hub_model_info", _no_network)
    monkeypatch.setattr(hub, "_hub_snapshot", _not_cached)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_model):
    """The tiny random model saved as a Hub snapshot would hold it."""
    folder = tmp_path_factory.mktemp("tiny-snapshot")
    tiny_model.model.save_pretrained(folder)
    tiny_model.tokenizer.save_pretrained(folder)
    return folder


def _info(files, gated=False, sizes=None):
    siblings = [SimpleNamespace(rfilename=f, size=(sizes or {}).get(f, 1000)) for f in files]
    return SimpleNamespace(siblings=siblings, gated=gated, sha="a" * 40)


def test_offline_and_not_cached_never_asks_the_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE is set"):
        load_model(REPO)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelLoadError, match=r"downloads are off \(--offline\)"):
        load_model(REPO, offline=True)


def test_no_network_is_named(monkeypatch):
    def unreachable(repo_id, revision, timeout):
        assert timeout <= 10  # connection attempts give up quickly
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "_hub_model_info", unreachable)
    with pytest.raises(ModelLoadError, match="Cannot reach the Hugging Face Hub.*Name or service not known"):
        load_model(REPO)


def test_unknown_repository(monkeypatch):
    def missing(repo_id, revision, timeout):
        raise _http_error(RepositoryNotFoundError, 404, "Repository Not Found")

    monkeypatch.setattr(hub, "_hub_model_info", missing)
    with pytest.raises(ModelLoadError, match=f"No model '{REPO}' on the Hugging Face Hub.*hf auth login"):
        load_model(REPO)


def test_gated_model_without_a_token_names_the_page_and_login(monkeypatch):
    monkeypatch.setattr(hub, "_hub_model_info", lambda *a: _info(["config.json", "model.safetensors"], "manual"))
    with pytest.raises(ModelLoadError) as err:
        load_model(REPO)
    assert f"https://huggingface.co/{REPO}" in str(err.value) and "`hf auth login`" in str(err.value)


def test_gated_model_with_a_token_but_no_access(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(hub, "_hub_model_info", lambda *a: _info(["config.json", "model.safetensors"], "auto"))

    def refused(repo_id, *, local_files_only, **kwargs):
        if local_files_only:
            return _not_cached(repo_id, local_files_only=True, **kwargs)
        raise _http_error(GatedRepoError, 403, "Access to model is restricted")

    monkeypatch.setattr(hub, "_hub_snapshot", refused)
    with pytest.raises(ModelLoadError, match="no access to it yet. Ask for access on https://huggingface.co/"):
        load_model(REPO)


def test_pickle_only_repository_is_refused(monkeypatch):
    monkeypatch.setattr(hub, "_hub_model_info", lambda *a: _info(["config.json", "pytorch_model.bin"]))
    with pytest.raises(ModelLoadError, match="no safetensors weights"):
        load_model(REPO)


def test_download_fetches_only_what_is_needed_reports_progress_and_is_cached(monkeypatch, tiny_folder,
                                                                            isolated_hub):
    files = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "pytorch_model.bin", "original/consolidated.00.pth", "README.md"]
    monkeypatch.setattr(hub, "_hub_model_info", lambda *a: _info(files, sizes={"model.safetensors": 4000}))
    calls = []

    def download(repo_id, *, revision, cache_dir, allow_patterns, local_files_only, tqdm_class=None):
        calls.append(dict(revision=revision, cache_dir=cache_dir, allow=allow_patterns, local=local_files_only))
        if local_files_only:
            return _not_cached(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns,
                               local_files_only=True)
        files_bar = tqdm_class(desc="Fetching 5 files", total=5)
        bytes_bar = tqdm_class(desc="Reconstructing (incomplete total...)", total=4000, unit="B")
        bytes_bar.update(4000)
        files_bar.update(5)
        return str(tiny_folder)

    monkeypatch.setattr(hub, "_hub_snapshot", download)
    seen = []
    loaded = load_model(REPO, progress=lambda stage, fraction, text: seen.append((stage, fraction, text)))
    assert loaded.n_layers == 4 and "Hugging Face cache" in loaded.source
    online = [c for c in calls if not c["local"]]
    assert len(online) == 1 and online[0]["revision"] == "a" * 40
    assert online[0]["cache_dir"] == isolated_hub / "hf" / "hub"  # HF_HOME honoured
    allow = online[0]["allow"]
    assert "model.safetensors" in allow and "config.json" in allow and "tokenizer.json" in allow
    assert not any(p.endswith((".bin", ".pth")) or p in ("*", "*.md") for p in allow)
    assert any(stage == "download" and fraction == 1.0 for stage, fraction, _ in seen)

    # a second load finds it in the cache and never asks the Hub
    monkeypatch.setattr(hub, "_hub_model_info", _no_network)
    monkeypatch.setattr(hub, "_hub_snapshot", lambda repo_id, **kw: str(tiny_folder))
    assert load_model(REPO, offline=True).fingerprint == loaded.fingerprint


def test_weight_patterns_prefer_transformers_names():
    mistral = ["consolidated.safetensors", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
               "model-00003-of-00003.safetensors", "model.safetensors.index.json", "params.json"]
    assert hub.weight_patterns(mistral) == mistral[1:5]
    assert hub.weight_patterns(["weights.safetensors", "sub/x.safetensors"]) == ["weights.safetensors"]
    assert hub.weight_patterns(["pytorch_model.bin"]) == []


def test_cli_messages_have_no_traceback(monkeypatch):
    runner = CliRunner()
    monkeypatch.setattr(hub, "_hub_model_info", lambda *a: (_ for _ in ()).throw(httpx2.ConnectTimeout("timed out")))
    r = runner.invoke(main, ["scan", "--model", REPO, "--text", "hi"])
    assert r.exit_code == 2 and "Cannot reach the Hugging Face Hub" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(main, ["scan", "--model", REPO, "--text", "hi", "--offline"])
    assert r.exit_code == 2 and "downloads are off (--offline)" in r.output


def test_progress_bars_run_inside_huggingface_hub_machinery():
    """The tqdm class we hand to snapshot_download works with huggingface_hub's own bar helpers (no network)."""
    import logging

    from huggingface_hub.utils.tqdm import _create_progress_bar, hf_thread_map

    seen = []
    Bar = hub._progress_bars(lambda *event: seen.append(event), REPO, total_bytes=100, n_files=2)
    written = _create_progress_bar(cls=Bar, log_level=logging.INFO, name="huggingface_hub.snapshot_download",
                                   desc="Reconstructing (incomplete total...)", total=100, initial=0, unit="B",
                                   unit_scale=True)
    hf_thread_map(lambda part: written.update(50), [1, 2], max_workers=2, tqdm_class=Bar, desc="Fetching 2 files")
    assert seen and all(stage == "download" and 0 <= fraction <= 1 for stage, fraction, _ in seen)
    assert "of 0.00 GiB" in seen[0][2]  # bytes against the repository's total
