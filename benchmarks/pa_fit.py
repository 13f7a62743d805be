"""Population averaging on the built-in model: the paper's threshold against the calibrated one, on held-out text.

Each configuration is built with the streaming build on the training text and
evaluated unchanged on the held-out text. Printed side by side, per
configuration: mean over words (each word's TP and FP averaged over its
layers) of the held-out TP and FP rates, the worst word's FP, and how many
words reach TP >= 0.75 and >= 0.9; then per word.

    python benchmarks/pa_fit.py [--config accuracy:5 --config fp-budget:0.001 ...] [--json out.json]

A configuration is CRITERION[:N] for the paper's rule (accuracy, f1,
balanced; N positives drawn, default 5) or fp-budget:B[:N] (template from all
positives unless N is given).
"""

from __future__ import annotations

import time

import click
import torch

DEFAULT_CONFIGS = ("accuracy:5", "accuracy:10", "fp-budget:0.0005", "fp-budget:0.001")


def parse_config(text: str) -> tuple[str, int | None]:
    parts = text.split(":")
    if parts[0] == "fp-budget":
        return f"fp-budget:{parts[1]}", int(parts[2]) if len(parts) > 2 else None
    return parts[0], int(parts[1]) if len(parts) > 1 else 5


@click.command()
@click.option("--model", default="smollm2-135m")
@click.option("--train", default="sample_data/train.txt")
@click.option("--heldout", default="sample_data/heldout.txt")
@click.option("--words", default="@sample_data/concepts.txt")
@click.option("--config", "configs", multiple=True, default=DEFAULT_CONFIGS, show_default=True)
@click.option("--threads", default=2)
@click.option("--json", "json_out", default=None)
def main(model, train, heldout, words, configs, threads, json_out):
    from chunktui.engine.build import LabelSource, build_dictionary, collect_for, evaluate_hidden, summarise_by_label
    from chunktui.shared.texts import read_text
    from chunktui.engine.labels import read_word_list
    from chunktui.engine.models import load_model

    torch.set_num_threads(threads)
    word_list = read_word_list(words[1:]) if words.startswith("@") else words.split(",")
    word_list = [w + "*" if w == "cheesecake" else w for w in word_list]  # split by the tokenizer: part-word
    loaded = load_model(model)
    train_text = read_text(train)
    src_ho = LabelSource(corpus=read_text(heldout), words=word_list, min_count=1)
    hs_ho, _ = collect_for(loaded, src_ho, None)  # the held-out states once, shared by every configuration
    lab_ho = src_ho.labels(hs_ho, None)
    print(f"model {loaded.name}: held-out {len(hs_ho.tokens)} tokens, {len(hs_ho.layers)} layers, {threads} threads")
    out = {"heldout_tokens": len(hs_ho.tokens), "runs": {}}
    rows = []
    for config in configs:
        criterion, n = parse_config(config)
        t0 = time.perf_counter()
        dictionary, report = build_dictionary(loaded, LabelSource(corpus=train_text, words=word_list), n=n,
                                              criterion=criterion)
        seconds = time.perf_counter() - t0
        records = evaluate_hidden(dictionary, hs_ho, lab_ho, loaded.hidden_size)
        summary = summarise_by_label(records)
        tps = [a["tp_rate"] for a in summary.values()]
        fps = [a["fp_rate"] for a in summary.values()]
        sizes = [c.size for c in dictionary.chunks]
        row = {"config": config, "build_seconds": seconds, "train_tokens": report.tokens, "words": len(tps),
               "mean_tp": sum(tps) / len(tps), "mean_fp": sum(fps) / len(fps), "max_fp": max(fps),
               "tp_ge_075": sum(t >= 0.75 for t in tps), "tp_ge_090": sum(t >= 0.9 for t in tps),
               "mean_size": sum(sizes) / len(sizes), "chunks": len(dictionary.chunks)}
        rows.append(row)
        out["runs"][config] = dict(row, by_label=summary)
        print(f"built {config} in {seconds:.0f} s ({report.tokens} training tokens, {len(dictionary.chunks)} chunks)")
    print(f"\n{'configuration':<20}{'mean TP':>9}{'mean FP':>10}{'max FP':>9}{'TP>=0.75':>10}{'TP>=0.9':>9}"
          f"{'mean |M|':>10}")
    for r in rows:
        print(f"{r['config']:<20}{r['mean_tp']:>9.3f}{r['mean_fp']:>10.5f}{r['max_fp']:>9.5f}"
              f"{r['tp_ge_075']:>7}/{r['words']:<2}{r['tp_ge_090']:>6}/{r['words']:<2}{r['mean_size']:>10.0f}")
    labels = list(out["runs"][rows[0]["config"]]["by_label"])
    print(f"\nheld-out TP (FP) per word, mean over layers")
    print(f"{'word':<12}" + "".join(f"{r['config']:>22}" for r in rows))
    for label in labels:
        cells = []
        for r in rows:
            agg = out["runs"][r["config"]]["by_label"].get(label)
            cells.append(f"{agg['tp_rate']:.3f} ({agg['fp_rate']:.4f})" if agg else "-")
        print(f"{label:<12}" + "".join(f"{c:>22}" for c in cells))
    if json_out:
        from chunktui.shared.io import write_json

        write_json(json_out, out)


if __name__ == "__main__":
    main()
