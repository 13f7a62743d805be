"""The streaming build at scale: peak memory, speed against a plain forward pass, 1 process against 2.

Generates a corpus of about --tokens tokens from the sample text (the
training and held-out paragraphs' sentences, shuffled and repeated with a
seed), then:

1. builds a dictionary of --words concepts at every layer in a subprocess
   (`python -m chunktui build --json`), which reports its own peak RSS;
2. runs a plain forward pass over the same contexts, in the same batches, with
   the hidden states recorded and dropped (the baseline, in this process),
   before and after the build, and prints build tokens/s against their mean
   (target: ratio >= 0.8), and how pass 2's screen decided: the share of
   (layer, token) pairs its float32 matmuls left to the float64 expansion and
   of (concept, token) pairs left to the float64 reference row by row (ties);
   with --baseline-tree DIR it also builds with the code of another checkout
   in between and checks the dictionaries are byte-identical in their tensors;
3. builds again with `--procs 2` and prints the wall times side by side.

    python benchmarks/pa_scale.py [--tokens 100000] [--words 30] [--no-procs] [--baseline-tree DIR] [--repeats N]

With --repeats N the build (and the baseline build) runs N times, each between two plain forwards, and
the ratios are printed per repeat with their median, lowest and highest: on a noisy machine two builds of
the same code in one run differ by several hundredths.

The state matrix the in-memory build would hold is printed for comparison:
tokens x layers x width x 4 bytes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(tokenizer, target: int, seed: int = 0) -> str:
    from chunktui.engine.corpus import split_sentences

    text = "\n".join((ROOT / "sample_data" / name).read_text(encoding="utf-8") for name in ("train.txt", "heldout.txt"))
    sentences = [text[a:b] for a, b in split_sentences(text)]
    lengths = [len(ids) for ids in tokenizer(sentences, add_special_tokens=False)["input_ids"]]
    rng = random.Random(seed)
    order, total, lines = list(range(len(sentences))), 0, []
    while total < target:
        rng.shuffle(order)
        para = []
        for i in order:
            para.append(sentences[i])
            total += lengths[i]
            if len(para) == 8:
                lines.append(" ".join(para))
                para = []
            if total >= target:
                break
        if para:
            lines.append(" ".join(para))
    return "\n".join(lines) + "\n"


def byte_identical(a: dict, b: dict) -> bool:
    """Two dictionaries' tensors (safetensors `load_file`): the same names, dtypes and bytes."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes()
                                        for k in a)


@click.command()
@click.option("--model", default="smollm2-135m")
@click.option("--tokens", default=100_000, show_default=True)
@click.option("--words", "n_words", default=30, show_default=True, help="the first N concepts of concepts.txt")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--procs/--no-procs", "compare_procs", default=True, help="also build with --procs 2")
@click.option("--baseline-tree", default=None, type=click.Path(file_okay=False, exists=True),
              help="also build with the code of another checkout (e.g. the commit before a change), interleaved "
                   "with this one, and check the two dictionaries are byte-identical in their tensors")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(1, 20),
              help="builds (and baseline builds) per run, each between two plain forwards")
@click.option("--json", "json_out", default=None)
@click.option("--overwrite", is_flag=True, help="replace an existing --json file")
def main(model, tokens, n_words, batch_size, compare_procs, baseline_tree, repeats, json_out, overwrite):
    from chunktui.engine.allocator import keep_freed_memory
    from chunktui.engine.corpus import prepare_corpus, run_batch, schedule
    from chunktui.engine.labels import read_word_list
    from chunktui.engine.models import load_model

    from chunktui.cli.common import plan_outputs
    from chunktui.shared.outputs import OutputError

    try:  # refused before minutes of work
        target = plan_outputs(("--json", json_out, None), overwrite=overwrite)
    except OutputError as err:
        raise click.UsageError(str(err)) from None
    words = read_word_list(str(ROOT / "sample_data" / "concepts.txt"))[:n_words]
    words = [w + "*" if w == "cheesecake" else w for w in words]
    loaded = load_model(model)
    keep_freed_memory()  # the baseline forward runs with the allocator setting the build's corpus jobs use
    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="pa_scale."))
    corpus_path = work / "corpus.txt"
    text = make_corpus(loaded.tokenizer, tokens)
    corpus_path.write_text(text, encoding="utf-8")
    corpus = prepare_corpus(loaded.tokenizer, text)
    T, S, d = len(corpus.tokens), loaded.layout.n_states, loaded.hidden_size
    print(f"model {loaded.name}: corpus of {T} tokens in {len(corpus.rows)} sentences ({corpus_path}), "
          f"{len(words)} words x {S} layers, batch {batch_size}, {threads} threads, {os.cpu_count()} cores")
    print(f"the state matrix an in-memory build would hold: {T * S * d * 4 / 2**30:.2f} GiB (float32)")
    out = {"tokens": T, "words": len(words), "layers": S, "threads": threads,
           "state_matrix_bytes": T * S * d * 4}

    def forward() -> float:
        # the baseline: the same contexts, the same batches, states recorded and dropped
        layers = list(range(S))
        t0 = time.perf_counter()
        for batch in schedule(corpus, batch_size):
            run_batch(loaded, corpus, batch, layers)
        return time.perf_counter() - t0

    def build(procs: int, name: str, tree: Path = ROOT) -> dict:
        summary = work / f"{name}.json"
        cmd = [sys.executable, "-m", "chunktui", "build", "--model", model, "--corpus", str(corpus_path),
               "--words", ",".join(words), "--batch-size", str(batch_size), "--procs", str(procs),
               "--out", str(work / f"{name}.chunks.safetensors"), "--json", str(summary)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
        t0 = time.perf_counter()
        # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
        if subprocess.run(cmd, env=env, cwd=str(tree)).returncode != 0:
            raise click.ClickException(f"the build ({name}) failed: its message is above")
        wall = time.perf_counter() - t0
        record = json.loads(summary.read_text())
        record["wall_seconds"] = wall
        return record

    # interleaved, so a change in the machine's load shows as spread rather than as a speed-up:
    # forward, build (this code), [build (baseline code)], forward
    forwards = [forward()]
    runs = []  # per repeat: (this code's build, the baseline's or None, the forward before, the forward after)
    for r in range(repeats):
        one = build(1, "one" if r == 0 else f"one{r}")
        base = build(1, "base" if r == 0 else f"base{r}", Path(baseline_tree).resolve()) if baseline_tree else None
        forwards.append(forward())
        runs.append((one, base, forwards[-2], forwards[-1]))
    one, base = runs[0][0], runs[0][1]
    out["build_1"] = one
    if baseline_tree:
        out["build_baseline"] = base
    rss = one["peak_memory_bytes"]["rss"]
    print(f"\n1 process: {one['seconds']:.0f} s build ({one['wall_seconds']:.0f} s with model load), "
          f"pass 1 {one['pass1_tokens']} tokens in {one['pass1_seconds']:.0f} s, pass 2 {T} tokens in "
          f"{one['pass2_seconds']:.0f} s; peak RSS {rss / 2**30:.2f} GiB")
    parts = one.get("pass2_parts") or {}
    if parts:
        print(f"  pass 2: the model on {T - one.get('pass1_reused_tokens', 0)} tokens (the batches pass 1 did not run) "
              f"{parts['forward']:.1f} s, the screen {parts['screen']:.1f} s, the layer sums {parts['sums']:.1f} s")
    kept = one.get("kept_states") or {}
    if kept:
        where = "held in the build process (in its peak RSS above)" if kept["folder"] == "memory" else \
            f"in {kept['folder']} ({'RAM-backed, not counted in the RSS' if kept['in_memory'] else 'on disk'})"
        print(f"states kept for passes 2 and 3: {kept['bytes'] / 2**30:.2f} GiB {where}")
    forward_s = (runs[0][2] + runs[0][3]) / 2  # the forwards either side of the first repeat
    out["forward_seconds"] = forward_s
    out["forward_seconds_each"] = forwards
    fwd_rate = T / forward_s
    pass2_rate = T / one["pass2_seconds"]
    build_rate = T / one["seconds"]
    out.update(forward_tok_s=fwd_rate, pass2_tok_s=pass2_rate, build_tok_s=build_rate)
    wall_rate = T / one["wall_seconds"]
    out.update(build_wall_tok_s=wall_rate, pass1_fraction=one["pass1_tokens"] / T,
               build_over_forward=build_rate / fwd_rate, build_wall_over_forward=wall_rate / fwd_rate)
    print(f"plain forward: {fwd_rate:.0f} tok/s (before the build {T / runs[0][2]:.0f}, after {T / runs[0][3]:.0f}); "
          f"pass 2: {pass2_rate:.0f} tok/s (ratio {pass2_rate / fwd_rate:.2f}); whole build incl. pass 1 "
          f"({one['pass1_tokens'] / T:.0%} of the tokens) and pass 3 ({one.get('pass3_seconds', 0):.0f} s): "
          f"{build_rate:.0f} tok/s (ratio {build_rate / fwd_rate:.2f}; target >= 0.8)")
    screen = one.get("screen") or {}
    if screen.get("concept_tokens"):
        out["screen"] = screen
        print(f"  pass 2's screen: {screen['concept_tokens']} (concept, token) pairs; {screen['float64_layer_tokens']} "
              f"(layer, token) pairs screened again in float64 ({screen['float64_layer_tokens'] / (T * S):.2%} of "
              f"{T * S}); {screen['rowwise_concept_tokens']} (concept, token) pairs decided by the float64 reference "
              f"row by row ({screen['rowwise_concept_tokens'] / screen['concept_tokens']:.3%})"
              + (f"; of these ties, {screen['ties_from_drawn_bits']} read a drawn positive's deviation (the same "
                 f"bits at the tied layers) and {screen['ties_reference_run']} ran the reference"
                 if "ties_from_drawn_bits" in screen else ""))
    print(f"  the ratio above is the build's own time (corpus, labels, passes 1-3; from build_dictionary's start to "
          f"its end); end to end, with the process start and the model load: {wall_rate:.0f} tok/s "
          f"(ratio {wall_rate / fwd_rate:.2f})")
    if baseline_tree:
        from safetensors.torch import load_file

        print(f"baseline code: pass 2 {T / base['pass2_seconds']:.0f} tok/s (ratio "
              f"{T / base['pass2_seconds'] / fwd_rate:.2f}), whole build {T / base['seconds']:.0f} tok/s (ratio "
              f"{T / base['seconds'] / fwd_rate:.2f})")
        same = byte_identical(load_file(str(work / "one.chunks.safetensors")),
                              load_file(str(work / "base.chunks.safetensors")))
        out["baseline_byte_identical"] = same
        print(f"dictionary tensors byte-identical to the baseline code's: {same}")
        from chunktui.engine.dictionary import load_dictionary

        notes_a = load_dictionary(work / "one.chunks.safetensors").notes
        notes_b = load_dictionary(work / "base.chunks.safetensors").notes
        notes_a.pop("command", None), notes_b.pop("command", None)  # the command names its own output file
        same_notes = json.dumps(notes_a, sort_keys=True) == json.dumps(notes_b, sort_keys=True)
        out["baseline_notes_identical"] = same_notes
        print(f"dictionary notes (the colour rule and its figures included) identical to the baseline code's: "
              f"{same_notes}")

    if repeats > 1:
        rows = []
        for r, (a, b, f0, f1) in enumerate(runs):
            rate = T / ((f0 + f1) / 2)
            rows.append({"forward_tok_s": rate, "build_seconds": a["seconds"],
                         "build_over_forward": T / a["seconds"] / rate,
                         "baseline_build_seconds": b["seconds"] if b else None,
                         "baseline_over_forward": T / b["seconds"] / rate if b else None})
            print(f"repeat {r + 1}: plain forward {rate:.0f} tok/s; build {a['seconds']:.1f} s, ratio "
                  f"{rows[-1]['build_over_forward']:.2f}" + (f"; baseline code {b['seconds']:.1f} s, ratio "
                                                             f"{rows[-1]['baseline_over_forward']:.2f}" if b else ""))
        out["repeats"] = rows
        import statistics

        for key, name in (("build_over_forward", "this code"), ("baseline_over_forward", "baseline code")):
            values = [row[key] for row in rows if row[key] is not None]
            if values:
                out[f"{key}_median"] = statistics.median(values)
                print(f"{name}, {len(values)} repeats: ratio median {statistics.median(values):.2f} "
                      f"(lowest {min(values):.2f}, highest {max(values):.2f}; target >= 0.8)")
        from safetensors.torch import load_file

        first = load_file(str(work / "one.chunks.safetensors"))
        names = [f"one{r}" for r in range(1, repeats)] + \
            (["base"] + [f"base{r}" for r in range(1, repeats)] if baseline_tree else [])
        same = all(byte_identical(first, load_file(str(work / f"{name}.chunks.safetensors"))) for name in names)
        out["repeats_byte_identical"] = same
        print(f"every repeat's dictionary tensors byte-identical to the first build's: {same}")
    if compare_procs:
        two = build(2, "two")
        out["build_2"] = two
        print(f"2 processes: {two['seconds']:.0f} s build ({two['wall_seconds']:.0f} s with launch and load) "
              f"against {one['seconds']:.0f} s ({one['wall_seconds']:.0f} s); speed-up {one['seconds'] / two['seconds']:.2f}x, "
              f"peak RSS per process {two['peak_memory_bytes']['rss'] / 2**30:.2f} GiB")
        from safetensors.torch import load_file

        a, b = load_file(str(work / "one.chunks.safetensors")), load_file(str(work / "two.chunks.safetensors"))
        same = a.keys() == b.keys() and all(torch.equal(a[k].nan_to_num(), b[k].nan_to_num()) for k in a)
        out["two_equals_one"] = same
        print(f"2-process dictionary tensors equal the 1-process build's: {same}")
    if target is not None:
        target.write_json(out)


if __name__ == "__main__":
    main()
