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
    # issue 21: dictionary headers with wrong types or values (inspect and scan read every field)
    *[(["inspect", "{bad_dict_%s}" % name], message) for name, message in [
        ("fit_list", "'fit' must be a JSON object or null, not a list"),
        ("fit_str", "'fit' must be a JSON object or null, not the text"),
        ("tolerance_str", "'tolerance' must be a number or null"),
        ("notes_list", "'notes' must be a JSON object or null"),
        ("layer_true", "'layer' must be a whole number, not True"),
        ("threshold_true", "'threshold' must be a number, not True"),
        ("version_0", "format version 0 is not a version"),
        ("version_str", "format version must be a whole number, not '1'"),
        ("label_null", "'label' must be text, not None"),
        ("label_empty", "'label' is empty"),
        ("label_list", "'label' must be text, not a list"),
        ("dup_neurons", "names a neuron more than once"),
        ("step_neg", "'step' must be at least 0"),
        ("deep", "nested too deeply"),
        ("fit_rate_str", "value 'tp_rate' must be a number"),
    ]],
    (["scan", *M, "--dict", "{bad_dict_fingerprint_null}", "--text", "x"], "weights"),
    # spans
    (["build", *M, "--spans", "{spans_number}", "--out", "{new}"], r"\"spans\" must be a list"),
    (["build", *M, "--spans", "{spans_latin1}", "--out", "{new}"], "not UTF-8 text: .* at line 1, byte"),
    (["build", *M, "--spans", "{spans_deep}", "--out", "{new}"], "nested too deeply"),
    (["build", *M, "--spans", "{spans_surrogate}", "--out", "{new}"], "lone surrogate"),
    (["build", *M, "--spans", "{spans_reversed}", "--out", "{new}"], "reversed or empty"),
    (["build", *M, "--spans", "{spans_long}", "--out", "{new}"], "longest line read is 4 MiB"),
    (["build", *M, "--spans", "{fifo}", "--out", "{new}"], "FIFO"),
    (["build", *M, "--spans", "{loop}", "--out", "{new}"], "symbolic link loop"),
    (["build", *M, "--corpus", "/dev/zero", "--words", "cheese", "--out", "{new}"], "character device"),
    (["build", *M, "--corpus", "-", "--words", "cheese", "--out", "{new}"], "standard input"),
    (["build", *M, "--corpus", "{folder}", "--words", "cheese", "--out", "{new}"], "is a folder|is a directory"),
    (["build", *M, "--corpus", "{corpus}", "--words", "che\udcffese", "--out", "{new}"], "not UTF-8"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--layers", "-99", "--out", "{new}"],
     r"Layers \[-99\] out of range"),
    (["build", "--model", "", "--corpus", "{corpus}", "--words", "cheese", "--out", "{new}"], "model spec is empty"),
    # report inputs
    (["report", "{report_deep}", "--out", "{tmp}/r.html"], "nested too deeply"),
    (["report", "{report_no_intervention}", "--out", "{tmp}/r.html"], "lacks 'intervention'"),
    (["report", "{report_string_number}", "--out", "{tmp}/r.html"], "'strength' is not a number"),
    (["report", "{fifo}", "--out", "{tmp}/r.html"], "FIFO"),
    (["report", "{loop}", "--out", "{tmp}/r.html"], "symbolic link loop"),
    (["report", "{report_in}", "--out", "/dev/stdout", "--overwrite"], "system path"),
    (["report", "{report_in}", "--out", "{dev_link}", "--overwrite"], "system path"),
    # import
    (["import", *M, "{npy_f128}", "--layer", "1", "--out", "{new}"], "floating point .* got float128"),
    (["import", *M, "{npy_huge}", "--layer", "1", "--out", "{new}"], "largest array imported"),
    (["import", *M, "{npz}", "--layer", "1", "--out", "{new}"], "are not read"),
    (["import", *M, "{npz_as_npy}", "--layer", "1", "--out", "{new}"], "zip archive"),
    (["import", *M, "{st_negative_layer}", "--out", "{new}"], "names layer -1"),
    (["build", *M, "--corpus", "{corpus}", "--words", "cheese", "--out", "{blocker_out}"],
     "partial exists and is not a folder"),
    # options with upper bounds
    (["perturb", *M, "--dict", "{dict}", "--chunk", "cheese", "--prompt", "x", "--positions",
      "prompt-last:1000000000000"], "K is at most"),
    (["discover", *M, "--corpus", "{corpus}", "--steps", "1000000000000", "--out", "{new}"], "between 1 and 100000"),
]


def _snapshot(root) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for name in files + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
            elif not os.path.isfile(path):
                out[rel] = "special"  # the FIFO: reading it would wait for a writer
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
    (root / "b.chunks.safetensors.partial").write_text("x")  # where build keeps checkpoints: a file, not a folder
    (root / "folder").mkdir()
    (root / "bad.gguf").write_bytes(b"\x00" * 64)
    np.save(root / "vec.npy", np.ones(64, dtype=np.float32))
    _issue21_files(root, dict_path)
    return root


def _rewrite_dict(src, dst, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as fh:
        meta = json.loads(fh.metadata()["chunktui"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    edit(meta, tensors)
    save_file(tensors, str(dst), metadata={"chunktui": json.dumps(meta)})


def _issue21_files(root, dict_path):
    import numpy as np
    import torch

    def chunk0(key, value):
        def edit(meta, tensors):
            meta["chunks"][0][key] = value
        return edit

    def top(key, value):
        def edit(meta, tensors):
            meta[key] = value
        return edit

    def dup_neurons(meta, tensors):
        key = meta["chunks"][0]["tensors"]["neurons"]
        n = tensors[key].numel()
        tensors[key] = torch.zeros(n, dtype=tensors[key].dtype)

    def fingerprint_null(meta, tensors):
        meta["model"]["fingerprint"] = None

    def deep(meta, tensors):
        meta["notes"] = json.loads("[" * 200 + "]" * 200)

    def fit_rate_str(meta, tensors):
        meta["chunks"][0]["fit"]["tp_rate"] = "high"

    edits = {"fit_list": chunk0("fit", [1, 2]), "fit_str": chunk0("fit", "good"), "tolerance_str": chunk0("tolerance", "x"),
             "notes_list": top("notes", ["a"]), "layer_true": chunk0("layer", True),
             "threshold_true": chunk0("threshold", True), "version_0": top("version", 0),
             "version_str": top("version", "1"), "label_null": chunk0("label", None), "label_empty": chunk0("label", ""),
             "label_list": chunk0("label", ["a"]), "dup_neurons": dup_neurons, "step_neg": chunk0("step", -3),
             "fingerprint_null": fingerprint_null, "deep": deep, "fit_rate_str": fit_rate_str}
    for name, edit in edits.items():
        _rewrite_dict(dict_path, root / f"bad-{name}.chunks.safetensors", edit)
    (root / "spans-number.jsonl").write_text('{"text": "a b", "spans": 3}\n')
    (root / "spans-latin1.jsonl").write_bytes(b'{"text": "caf\xe9", "spans": []}\n')
    (root / "spans-deep.jsonl").write_text('{"text": "a", "spans": ' + "[" * 5000 + "]" * 5000 + "}\n")
    (root / "spans-surrogate.jsonl").write_text('{"text": "a \\ud800 b", "spans": [[0, 1, "a"]]}\n')
    (root / "spans-reversed.jsonl").write_text('{"text": "a cheese b", "spans": [[8, 2, "cheese"]]}\n')
    (root / "spans-long.jsonl").write_text('{"text": "' + "a" * (5 * 2**20) + '"}')
    os.mkfifo(root / "fifo.jsonl")
    os.symlink(root / "loop-b.json", root / "loop-a.json")
    os.symlink(root / "loop-a.json", root / "loop-b.json")
    os.symlink("/dev/stdout", root / "dev-link.html")
    run = {"intervention": {"mode": "graft", "strength": 1.0, "positions": "prompt", "layers": [1], "labels": ["a"]},
           "concepts": {}, "pairs": []}
    (root / "report-deep.json").write_text('{"tokens": ' + "[" * 3000 + "]" * 3000 + "}")
    (root / "report-nointervention.json").write_text(json.dumps({"concepts": {}, "pairs": []}))
    bad = json.loads(json.dumps(run))
    bad["intervention"]["strength"] = "1"
    (root / "report-stringnumber.json").write_text(json.dumps(bad))
    with open(root / "f128.npy", "wb") as fh:  # a float128 header (written by hand: not every numpy has it)
        from numpy.lib import format as npformat

        npformat.write_array_header_1_0(fh, {"descr": "<f16", "fortran_order": False, "shape": (64,)})
        fh.write(b"\0" * 16 * 64)
    with open(root / "huge.npy", "wb") as fh:
        from numpy.lib import format as npformat

        npformat.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    np.savez(root / "arr.npz", a=np.ones(64, dtype=np.float32))
    os.link(root / "arr.npz", root / "zip.npy")
    from safetensors.torch import save_file

    save_file({"layer.-1": torch.ones(64)}, str(root / "neg.safetensors"))


def _fill(arg: str, root) -> str:
    subs = {"{corpus}": "corpus.txt", "{corpus_link}": "corpus-link.txt", "{corpus_hardlink}": "corpus-hard.json",
            "{dict}": "d.chunks.safetensors", "{dict_link}": "dict-link.json", "{words}": "words.chunks.safetensors",
            "{prompts}": "prompts.txt", "{comments}": "comments.txt", "{empty}": "empty.txt",
            "{noprompt}": "noprompt.jsonl",
            "{bad_spans}": "spans.jsonl", "{report_in}": "session.json", "{blocker}": "blocker",
            "{folder}": "folder", "{bad_gguf}": "bad.gguf", "{vector}": "vec.npy", "{new}": "new.chunks.safetensors",
            "{tmp}": "", "{spans_number}": "spans-number.jsonl", "{spans_latin1}": "spans-latin1.jsonl",
            "{spans_deep}": "spans-deep.jsonl", "{spans_surrogate}": "spans-surrogate.jsonl",
            "{spans_reversed}": "spans-reversed.jsonl", "{spans_long}": "spans-long.jsonl", "{fifo}": "fifo.jsonl",
            "{loop}": "loop-a.json", "{dev_link}": "dev-link.html", "{report_deep}": "report-deep.json",
            "{report_no_intervention}": "report-nointervention.json",
            "{report_string_number}": "report-stringnumber.json", "{npy_f128}": "f128.npy", "{npy_huge}": "huge.npy",
            "{npz}": "arr.npz", "{npz_as_npy}": "zip.npy", "{st_negative_layer}": "neg.safetensors",
            "{blocker_out}": "b.chunks.safetensors"}
    for key in re.findall(r"\{bad_dict_(\w+)\}", arg):
        arg = arg.replace("{bad_dict_%s}" % key, str(root / f"bad-{key}.chunks.safetensors"))
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


def test_duplicate_words_are_merged_with_a_note(files, tmp_path):
    from chunktui.engine.dictionary import load_dictionary

    out = tmp_path / "dup.chunks.safetensors"
    args = ["build", *M, "--corpus", str(files / "corpus.txt"), "--words", "cheese,cheese,Cheese", "--layers", "1",
            "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "merged duplicate words: cheese (same as cheese), Cheese (same as cheese)" in text
    assert load_dictionary(out).labels() == ["cheese"]


def test_cli_output_of_hostile_text_holds_no_escape_byte(files, tmp_path):
    """A prompt, a text and a chunk name full of terminal escapes: whatever the CLI prints shows them as symbols."""
    hostile = "x \x1b[2J\x1b]52;c;aGk=\x07 \x9b31m \u202e"
    for args in (["scan", *M, "--dict", str(files / "d.chunks.safetensors"), "--text", "cheese " + hostile],
                 ["perturb", *M, "--dict", str(files / "d.chunks.safetensors"), "--chunk", hostile, "--prompt", "x"],
                 ["scan", *M, "--dict", str(files / "d.chunks.safetensors"), "--prompt", hostile, "--generate", "2",
                  "--no-chat"]):
        result = CliRunner().invoke(main, args)
        assert "\x1b" not in result.output and "\x07" not in result.output and "\u202e" not in result.output
        assert "\x9b" not in result.output
        assert "Traceback" not in result.output


def test_scan_summary_and_legend_agree_with_a_huge_threshold(files, tmp_path):
    def huge(meta, tensors):
        for rec in meta["chunks"]:
            rec["threshold"] = 1e308

    path = tmp_path / "huge.chunks.safetensors"
    _rewrite_dict(files / "d.chunks.safetensors", path, huge)
    result = CliRunner().invoke(main, ["scan", *M, "--dict", str(path), "--text", "the cheese and the dog"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    hits = int(re.search(r"\((\d+) with some raw match", text).group(1))
    assert not (hits > 0 and "no chunk matched" in text), text
