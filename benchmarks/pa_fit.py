"""Population averaging at scale on the built-in model, and its held-out quality.

Prints (1) the time to collect hidden states for the training text against the
time to fit every concept at every layer over the paper's 40 tolerances (the
baseline is the collection, measured in the same run), and (2) held-out TP/FP
per word and per layer for each --n given.

    python benchmarks/pa_fit.py [--n 5 --n 20] [--json out.json]
"""

from __future__ import annotations

import json
import time

import click
import torch


@click.command()
@click.option("--model", default="smollm2-135m")
@click.option("--train", default="sample_data/train.txt")
@click.option("--heldout", default="sample_data/heldout.txt")
@click.option("--words", default="@sample_data/concepts.txt")
@click.option("--n", "ns", multiple=True, type=int, default=[5, 20])
@click.option("--criterion", default="accuracy")
@click.option("--threads", default=2)
@click.option("--json", "json_out", default=None)
def main(model, train, heldout, words, ns, criterion, threads, json_out):
    from chunktui.engine.build import LabelSource, collect_for, evaluate_hidden, read_text, summarise_by_label
    from chunktui.engine.dictionary import Chunk, ChunkDictionary, chunk_id
    from chunktui.engine.labels import read_word_list
    from chunktui.engine.models import load_model
    from chunktui.engine.pa import PAPER_TOLERANCES, fit_concept

    torch.set_num_threads(threads)
    word_list = read_word_list(words[1:]) if words.startswith("@") else words.split(",")
    word_list = [w + "*" if w == "cheesecake" else w for w in word_list]  # split by the tokenizer: part-word
    loaded = load_model(model)
    src_tr = LabelSource(corpus=read_text(train), words=word_list)
    src_ho = LabelSource(corpus=read_text(heldout), words=word_list, min_count=1)
    t0 = time.perf_counter()
    hs_tr, _ = collect_for(loaded, src_tr, None)
    collect_s = time.perf_counter() - t0
    hs_ho, _ = collect_for(loaded, src_ho, None)
    lab_tr, lab_ho = src_tr.labels(hs_tr, None), src_ho.labels(hs_ho, None)
    T, S, d = hs_tr.H.shape
    print(f"model {loaded.name}: {T} training tokens, {S} layers, width {d}, {len(lab_tr.masks)} concepts, "
          f"{len(PAPER_TOLERANCES)} tolerances, {threads} threads")
    out = {"tokens": T, "layers": S, "concepts": len(lab_tr.masks), "collect_seconds": collect_s, "runs": {}}
    for n in ns:
        t1 = time.perf_counter()
        chunks = []
        for label, mask in lab_tr.masks.items():
            fits, _ = fit_concept(hs_tr.H, mask, hs_tr.layers, n=n, seed=0, criterion=criterion)
            chunks += [Chunk(id=chunk_id(label, f.layer), label=label, layer=f.layer, neurons=f.neurons,
                             template=f.template, threshold=f.threshold) for f in fits if f.neurons.numel()]
        fit_s = time.perf_counter() - t1
        print(f"\nn={n}: fit {len(lab_tr.masks)} concepts x {S} layers x {len(PAPER_TOLERANCES)} tolerances in "
              f"{fit_s:.1f} s; collecting the hidden states took {collect_s:.1f} s (fit/collect = {fit_s / collect_s:.2f})")
        records = evaluate_hidden(ChunkDictionary(model=loaded.identity(), chunks=chunks), hs_ho, lab_ho,
                                  loaded.hidden_size)
        summary = summarise_by_label(records)
        print(f"{'concept':<12}{'pos':>5}{'TP':>7}{'FP':>9}   TP rate by layer 0..{S - 1}")
        for label, agg in summary.items():
            per_layer = [r["tp_rate"] for r in records if r["label"] == label]
            print(f"{label:<12}{agg['positives']:>5}{agg['tp_rate']:>7.3f}{agg['fp_rate']:>9.5f}   "
                  + " ".join(f"{v:.2f}" for v in per_layer))
        tps = [a["tp_rate"] for a in summary.values()]
        fps = [a["fp_rate"] for a in summary.values()]
        print(f"all concepts: mean TP {sum(tps) / len(tps):.3f}, mean FP {sum(fps) / len(fps):.5f}, "
              f"words with TP >= 0.75: {sum(t >= 0.75 for t in tps)}/{len(tps)}, "
              f"FP <= 0.002: {sum(f <= 0.002 for f in fps)}/{len(fps)}")
        out["runs"][str(n)] = {"fit_seconds": fit_s, "by_label": summary, "chunks": records}
    if json_out:
        from chunktui.engine.io import write_json

        write_json(json_out, out)


if __name__ == "__main__":
    main()
