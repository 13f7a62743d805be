"""Builds sharded over processes (torch.distributed, gloo on CPU) and resumed after a kill, through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from chunktui.cli import main

ROOT = Path(__file__).resolve().parents[2]
WORDS = "cheese,cake,dog,rain"


def chunktui_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "chunktui", *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def read_dict(path: Path) -> tuple[dict, list]:
    with safe_open(str(path), "pt") as fh:
        header = json.loads(fh.metadata()["chunktui"])
    return load_file(str(path)), header["chunks"]


def assert_same_file(a: Path, b: Path) -> None:
    ta, ca = read_dict(a)
    tb, cb = read_dict(b)
    assert ta.keys() == tb.keys() and len(ta) > 10
    for key in ta:
        assert torch.equal(ta[key], tb[key]) or (ta[key].isnan() == tb[key].isnan()).all() and torch.equal(
            ta[key].nan_to_num(), tb[key].nan_to_num()), key
    assert ca == cb  # thresholds, tolerances, fit counts


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, tiny_corpus):
    path = tmp_path_factory.mktemp("c") / "corpus.txt"
    path.write_text(tiny_corpus)
    return path


@pytest.mark.parametrize("criterion", ["accuracy", "fp-budget:0.002"])
def test_two_gloo_processes_equal_one(tmp_path, corpus_file, criterion):
    common = ["build", "--model", "random:llama-tiny", "--device", "cpu", "--corpus", str(corpus_file),
              "--words", WORDS, "--criterion", criterion, "--batch-size", "8"]
    one, two = tmp_path / "one.chunks.safetensors", tmp_path / "two.chunks.safetensors"
    r = CliRunner().invoke(main, [*common, "--out", str(one)])
    assert r.exit_code == 0, r.output
    summary = tmp_path / "two.json"
    p = subprocess.run(chunktui_cmd(*common, "--procs", "2", "--out", str(two), "--json", str(summary)),
                       env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_file(one, two)
    record = json.loads(summary.read_text())
    assert record["world_size"] == 2 and record["tokens"] > 1000 and record["peak_memory_bytes"]["rss"] > 0
    assert record["seconds"] > 0
    assert not (tmp_path / "two.chunks.safetensors.partial").exists()


def test_kill_and_resume_gives_the_identical_dictionary(tmp_path, corpus_file):
    common = ["build", "--model", "random:llama-tiny", "--device", "cpu", "--corpus", str(corpus_file),
              "--words", WORDS, "--batch-size", "1", "--checkpoint-every", "3"]
    fresh, killed = tmp_path / "fresh.chunks.safetensors", tmp_path / "killed.chunks.safetensors"
    r = CliRunner().invoke(main, [*common, "--out", str(fresh)])
    assert r.exit_code == 0, r.output
    proc = subprocess.Popen(chunktui_cmd(*common, "--out", str(killed)), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    meta = tmp_path / "killed.chunks.safetensors.partial" / "rank0.json"
    try:
        while proc.poll() is None and not meta.exists():
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    assert not killed.exists()
    done = json.loads(meta.read_text())["batches_done"]
    assert done > 0
    summary = tmp_path / "resumed.json"
    r = CliRunner().invoke(main, [*common, "--out", str(killed), "--resume", "--json", str(summary)])
    assert r.exit_code == 0, r.output
    assert json.loads(summary.read_text())["resumed_batches"] >= done
    assert_same_file(fresh, killed)
    assert not meta.parent.exists()


@pytest.mark.parametrize("extra, message", [
    (["--procs", "0"], "--procs must be at least 1"),
    (["--criterion", "fp-budget:2"], "below 1"),
    (["--criterion", "recall"], "Unknown criterion"),
    (["--n", "0"], "--n must be at least 1"),
    (["--checkpoint-every", "0"], "at least 1 context"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_build_bad_options(tmp_path, corpus_file, extra, message):
    r = CliRunner().invoke(main, ["build", "--model", "random:llama-tiny", "--corpus", str(corpus_file), "--words",
                                  WORDS, "--out", str(tmp_path / "x.chunks.safetensors"), *extra])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.chunks.safetensors").exists()


def test_build_refuses_to_overwrite_its_input(tmp_path, tiny_corpus):
    corpus = tmp_path / "c.chunks.safetensors"
    corpus.write_text(tiny_corpus)
    r = CliRunner().invoke(main, ["build", "--model", "random:llama-tiny", "--corpus", str(corpus), "--words", WORDS,
                                  "--out", str(corpus)])
    assert r.exit_code == 2 and "also an input" in r.output
    assert corpus.read_text() == tiny_corpus
