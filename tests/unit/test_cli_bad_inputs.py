"""Every CLI command on bad input: exit code 2, a specific message, no traceback, and no file changed or created.

One table, one test: each row is a command line (placeholders in braces are
files in a fresh folder) and a pattern its message must match. The folder is
hashed before and after: every input stays byte-identical and nothing new
appears (no partial output, no stray temp file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest
from click.testing import CliRunner

from chunktui.cli import main

M = ["--model", "random:llama-tiny"]
LONG = " ".join(["cheese"] * 700)  # over random:llama-tiny's 512-token context

CASES = [
    # build: outputs
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--out", "{dict}"], "already exists.*--overwrite"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--out", "{corpus}"], "also an input"),
    (["build", *M, "--corpus", "{corpus}", "--words", "@{words}", "--out", "{words}", "--overwrite"], "also an input"),
    (["build", *M, "--corpus", "{corpus_link}", "--words", "cheese", "--out", "{corpus}", "--overwrite"],
     "also an input"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--out", "{folder}"], "is a folder|is a directory"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--out", "{blocker}/x.chunks.safetensors"],
     "Could not write.*is a file, not a folder"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--out", "{tmp}/x.json"],
     "must end in .chunks.safetensors"),
    # build: numbers and ranges
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--n", "0", "--out", "{new}"], "--n must be at least 1"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--layers", "3-1", "--out", "{new}"], "low-high"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--layers", "1-9", "--out", "{new}"], "out of range"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--min-count", "-1", "--out", "{new}"],
     "at least 1"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--batch-size", "0", "--out", "{new}"],
     "at least 1"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--step", "-2", "--out", "{new}"], "at least 0"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--seed", "-1", "--out", "{new}"], "between 0 and"),
    (["build", *M, "--corpus", "{corpus}", "--words", ",", "--out", "{new}"], "names no words"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--layers", "", "--out", "{new}"], "is empty"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--layers", "1,,2", "--out", "{new}"],
     "Bad layer spec"),
    (["build", *M, "--corpus", "{vector}", "--words", "cheese", "--out", "{new}"], "not UTF-8"),
    (["build", *M, "--spans", "{bad_spans}", "--out", "{new}"], r"spans\.jsonl:1"),
    # evaluate
    (["evaluate", *M, "--dict", "{dict}", "--corpus", "{corpus}", "--json", "{dict}"], "also an input"),
    (["evaluate", *M, "--dict", "{dict}", "--corpus", "{corpus}", "--json", "{dict_link}", "--overwrite"],
     "also an input"),
    (["evaluate", *M, "--dict", "{dict}", "--corpus", "{corpus}", "--json", "{corpus_hardlink}", "--overwrite"],
     "also an input"),
    (["evaluate", *M, "--dict", "{dict}", "--corpus", "{corpus}", "--json", "{report_in}"], "already exists"),
    (["evaluate", *M, "--dict", "{dict}", "--corpus", "{corpus}", "--batch-size", "0"], "at least 1"),
    # scan
    (["scan", *M, "--dict", "{dict}", "--text", "x", "--temperature", "nan"], "finite"),
    (["scan", *M, "--dict", "{dict}", "--prompt", "x", "--top-p", "0"], "greater than 0"),
    (["scan", *M, "--dict", "{dict}", "--prompt", "x", "--top-p", "1.5"], "at most 1"),
    (["scan", *M, "--dict", "{dict}", "--prompt", "x", "--temperature", "-1"], "at least 0"),
    (["scan", *M, "--dict", "{dict}", "--prompt", "x", "--generate", "0"], "between 1 and"),
    (["scan", *M, "--dict", "{dict}", "--prompt", "x", "--seed", "inf"], "whole number|not a valid integer"),
    (["scan", *M, "--dict", "{dict}", "--file", "{corpus}", "--json", "{corpus}", "--overwrite"], "also an input"),
    (["scan", *M, "--dict", "{dict}", "--text", "  "], "empty"),
    (["scan", *M, "--dict", "{dict}", "--prompt", " "], "empty"),
    (["scan", *M, "--dict", "{dict}", "--text", "x", "--layers", "a-b"], "Bad layer spec"),
    (["scan", *M, "--dict", "{dict}", "--text", LONG], "one scan reads at most 512"),
    (["scan", *M, "--dict", "{dict}", "--prompt", LONG, "--no-chat"], "context.*--truncate"),
    (["scan", *M, "--dict", "{dict}", "--prompt", "x", "--generate", "600", "--no-chat"], "context of 512"),
    (["scan", "--model", "{bad_gguf}", "--text", "x"], "GGUF magic"),
    (["scan", *M, "--dict", "{corpus}", "--text", "x"], "damaged or not a safetensors file"),
    (["scan", *M, "--device", ":x:", "--text", "x"], "Unknown device ':x:'"),
    (["scan", "--model", "[red]x[/red]", "--text", "x"], r"hf download \[red\]x\[/red\]"),
    (["scan", *M, "--dict", "{dict}", "--text", "x", "--json", "{tmp}/:x: [b]/"], r"\[b\].* is a folder"),
    # perturb
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--strength", "nan"], "finite"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--strength", "-1"],
     "greater than 0"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--mode", "freeze", "--strength", "2"],
     "at most 1"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--samples", "0"], "between 1 and"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--max-new-tokens", "0"],
     "between 1 and"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--top-p", "inf"], "finite"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--temperature", "inf"], "finite"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompts", "{prompts}", "--limit", "-1"],
     "at least 0"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--batch-size", "0"], "at least 1"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--layers", "4"],
     "final norm and cannot be edited"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--layers", "3-1"], "low-high"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--positions", "prompt-last:0"],
     "Bad positions"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompts", "{prompts}", "--json", "{prompts}",
      "--overwrite"], "also an input"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompts", "{empty}"], "is empty"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompts", "{comments}"], "holds no prompts"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "[x]", "--prompt", "x", "--layers", "1"], r"No chunk named '\[x\]'"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", ",", "--prompt", "x"], "Name at least one chunk"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", LONG, "--no-chat", "--layers", "1"],
     "context"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--json", "{folder}"], "is a folder|is a directory"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--seed", "2147483647", "--samples",
      "2"], "largest seed"),
    # top
    (["top", *M, "--dict", "{dict}", "--chunk", "cheese", "--corpus", "{corpus}", "--json", "{corpus}", "--overwrite"],
     "also an input"),
    (["top", *M, "--dict", "{dict}", "--chunk", "cheese", "--corpus", "{corpus}", "--json", "{report_in}"],
     "already exists"),
    (["top", *M, "--dict", "{dict}", "--chunk", "cheese", "--corpus", "{corpus}", "--k", "0"], "at least 1"),
    (["top", *M, "--dict", "{dict}", "--chunk", "cheese", "--corpus", "{corpus}", "--layer", "3-1"], "low-high"),
    (["top", *M, "--dict", "{dict}", "--chunk", "cheese", "--corpus", "{corpus}", "--layer", "1-99"], "out of range"),
    (["top", *M, "--dict", "{dict}", "--chunk", "zebra", "--corpus", "{corpus}"], "neither a label nor a chunk id"),
    (["top", *M, "--dict", "{dict}", "--chunk", "cheese", "--corpus", "{vector}"], "not UTF-8"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--sweep", "0.1,,0.2"],
     "separated by commas"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--mode", "suppress", "--sweep",
      "0.5,2"], "at most 1"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--sweep", "0.1,0.1"], "each strength once"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--sweep", "0.1,0.2", "--strength",
      "0.3"], "not both"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--control", "shuffle"],
     "Invalid value for '--control'"),
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompts", "{noprompt}"], "noprompt.jsonl:1: expected an object with a \"prompt\""),
    # report
    (["report", "{report_in}", "--out", "{report_in}", "--overwrite"], "also an input"),
    (["report", "{report_in}", "--out", "{corpus}"], "already exists"),
    (["report", "{corpus}", "--out", "{tmp}/r.html"], "not valid JSON"),
    # discover and import
    (["discover", *M, "--corpus", "{corpus}", "--k", "0", "--out", "{new}"], "at least 1"),
    (["discover", *M, "--corpus", "{corpus}", "--lr", "0", "--out", "{new}"], "greater than 0"),
    (["discover", *M, "--corpus", "{corpus}", "--lr", "nan", "--out", "{new}"], "finite"),
    (["discover", *M, "--corpus", "{corpus}", "--quantile", "1", "--out", "{new}"], "less than 1"),
    (["discover", *M, "--corpus", "{corpus}", "--out", "{dict}"], "already exists.*--append"),
    (["discover", *M, "--corpus", "{corpus}", "--layers", "1", "--k", "100000", "--out", "{new}"],
     "more chunks than the corpus has tokens"),
    (["discover", *M, "--corpus", "{corpus}", "--out", "{new}", "--json", "{new}"], "same file"),
    (["discover", *M, "--corpus", "{corpus}", "--out", "{dict}", "--append", "--overwrite"], "at most one"),
    (["discover", *M, "--corpus", "{corpus}", "--out", "{corpus}", "--append"], "also an input"),
    (["import", *M, "{vector}", "--out", "{dict}"], "already exists.*--append"),
    (["import", *M, "{vector}", "--out", "{vector}", "--overwrite"], "also an input"),
    (["import", *M, "{vector}", "--match-rate", "0", "--out", "{new}"], "greater than 0"),
    (["import", *M, "{vector}", "--threshold", "2", "--out", "{new}"], "at most 1"),
    (["import", *M, "{vector}", "--layer", "-1", "--out", "{new}"], "at least 0"),
    (["import", *M, "{vector}", "--layer", "9", "--out", "{new}"], "out of range"),
    # the RNN lab
    (["rnn", "train", "--steps", "0"], "between 1 and"),
    (["rnn", "train", "--json", "{report_in}"], "already exists"),
    (["rnn", "reflect", "--seeds", "0"], "between 1 and"),
    (["rnn", "reflect", "--gain", "nan"], "finite"),
    (["rnn", "reflect", "--k", "1"], "between 2 and"),
    (["rnn", "transfer", "--threshold", "0"], "greater than 0"),
    (["rnn", "graft", "--json", "{folder}"], "is a folder|is a directory"),
    # the app's options (checked before it opens)
    (["tui", "--threads", "-1"], "between 0 and"),
]


def _snapshot(root) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for name in files + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
            else:
                with open(path, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
        for d in dirnames:
            out.setdefault(os.path.relpath(os.path.join(dirpath, d), root) + "/", "dir")
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dict, tiny_corpus):
    import numpy as np

    root = tmp_path_factory.mktemp("bad")
    _, dict_path = tiny_dict
    shutil.copy(dict_path, root / "d.chunks.safetensors")
    (root / "corpus.txt").write_text(tiny_corpus)
    os.symlink(root / "corpus.txt", root / "corpus-link.txt")
    os.link(root / "corpus.txt", root / "corpus-hard.json")
    os.symlink(root / "d.chunks.safetensors", root / "dict-link.json")
    (root / "words.chunks.safetensors").write_text("cheese\ndog\n")
    (root / "prompts.txt").write_text("I like\nThe dog\n")
    (root / "comments.txt").write_text("# only a comment\n")
    (root / "empty.txt").write_text("\n")
    (root / "spans.jsonl").write_text('{"text": "a b", "spans": [[0, 3]]}\n')
    (root / "noprompt.jsonl").write_text('{"concept": "cheese"}\n')
    (root / "session.json").write_text(json.dumps({  # what `perturb --json` writes, cut down
        "settings": {"seed": 0}, "intervention": {"mode": "graft", "strength": 1.0, "positions": "prompt",
                                                  "layers": [1], "labels": ["cheese"]},
        "concepts": {}, "pairs": [{"prompt": "Q?", "seed": 0, "control": "a", "perturbed": "b", "diff": []}]}))
    (root / "blocker").write_text("x")
    (root / "folder").mkdir()
    (root / "bad.gguf").write_bytes(b"\x00" * 64)
    np.save(root / "vec.npy", np.ones(64, dtype=np.float32))
    return root


def _fill(arg: str, root) -> str:
    subs = {"{corpus}": "corpus.txt", "{corpus_link}": "corpus-link.txt", "{corpus_hardlink}": "corpus-hard.json",
            "{dict}": "d.chunks.safetensors", "{dict_link}": "dict-link.json", "{words}": "words.chunks.safetensors",
            "{prompts}": "prompts.txt", "{comments}": "comments.txt", "{empty}": "empty.txt",
            "{noprompt}": "noprompt.jsonl",
            "{bad_spans}": "spans.jsonl", "{report_in}": "session.json", "{blocker}": "blocker",
            "{folder}": "folder", "{bad_gguf}": "bad.gguf", "{vector}": "vec.npy", "{new}": "new.chunks.safetensors",
            "{tmp}": ""}
    for key, name in subs.items():
        if key in arg:
            arg = arg.replace(key, str(root / name) if name else str(root))
    return arg


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:1] + a[-2:])[:60] for a, _ in CASES])
def test_bad_input_exits_2_with_a_message_and_changes_nothing(files, args, message):
    before = _snapshot(files)
    result = CliRunner().invoke(main, [_fill(a, files) for a in args])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert re.search(message, text), result.output
    assert _snapshot(files) == before


def test_overwrite_replaces_and_truncate_fits(files, tmp_path):
    """The other side of the table: --overwrite replaces an output, --truncate runs a long prompt."""
    out = tmp_path / "scan.json"
    out.write_text("old")
    args = ["scan", *M, "--dict", str(files / "d.chunks.safetensors"), "--prompt", LONG, "--no-chat",
            "--generate", "3", "--truncate", "--json", str(out), "--overwrite"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "cut by its first" in " ".join(result.output.split())
    doc = json.loads(out.read_text())
    assert len(doc["tokens"]) <= 512 and sum(doc["generated"]) == 3


def test_build_records_the_full_command_and_says_when_it_windows(files, tmp_path):
    from chunktui.engine.dictionary import load_dictionary

    corpus = tmp_path / "long.txt"
    corpus.write_text(" ".join(["the cheese and the dog"] * 300) + ".\n" + (files / "corpus.txt").read_text())
    out = tmp_path / "w.chunks.safetensors"
    args = ["build", *M, "--corpus", str(corpus), "--words", "cheese,dog", "--min-count", "3", "--layers", "1-2",
            "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "read in overlapping windows" in " ".join(result.output.split())
    command = load_dictionary(out).notes["command"]
    assert command.startswith("chunktui build") and "--words cheese,dog" in command and "--min-count 3" in command
    # the recorded command reruns (to another file: the first one is not replaced without --overwrite)
    import shlex

    rerun = shlex.split(command)[1:]
    rerun[rerun.index("--out") + 1] = str(tmp_path / "again.chunks.safetensors")
    result = CliRunner().invoke(main, rerun)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again.chunks.safetensors").read_bytes() == out.read_bytes() or \
        load_dictionary(tmp_path / "again.chunks.safetensors").notes["corpus_digest"] == \
        load_dictionary(out).notes["corpus_digest"]
