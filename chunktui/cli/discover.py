"""`chunktui discover` (unsupervised chunk discovery) and `chunktui import` (directions from other tools)."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.table import Table

from chunktui.cli.common import console, err_console, friendly_errors, load_with_progress, model_options, stage_progress


def _open_target(out: str, identity: dict, overwrite: bool):
    """The dictionary to add chunks to: the existing file at `out` (unless overwrite), else a new one."""
    from chunktui.engine.dictionary import ChunkDictionary, load_dictionary

    if not out.endswith(".chunks.safetensors"):
        raise click.BadParameter("the file name must end in .chunks.safetensors", param_hint="--out")
    if Path(out).exists() and not overwrite:
        return load_dictionary(out, identity), True
    return ChunkDictionary(model=identity), False


@click.command("discover")
@model_options
@click.option("--corpus", type=click.Path(dir_okay=False), help="plain text to discover chunks in")
@click.option("--spans", "spans_path", type=click.Path(dir_okay=False),
              help="JSONL spans (e.g. part-of-speech tags): its texts are the corpus, its labels score the chunks")
@click.option("--layers", default="15", show_default=True, help="'all', '5', '2-9' or '0,4,8-10'")
@click.option("--k", "k", default=256, show_default=True, help="chunks per layer")
@click.option("--steps", default=300, show_default=True, help="Adam steps per layer")
@click.option("--batch-size", "fit_batch", default=4096, show_default=True, help="tokens per Adam step")
@click.option("--lr", default=0.03, show_default=True, help="Adam learning rate (cosine-decayed to lr / 10)")
@click.option("--quantile", default=0.1, show_default=True,
              help="each chunk's cosine threshold is this quantile of the cosines of the tokens it wins")
@click.option("--seed", default=0, show_default=True)
@click.option("--context", "context_mode", default="sentence", show_default=True,
              type=click.Choice(["sentence", "window"]), help="per-sentence contexts or sliding windows (--corpus)")
@click.option("--evaluate/--no-evaluate", default=True, show_default=True,
              help="score against word identity (and the span labels) with k-means and random baselines")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="NAME.chunks.safetensors; an existing dictionary for this model gains the chunks")
@click.option("--overwrite", is_flag=True, help="replace the file at --out instead of adding to it")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="per-layer dead fraction, NMI and purity")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="where the states are cached (safetensors shards, removed afterwards)  [default: the temp folder]")
@friendly_errors
def discover_cmd(model_spec, device, dtype, corpus, spans_path, layers, k, steps, fit_batch, lr, quantile, seed,
                 context_mode, evaluate, out, overwrite, json_out, cache_dir) -> None:
    """Discover chunks without labels (docs/method.md section 4): K directions per layer by max cosine."""
    import tempfile

    from chunktui.engine.build import LabelSource, read_text
    from chunktui.engine.errors import CorpusError
    from chunktui.engine.hidden import HiddenStates, cache_states, parse_layers, prepare_corpus
    from chunktui.engine.importing import merge_chunks
    from chunktui.engine.io import write_json
    from chunktui.engine.ucd import DiscoveryConfig, discover

    if bool(corpus) == bool(spans_path):
        raise CorpusError("Give exactly one of --corpus and --spans.")
    config = DiscoveryConfig(k=k, steps=steps, batch_size=fit_batch, lr=lr, seed=seed, threshold_quantile=quantile)
    config.check()
    loaded = load_with_progress(model_spec, device, dtype)
    dictionary, existed = _open_target(out, loaded.identity(), overwrite)
    source = LabelSource(corpus=read_text(corpus) if corpus else None, corpus_name=corpus or "", spans_path=spans_path)
    layer_list = parse_layers(layers, loaded.layout.n_states)
    text, contexts, spans = source.read()
    corpus_states = prepare_corpus(loaded.tokenizer, text, context_mode, contexts=contexts)
    if cache_dir:
        Path(cache_dir).expanduser().mkdir(parents=True, exist_ok=True)
    progress, update = stage_progress()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chunktui-states.", dir=cache_dir) as folder:
        with progress:
            # the corpus's states go to disk once (safetensors shards); discovery reads one layer at a time
            cache = cache_states(loaded, corpus_states, layer_list, folder,
                                 progress=lambda done, total: update("collect", done / max(total, 1),
                                                                     f"{done}/{total} tokens to disk"))
            collect_seconds = time.perf_counter() - t0
            err_console.print(f"[dim]states cached on disk: {len(cache.shards)} safetensors shard(s), "
                              f"{cache.nbytes() / 2**20:.0f} MB in {folder}; one layer in memory at a time[/]")
            chunks, layer_means = [], {}
            report = None
            for layer in layer_list:
                X = cache.layer(layer)
                hs = HiddenStates(H=X[:, None], layers=[layer], tokens=corpus_states.tokens, source=text,
                                  contexts=corpus_states.contexts, context_mode=corpus_states.context_mode,
                                  model_name=loaded.name)
                found, part = discover(hs, config, spans=spans, evaluate=evaluate, device=loaded.device,
                                       progress=update)
                chunks += found
                layer_means[layer] = X.double().mean(0).float()
                if report is None:
                    report = part
                else:
                    report.layers.update(part.layers)
                del X, hs
    added, replaced = merge_chunks(dictionary, chunks)
    if dictionary.layer_means is None:
        import torch

        dictionary.layer_means = torch.full((loaded.layout.n_states, loaded.hidden_size), float("nan"))
    for layer, mean in layer_means.items():
        if not bool(dictionary.layer_means[layer].isfinite().all()):
            dictionary.layer_means[layer] = mean
    # one record per discovery run: a dictionary can gain layers from several runs
    runs = [r for r in dictionary.notes.get("discovery", []) if isinstance(r, dict)] \
        if isinstance(dictionary.notes.get("discovery"), list) else []
    runs.append({
        "states": "raw (not centred): matching and grafting use the raw cosine and projection",
        "objective": "max cosine, Adam projected to the unit sphere, dead chunks re-seeded from worst-covered tokens",
        "threshold": f"quantile {config.threshold_quantile} of the cosines of the tokens each chunk wins",
        "corpus": corpus or spans_path, "context_mode": corpus_states.context_mode,
        "tokens": len(corpus_states.tokens), "corpus_digest": corpus_states.digest, "config": config.to_json(),
        "layers": layer_list, "states": "cached on disk in safetensors shards, read one layer at a time",
        "dead_fraction": {str(l): r["dead_fraction"] for l, r in report.layers.items()}})
    dictionary.notes["discovery"] = runs
    if not existed:
        dictionary.notes.setdefault("command", "chunktui discover")
    path = dictionary.save(out)
    _print_report(report, spans is not None and evaluate)
    console.print(f"wrote [bold]{path}[/]: {added} chunks added, {replaced} replaced, {len(dictionary)} in all; "
                  f"{len(corpus_states.tokens)} tokens; collect {collect_seconds:.1f} s, discovery "
                  f"{sum(r['seconds'] for r in report.layers.values()):.1f} s")
    if json_out:
        doc = report.to_json()
        doc.update(dictionary=str(path), model=loaded.name, corpus=corpus or spans_path,
                   context_mode=corpus_states.context_mode, states="cached on disk (safetensors shards)")
        write_json(json_out, doc)
        console.print(f"wrote {json_out}")


def _print_report(report, with_pos: bool) -> None:
    """One row per layer; each score as discovered / k-means / random directions."""
    evaluated = any("evaluation" in r for r in report.layers.values())
    table = Table(title=f"Discovery by layer ({report.tokens} tokens, K = {report.config['k']})"
                        + ("; scores: discovered / k-means / random" if evaluated else ""))
    # POS NMI and purity, word NMI (word purity is in the JSON); without spans, word NMI and purity
    scores = [("pos", "nmi"), ("pos", "purity"), ("word", "nmi")] if with_pos else [("word", "nmi"), ("word", "purity")]
    if not evaluated:
        scores = []
    for col in ["layer", "dead"] + [f"{name} {'NMI' if score == 'nmi' else score}" for name, score in scores]:
        table.add_column(col, justify="right", no_wrap=True)
    for layer, r in sorted(report.layers.items()):
        row = [str(layer), f"{100 * r['dead_fraction']:.1f}%"]
        if evaluated:
            ev = r["evaluation"]
            for name, score in scores:
                row.append("/".join(f"{ev[m][name][score]:.3f}" for m in ("discovered", "kmeans", "random")))
        table.add_row(*row)
    console.print(table)


@click.command("import")
@model_options
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="NAME.chunks.safetensors; an existing dictionary for this model gains the chunks")
@click.option("--overwrite", is_flag=True, help="replace the file at --out instead of adding to it")
@click.option("--label", help="concept label for the imported chunks (default: the file name)")
@click.option("--layer", type=int, help="hidden-state index H[l] for files that do not say (overrides the file)")
@click.option("--layer-offset", type=int,
              help="added to layer numbers written in the file (default 1 for control-vector GGUF: llama.cpp's "
                   "direction.il edits block il's output, our H[il+1]; 0 otherwise)")
@click.option("--corpus", type=click.Path(dir_okay=False),
              help="calibrate thresholds and typical projections on this text")
@click.option("--match-rate", default=0.05, show_default=True,
              help="with --corpus: the threshold makes each chunk match this share of the corpus tokens")
@click.option("--threshold", "default_threshold", default=0.25, show_default=True,
              help="cosine threshold when no --corpus is given")
@friendly_errors
def import_cmd(model_spec, device, dtype, files, out, overwrite, label, layer, layer_offset, corpus, match_rate,
               default_threshold) -> None:
    """Import directions made by other tools (.npy, .safetensors, llama.cpp control-vector .gguf) as chunks."""
    from chunktui.engine.build import read_text
    from chunktui.engine.hidden import collect
    from chunktui.engine.importing import import_file, merge_chunks

    loaded = load_with_progress(model_spec, device, dtype)
    dictionary, _ = _open_target(out, loaded.identity(), overwrite)
    calibration = None
    if corpus:
        calibration = collect(loaded, read_text(corpus))
    total = 0
    for f in files:
        result = import_file(f, loaded.identity(), label=label, layer=layer, layer_offset=layer_offset,
                             calibration=calibration, match_rate=match_rate, default_threshold=default_threshold)
        added, replaced = merge_chunks(dictionary, result.chunks)
        total += len(result.chunks)
        layers = sorted(c.layer for c in result.chunks)
        hint = result.metadata.get("model_hint")
        console.print(f"{Path(f).name} ({result.format}{', model hint ' + hint if hint else ''}): "
                      f"{len(result.chunks)} chunks '{result.chunks[0].label}' at layers "
                      f"{', '.join(map(str, layers))}; {added} added, {replaced} replaced")
        for key, why in result.skipped.items():
            err_console.print(f"[yellow]skipped[/] {key}: {why}")
        if result.metadata.get("layer_count_mismatch"):
            err_console.print(f"[yellow]note[/] {result.metadata['layer_count_mismatch']}")
    dictionary.notes.setdefault("imported", [])
    dictionary.notes["imported"] = list(dictionary.notes["imported"]) + [Path(f).name for f in files]
    path = dictionary.save(out)
    console.print(f"wrote [bold]{path}[/]: {total} chunks imported, {len(dictionary)} in all")
