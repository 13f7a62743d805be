"""`chunktui discover` (unsupervised chunk discovery) and `chunktui import` (directions from other tools)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import click
from rich.table import Table

from rich.markup import escape

from chunktui.cli.common import (checked, command_line, console, friendly_errors, load_with_progress, model_inputs,
                                 model_options, note, plan_outputs, stage_progress)
from chunktui.shared import validate
from chunktui.shared.errors import ChunkError


def _out_options(func):
    func = click.option("--append", is_flag=True,
                        help="add the chunks to the existing dictionary at --out (it must be for this model)")(func)
    func = click.option("--overwrite", is_flag=True,
                        help="replace an existing file at --out (or --json); never one of the inputs")(func)
    return func


def _check_out_mode(out: str, append: bool, overwrite: bool) -> None:
    if append and overwrite:
        raise ChunkError("Give at most one of --append (add to the dictionary at --out) and --overwrite (replace it).")
    if not (append or overwrite) and os.path.lexists(Path(out).expanduser()) and not Path(out).expanduser().is_dir():
        raise ChunkError(f"--out {out} already exists. Pass --append to add these chunks to it, or --overwrite to "
                         "replace it, or choose another file name.")


def _open_target(target, identity: dict, append: bool):
    """The dictionary to add chunks to: the existing file at --out with --append, else a new one."""
    from chunktui.engine.dictionary import ChunkDictionary, load_dictionary

    if append and target.path.exists():
        return load_dictionary(target.path, identity), True
    return ChunkDictionary(model=identity), False


def remove_stale_state_caches(cache_dir=None) -> int:
    """State caches (`chunktui-states.*`) whose discover process is gone (killed by SIGKILL): removed at start."""
    import shutil

    root = Path(cache_dir).expanduser() if cache_dir else Path(tempfile.gettempdir())
    removed = 0
    for folder in root.glob("chunktui-states.*"):
        try:
            pid = int((folder / "owner.pid").read_text().strip())
        except (OSError, ValueError):
            continue  # not ours to judge (an older chunktui, or being created right now)
        try:
            os.kill(pid, 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        shutil.rmtree(folder, ignore_errors=True)
        removed += not folder.exists()
    return removed


@click.command("discover")
@model_options
@click.option("--corpus", type=click.Path(dir_okay=False), help="plain text to discover chunks in")
@click.option("--spans", "spans_path", type=click.Path(dir_okay=False),
              help="JSONL spans (e.g. part-of-speech tags): its texts are the corpus, its labels score the chunks")
@click.option("--layers", default="15", show_default=True, callback=checked(validate.layer_spec),
              help="'all', '5', '2-9' or '0,4,8-10' (ranges low-high)")
@click.option("--k", "k", default=256, show_default=True, callback=checked(validate.count), help="chunks per layer")
@click.option("--steps", default=300, show_default=True, callback=checked(validate.steps), help="Adam steps per layer (at most 100000)")
@click.option("--batch-size", "fit_batch", default=4096, show_default=True, callback=checked(validate.count),
              help="tokens per Adam step")
@click.option("--lr", default=0.03, show_default=True, callback=checked(validate.number_in, lo=0.0, hi=10.0, lo_open=True),
              help="Adam learning rate, 0 < lr <= 10 (cosine-decayed to lr / 10)")
@click.option("--quantile", default=0.1, show_default=True,
              callback=checked(validate.number_in, lo=0.0, hi=1.0, hi_open=True),
              help="each chunk's cosine threshold is this quantile (in [0, 1)) of the cosines of the tokens it wins")
@click.option("--seed", default=0, show_default=True, callback=checked(validate.seed))
@click.option("--context", "context_mode", default="sentence", show_default=True,
              type=click.Choice(["sentence", "window"]), help="per-sentence contexts or sliding windows (--corpus)")
@click.option("--evaluate/--no-evaluate", default=True, show_default=True,
              help="score against word identity (and the span labels) with k-means and random baselines")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="NAME.chunks.safetensors (an existing file needs --append or --overwrite)")
@_out_options
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="per-layer dead fraction, NMI and purity")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="where the states are cached (safetensors shards, removed afterwards)  [default: the temp folder]")
@friendly_errors
def discover_cmd(model_spec, device, dtype, corpus, spans_path, layers, k, steps, fit_batch, lr, quantile, seed,
                 context_mode, evaluate, out, overwrite, append, json_out, cache_dir) -> None:
    """Discover chunks without labels (docs/method.md section 4): K directions per layer by max cosine."""
    import tempfile

    from chunktui.engine.build import LabelSource
    from chunktui.shared.texts import read_text

    from chunktui.shared.errors import CorpusError
    from chunktui.engine.corpus import HiddenStates, cache_states, prepare_corpus
    from chunktui.shared.validate import parse_layers
    from chunktui.engine.importing import merge_chunks
    from chunktui.engine.ucd import DiscoveryConfig, discover

    if bool(corpus) == bool(spans_path):
        raise CorpusError("Give exactly one of --corpus and --spans.")
    config = DiscoveryConfig(k=k, steps=steps, batch_size=fit_batch, lr=lr, seed=seed, threshold_quantile=quantile)
    config.check()
    _check_out_mode(out, append, overwrite)
    from chunktui.engine.labels import read_spans

    corpus_text = read_text(corpus) if corpus else None
    if spans_path:
        read_spans(spans_path)
    inputs = [corpus, spans_path, *model_inputs(model_spec)]
    target, json_target = plan_outputs(("--out", out, ".chunks.safetensors"), ("--json", json_out, None),
                                       inputs=inputs, overwrite=overwrite or append)
    if json_target is not None and append and not overwrite and json_target.existed:
        raise ChunkError(f"--json {json_out} already exists (--append applies to --out only). Pass --overwrite to "
                         "replace both, or choose another file name.")
    loaded = load_with_progress(model_spec, device, dtype)
    dictionary, existed = _open_target(target, loaded.identity(), append)
    source = LabelSource(corpus=corpus_text, corpus_name=corpus or "", spans_path=spans_path)
    layer_list = parse_layers(layers, loaded.layout.n_states)
    text, contexts, spans = source.read()
    corpus_states = prepare_corpus(loaded.tokenizer, text, context_mode, contexts=contexts,
                                   context_length=loaded.context_length)
    if cache_dir:
        Path(cache_dir).expanduser().mkdir(parents=True, exist_ok=True)
    progress, update = stage_progress()
    t0 = time.perf_counter()
    removed = remove_stale_state_caches(cache_dir)
    if removed:
        note("note:", f"removed {removed} state cache(s) left by a discover that was killed", style="dim")
    with tempfile.TemporaryDirectory(prefix="chunktui-states.", dir=cache_dir) as folder:
        (Path(folder) / "owner.pid").write_text(str(os.getpid()))
        with progress:
            # the corpus's states go to disk once (safetensors shards); discovery reads one layer at a time
            cache = cache_states(loaded, corpus_states, layer_list, folder,
                                 progress=lambda done, total: update("collect", done / max(total, 1),
                                                                     f"{done}/{total} tokens to disk"))
            collect_seconds = time.perf_counter() - t0
            if k > len(corpus_states.tokens):
                raise ChunkError(f"--k {k} is more chunks than the corpus has tokens ({len(corpus_states.tokens)}); "
                                 "give a smaller --k or a longer corpus.")
            note("states:", f"cached on disk: {len(cache.shards)} safetensors shard(s), "
                            f"{cache.nbytes() / 2**20:.0f} MB in {folder}; one layer in memory at a time", style="dim")
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
        "centring": "raw (not centred): matching and grafting use the raw cosine and projection",
        "objective": "max cosine, Adam projected to the unit sphere, dead chunks re-seeded from worst-covered tokens",
        "threshold": f"quantile {config.threshold_quantile} of the cosines of the tokens each chunk wins",
        "corpus": corpus or spans_path, "context_mode": corpus_states.context_mode,
        "tokens": len(corpus_states.tokens), "corpus_digest": corpus_states.digest, "config": config.to_json(),
        "layers": layer_list, "states": "cached on disk in safetensors shards, read one layer at a time",
        "dead_fraction": {str(l): r["dead_fraction"] for l, r in report.layers.items()}})
    dictionary.notes["discovery"] = runs
    if corpus_states.windowing_note():
        note("note:", corpus_states.windowing_note())
    if not existed:
        dictionary.notes["command"] = command_line()
    path = dictionary.save(target)
    _print_report(report, spans is not None and evaluate)
    console.print(f"wrote [bold]{escape(str(path))}[/]: {added} chunks added, {replaced} replaced, {len(dictionary)} in all; "
                  f"{len(corpus_states.tokens)} tokens; collect {collect_seconds:.1f} s, discovery "
                  f"{sum(r['seconds'] for r in report.layers.values()):.1f} s")
    if json_target is not None:
        doc = report.to_json()
        doc.update(dictionary=str(path), model=loaded.name, corpus=corpus or spans_path,
                   context_mode=corpus_states.context_mode, states="cached on disk (safetensors shards)")
        json_target.write_json(doc)
        console.print(f"wrote {escape(str(json_target.path))}")


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
              help="NAME.chunks.safetensors (an existing file needs --append or --overwrite)")
@_out_options
@click.option("--label", help="concept label for the imported chunks (default: the file name)")
@click.option("--layer", type=int, callback=checked(validate.non_negative_int),
              help="hidden-state index H[l] for files that do not say (overrides the file)")
@click.option("--layer-offset", type=int,
              help="added to layer numbers written in the file (default 1 for control-vector GGUF: llama.cpp's "
                   "direction.il edits block il's output, our H[il+1]; 0 otherwise)")
@click.option("--corpus", type=click.Path(dir_okay=False),
              help="calibrate thresholds and typical projections on this text")
@click.option("--match-rate", default=0.05, show_default=True,
              callback=checked(validate.number_in, lo=0.0, hi=1.0, lo_open=True),
              help="with --corpus: the threshold makes each chunk match this share (0 < r <= 1) of the corpus tokens")
@click.option("--threshold", "default_threshold", default=0.25, show_default=True,
              callback=checked(validate.number_in, lo=-1.0, hi=1.0),
              help="cosine threshold (-1..1) when no --corpus is given")
@friendly_errors
def import_cmd(model_spec, device, dtype, files, out, overwrite, append, label, layer, layer_offset, corpus,
               match_rate, default_threshold) -> None:
    """Import directions made by other tools (.npy, .safetensors, llama.cpp control-vector .gguf) as chunks."""
    from chunktui.shared.texts import read_text
    from chunktui.engine.corpus import collect
    from chunktui.engine.importing import import_file, merge_chunks

    _check_out_mode(out, append, overwrite)
    if label is not None and not label.strip():
        raise ChunkError("--label is empty: give a concept name, or leave it out to use the file name.")
    target = plan_outputs(("--out", out, ".chunks.safetensors"), overwrite=overwrite or append,
                          inputs=[*files, corpus, *model_inputs(model_spec)])
    for f in files:
        if not Path(f).is_file():
            raise ChunkError(f"{f} not found (or is a folder): give a .npy, .safetensors or control-vector .gguf file.")
    if corpus:
        calibration_text = read_text(corpus)
    loaded = load_with_progress(model_spec, device, dtype)
    if layer is not None:
        validate.layers_in_model([layer], loaded.layout.n_states, "--layer")
    dictionary, existed = _open_target(target, loaded.identity(), append)
    if not existed:
        dictionary.notes["command"] = command_line()
    calibration = None
    if corpus:
        calibration = collect(loaded, calibration_text)
        if calibration.windowing_note():
            note("note:", calibration.windowing_note())
    total = 0
    for f in files:
        result = import_file(f, loaded.identity(), label=label, layer=layer, layer_offset=layer_offset,
                             calibration=calibration, match_rate=match_rate, default_threshold=default_threshold)
        added, replaced = merge_chunks(dictionary, result.chunks)
        total += len(result.chunks)
        layers = sorted(c.layer for c in result.chunks)
        hint = result.metadata.get("model_hint")
        console.print(escape(f"{Path(f).name} ({result.format}{', model hint ' + hint if hint else ''}): "
                             f"{len(result.chunks)} chunks '{result.chunks[0].label}' at layers "
                             f"{', '.join(map(str, layers))}; {added} added, {replaced} replaced"))
        for key, why in result.skipped.items():
            note("skipped", f"{key}: {why}")
        if result.metadata.get("layer_count_mismatch"):
            note("note:", result.metadata["layer_count_mismatch"])
    dictionary.notes.setdefault("imported", [])
    dictionary.notes["imported"] = list(dictionary.notes["imported"]) + [Path(f).name for f in files]
    path = dictionary.save(target)
    console.print(f"wrote [bold]{escape(str(path))}[/]: {total} chunks imported, {len(dictionary)} in all")
