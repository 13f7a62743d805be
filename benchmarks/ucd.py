"""Unsupervised chunk discovery: time for K chunks on ~20k tokens at one layer, against k-means in the same run.

Collects one layer of the built-in model over the sample texts (per-sentence
contexts; the first 20,000 tokens), then times

    discovery   K directions by max cosine (Adam, dead-chunk re-seeding, thresholds)
    k-means     Euclidean k-means++ and Lloyd iterations, same K, same tokens (the baseline)

and prints both, the ratio, the dead-chunk fraction and NMI against word identity.
train.txt + heldout.txt give about 17,600 tokens; the texts of pos.jsonl and spans.jsonl bring it past
20,000. The states can be cached (--cache DIR) so a rerun times only the fitting.

    python benchmarks/ucd.py [--k 512 --layer 15 --tokens 20000 --threads 2 --json out.json]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch


def _states(loaded_fn, path: str, layer: int, cache_dir: str | None):
    """(X (T, d), word ids (T,), seconds to collect) for one corpus; .jsonl files are span files (their texts)."""
    from chunktui.shared.texts import read_text
    from chunktui.engine.corpus import collect
    from chunktui.engine.labels import read_spans
    from chunktui.engine.ucd import word_identity

    cached = Path(cache_dir) / f"{Path(path).name}.L{layer}.safetensors" if cache_dir else None
    if cached is not None and cached.is_file():
        from safetensors.torch import load_file

        saved = load_file(str(cached))
        return saved["X"], saved["words"], float(saved["seconds"])
    if path.endswith(".jsonl"):
        spans = read_spans(path)
        text, contexts = spans.source, spans.contexts
    else:
        text, contexts = read_text(path), None
    t0 = time.perf_counter()
    hs = collect(loaded_fn(), text, layers=[layer], batch_size=32, contexts=contexts)
    seconds = time.perf_counter() - t0
    X, words = hs.H[:, 0].float(), word_identity(hs.tokens, hs.source)[0]
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({"X": X.contiguous(), "words": words.contiguous(), "seconds": torch.tensor(seconds)}, str(cached))
    return X, words, seconds


@click.command()
@click.option("--model", default="smollm2-135m")
@click.option("--corpus", "corpora", multiple=True,
              default=["sample_data/train.txt", "sample_data/heldout.txt", "sample_data/pos.jsonl",
                       "sample_data/spans.jsonl"])
@click.option("--layer", default=15)
@click.option("--k", default=512)
@click.option("--tokens", default=20000, help="use at most this many tokens")
@click.option("--steps", default=300)
@click.option("--batch-size", default=4096)
@click.option("--kmeans-iters", default=30)
@click.option("--threads", default=2)
@click.option("--cache", default=None, help="folder to keep the collected states in")
@click.option("--json", "json_out", default=None)
def main(model, corpora, layer, k, tokens, steps, batch_size, kmeans_iters, threads, cache, json_out):
    from chunktui.engine.models import load_model
    from chunktui.engine.ucd import DiscoveryConfig, fit_directions, kmeans, nmi

    torch.set_num_threads(threads)
    loaded = []

    def get_model():
        if not loaded:
            loaded.append(load_model(model))
        return loaded[0]

    parts = [_states(get_model, c, layer, cache) for c in corpora]
    collect_s = sum(p[2] for p in parts)
    X = torch.cat([p[0] for p in parts])[:tokens]
    # word ids are per corpus: offset them so words of different corpora never share an id by accident
    offsets, words = 0, []
    for _, w, _ in parts:
        words.append(torch.where(w >= 0, w + offsets, w))
        offsets += int(w.max()) + 1 if len(w) else 0
    words = torch.cat(words)[:tokens]
    T, d = X.shape
    print(f"{model} layer {layer}: {T} tokens from {len(corpora)} texts, width {d}, K = {k}, {threads} threads "
          f"(collecting took {collect_s:.1f} s)")

    config = DiscoveryConfig(k=k, steps=steps, batch_size=batch_size, seed=0)
    t0 = time.perf_counter()
    found = fit_directions(X, config)
    disc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    km = kmeans(X, k, seed=0, iters=kmeans_iters)
    km_s = time.perf_counter() - t0
    result = {"tokens": T, "width": d, "k": k, "layer": layer, "threads": threads, "steps": steps,
              "batch_size": batch_size, "discovery_seconds": disc_s, "kmeans_seconds": km_s,
              "kmeans_iters": kmeans_iters, "ratio_discovery_to_kmeans": disc_s / km_s,
              "dead_fraction": found.dead_fraction, "reseeded": found.reseeded,
              "nmi_word_discovered": nmi(found.assign, words), "nmi_word_kmeans": nmi(km, words)}
    print(f"discovery: {disc_s:.1f} s ({steps} Adam steps of {min(batch_size, T)} tokens), dead "
          f"{100 * found.dead_fraction:.1f}% after {found.reseeded} re-seeds, word NMI {result['nmi_word_discovered']:.3f}")
    print(f"k-means:   {km_s:.1f} s (k-means++ and up to {kmeans_iters} Lloyd iterations), word NMI "
          f"{result['nmi_word_kmeans']:.3f}")
    print(f"discovery / k-means time = {disc_s / km_s:.2f}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
