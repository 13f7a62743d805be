"""`chunktui models | build | evaluate | inspect`."""

from __future__ import annotations

import os
import sys
import time

import click
from rich.table import Table
from rich.text import Text

from rich.markup import escape

from chunktui.cli.common import (checked, command_line, console, friendly_errors, load_with_progress, model_inputs,
                                 model_options, note, overwrite_option, plan_outputs, stage_progress, worker_argv)
from chunktui.shared import validate
from chunktui.shared.errors import ChunkError


@click.command("models")
def models_cmd() -> None:
    """List the model specs chunktui accepts."""
    from chunktui.engine.models import cache_dir
    from chunktui.shared.specs import describe_specs

    table = Table(title="Model specs", show_lines=False)
    table.add_column("spec", style="bold cyan")
    table.add_column("what it is")
    for spec, text in describe_specs():
        table.add_row(spec, text)
    console.print(table)
    console.print(f"[dim]fetched and converted models are cached in {cache_dir()} ($CHUNKTUI_CACHE)[/]")


@click.command("build")
@model_options
@click.option("--corpus", type=click.Path(dir_okay=False), help="training text (UTF-8)")
@click.option("--words", help="comma-separated concept words, or @FILE with one word per line")
@click.option("--spans", "spans_path", type=click.Path(dir_okay=False), help="JSONL file of labelled spans instead of words")
@click.option("--layers", default="all", show_default=True, callback=checked(validate.layer_spec),
              help="'all', '5', '2-9' or '0,4,8-10' (ranges low-high)")
@click.option("--n", default=None, type=int, callback=checked(validate.count),
              help="positives drawn for the template (>= 1)  [default: 5; fp-budget: all positives]")
@click.option("--criterion", default="accuracy", show_default=True,
              help="accuracy, f1 or balanced (the paper's threshold: the largest deviation among the n drawn), "
                   "or fp-budget:B (threshold calibrated to a training FP rate <= B, e.g. fp-budget:0.001)")
@click.option("--seed", default=0, show_default=True, callback=checked(validate.seed))
@click.option("--method", default="population-averaging", show_default=True,
              type=click.Choice(["population-averaging", "mean-difference"]),
              help="PA chunks (subpopulation + template), or mean-difference direction chunks (concept mean minus "
                   "corpus mean, cosine threshold calibrated to --criterion fp-budget:B, default fp-budget:0.001)")
@click.option("--part-word", is_flag=True, help="also label tokens that contain or end the word")
@click.option("--step", default=0, show_default=True, callback=checked(validate.non_negative_int),
              help="label the token STEP positions before each occurrence (>= 0)")
@click.option("--min-count", default=5, show_default=True, callback=checked(validate.count),
              help="skip words with fewer occurrences (>= 1)")
@click.option("--context", "context_mode", default="sentence", show_default=True, type=click.Choice(["sentence", "window"]),
              help="one forward pass per sentence (the paper) or sliding windows")
@click.option("--batch-size", default=16, show_default=True, callback=checked(validate.count))
@click.option("--store-dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]),
              help="kept for old scripts: the build streams and stores no hidden states")
@click.option("--procs", default=1, show_default=True, type=int,
              help="processes (one per GPU on CUDA), launched with torchrun's launcher; gloo on CPU, nccl on CUDA")
@click.option("--resume", is_flag=True, help="continue a killed build from its checkpoint (OUT.partial/)")
@click.option("--checkpoint-every", default=500, show_default=True, type=int,
              help="save the counts every N contexts (per process) to OUT.partial/, for --resume")
@click.option("--colour-budget", default=0.01, show_default=True, callback=checked(validate.colour_budget),
              help="the colour rule: at most this share of the training tokens that are no concept get a colour "
                   "(calibrated in a third pass over the corpus)")
@click.option("--vote-layers", default=None, callback=checked(validate.layer_spec),
              help="the layers whose chunks vote on a token's colour  [default: every built layer but 0, the "
                   "embedding, which is a lookup of the token itself]")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="write a summary: seconds, tokens, peak memory, world size")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="NAME.chunks.safetensors")
@overwrite_option
@friendly_errors
def build_cmd(model_spec, device, dtype, corpus, words, spans_path, layers, n, criterion, seed, method, part_word, step,
              min_count, context_mode, batch_size, store_dtype, procs, resume, checkpoint_every, colour_budget,
              vote_layers, json_out, out, overwrite) -> None:
    """Build a chunk dictionary by population averaging (docs/method.md), streaming over the corpus.

    Hidden states are never kept: pass 1 runs the contexts holding the drawn
    positives, pass 2 runs every context once and counts matches. With
    --procs K (or under `torchrun --nproc-per-node K -m chunktui build ...`)
    the contexts are split across K processes and the counts merged; the
    dictionary is the same as with one.
    """
    from pathlib import Path

    from chunktui.engine.build import Checkpoint, LabelSource, build_dictionary
    from chunktui.shared.texts import read_text
    from chunktui.engine.distributed import check_procs, launch, launched_by_torchrun, process_group, rank_device
    from chunktui.shared.errors import CorpusError
    from chunktui.shared.validate import parse_layers
    from chunktui.engine.labels import read_spans, read_word_list
    from chunktui.engine.pa import parse_criterion

    if bool(words) == bool(spans_path):
        raise CorpusError("Give exactly one of --words and --spans.")
    if words and not corpus:
        raise CorpusError("--words needs a --corpus to find them in.")
    word_file = words[1:] if words and words.startswith("@") else None
    check_procs(procs, device)
    if checkpoint_every < 1:
        raise CorpusError(f"--checkpoint-every must be at least 1 context, got {checkpoint_every}.")
    if method == "mean-difference":
        from click.core import ParameterSource

        ctx = click.get_current_context()
        if ctx.get_parameter_source("criterion") == ParameterSource.DEFAULT:
            criterion = ctx.params["criterion"] = "fp-budget:0.001"  # (workers of --procs get it spelled out)
        if n is not None:
            raise CorpusError("--n draws positives for a PA template; --method mean-difference uses every positive.")
        if resume:
            raise CorpusError("--resume continues a PA build from its checkpoint; a --method mean-difference build "
                              "keeps none (run it again).")
    crit = parse_criterion(criterion)
    if method == "mean-difference" and not crit.calibrated:
        raise CorpusError(f"--method mean-difference calibrates a cosine threshold to a false-positive budget: give "
                          f"--criterion fp-budget:B (e.g. fp-budget:0.001), not {criterion}.")
    word_list = None
    if words:
        word_list = read_word_list(word_file) if word_file else [w for w in words.split(",") if w.strip()]
        if not word_list:
            raise CorpusError("--words names no words.")
        from chunktui.shared.texts import merge_duplicate_words

        word_list, merged = merge_duplicate_words(word_list)
        if merged:
            note("note:", merged)
    text = read_text(corpus) if corpus else None
    if spans_path:
        read_spans(spans_path)  # a malformed span file is reported before the model loads
    partial = Path(out + ".partial")
    if os.path.lexists(partial) and not partial.is_dir():
        raise CorpusError(f"{partial} exists and is not a folder; the build keeps its checkpoints there. Remove it "
                          "or choose another --out.")
    out_inputs = [corpus, spans_path, word_file, *model_inputs(model_spec)]
    if not launched_by_torchrun():
        Checkpoint.check_procs(partial, procs, resume)
    if procs > 1 and not launched_by_torchrun():
        from chunktui.shared.outputs import plan_outputs as check

        for target in check([("--out", out, ".chunks.safetensors"), ("--json", json_out, None)], inputs=out_inputs,
                            overwrite=overwrite):  # checked here, before any model loads; rank 0 locks them
            if target is not None:
                target.release()
        ctx = click.get_current_context()
        code = launch(procs, ["build", *worker_argv(ctx, "procs")])
        sys.exit(code)

    group = process_group(device)
    try:
        main = group.is_main
        targets = (plan_outputs(("--out", out, ".chunks.safetensors"), ("--json", json_out, None),
                                overwrite=overwrite, inputs=out_inputs) if main else (None, None))
        out_target, json_target = targets
        loaded = load_with_progress(model_spec, rank_device(device), dtype, quiet=not main)
        source = LabelSource(corpus=text, corpus_name=corpus or "", words=word_list, spans_path=spans_path,
                             label_mode="part-word" if part_word else "exact", step=step, min_count=min_count)
        checkpoint = Checkpoint(out + ".partial", every=checkpoint_every, resume=resume)
        progress, update = stage_progress()
        if not main:
            update = lambda *a: None  # noqa: E731  one bar, on rank 0
        with progress if main else _nothing():
            if method == "mean-difference":
                from chunktui.engine.meandiff import build_mean_difference

                dictionary, report = build_mean_difference(
                    loaded, source, layers=parse_layers(layers, loaded.layout.n_states), budget=crit.budget,
                    batch_size=batch_size, context_mode=context_mode, progress=update, group=group,
                    colour_budget=colour_budget,
                    vote_layers=None if vote_layers is None else parse_layers(vote_layers, loaded.layout.n_states))
            else:
                dictionary, report = build_dictionary(
                    loaded, source, layers=parse_layers(layers, loaded.layout.n_states), n=n, criterion=str(crit),
                    seed=seed, context_mode=context_mode, batch_size=batch_size, progress=update, group=group,
                    checkpoint=checkpoint, colour_budget=colour_budget,
                    vote_layers=None if vote_layers is None else parse_layers(vote_layers, loaded.layout.n_states))
        dictionary.notes["command"] = command_line()  # every option, so the file can be rebuilt
        dictionary.notes["world_size"] = group.world_size
        group.barrier()  # every rank has finished with its checkpoint before it is removed
        if main:
            path = dictionary.save(out_target)
        checkpoint.clear()
        if not main:
            return
        for word, why in report.skipped.items():
            note("skipped", f"{word}: {why}")
        grouped: dict[tuple[str, str], list[str]] = {}
        for where, why in report.unfit.items():
            label, _, layer = where.rpartition("@")
            grouped.setdefault((label, why), []).append(layer)
        for (label, why), at in grouped.items():
            note("note:", f"{label}: no chunk at layer{'s' if len(at) > 1 else ''} {', '.join(at)}: {why}")
        if dictionary.notes.get("windowed"):
            note("note:", dictionary.notes["windowed"])
        if n is not None:
            fewer = sorted({c.label for c in dictionary.chunks if isinstance(c.fit.get("n"), int) and c.fit["n"] < n})
            if fewer:
                note("note:", f"--n {n}: {', '.join(fewer)} had fewer positives, so every positive was drawn")
        passes = (f"sums {report.collect_seconds:.1f} s, cosines {report.fit_seconds:.1f} s, colour rule "
                  f"{report.calibrate_seconds:.1f} s"
                  if method == "mean-difference" else
                  f"templates {report.collect_seconds:.1f} s, counting {report.fit_seconds:.1f} s, colour rule "
                  f"{report.calibrate_seconds:.1f} s")
        console.print(f"wrote [bold]{escape(str(path))}[/]: {len(dictionary)} chunks, {len(dictionary.labels())} "
                      f"concepts x {len(report.layers)} layers ({escape(method)}, {escape(str(crit))}); "
                      f"{report.tokens} tokens in {report.seconds:.1f} s ({passes}) on "
                      f"{group.world_size} process{'es' if group.world_size > 1 else ''}")
        console.print(f"colour rule: {escape(dictionary.token_rule().describe())}", style="dim")
        if json_target is not None:
            try:
                json_target.write_json(dict(report.summary(), dictionary=str(path), criterion=str(crit),
                                            device=str(loaded.device)))
            except ChunkError as err:
                raise ChunkError(f"The dictionary {path} was written; only the --json summary was not: {err}") \
                    from None
            console.print(f"wrote {json_out}", markup=False)
    finally:
        group.close()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@click.command("evaluate")
@model_options
@click.option("--dict", "dict_path", required=True, type=click.Path(dir_okay=False))
@click.option("--corpus", type=click.Path(dir_okay=False), help="held-out text for word chunks")
@click.option("--spans", "spans_path", type=click.Path(dir_okay=False), help="held-out JSONL spans for span chunks")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write one record per chunk")
@overwrite_option
@click.option("--by-layer/--summary", default=False, help="print every chunk, not only the per-concept means")
@click.option("--batch-size", default=16, show_default=True, callback=checked(validate.count))
@click.option("--store", is_flag=True,
              help="also write the figures into the dictionary (each chunk's held-out block, replaced atomically): "
                   "the app's Chunks table shows them")
@friendly_errors
def evaluate_cmd(model_spec, device, dtype, dict_path, corpus, spans_path, json_out, overwrite, by_layer,
                 batch_size, store) -> None:
    """Evaluate a dictionary on held-out text: TP rate, FP rate, accuracy per chunk and layer."""
    from chunktui.engine.build import LabelSource, evaluate_dictionary, summarise_by_label
    from chunktui.shared.texts import read_text
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.shared.errors import CorpusError
    if bool(corpus) == bool(spans_path):
        raise CorpusError("Give exactly one of --corpus and --spans.")
    from chunktui.engine.labels import read_spans

    dictionary = load_dictionary(dict_path)
    corpus_text = read_text(corpus) if corpus else None
    if spans_path:
        read_spans(spans_path)
    if store:
        import os
        from pathlib import Path

        from chunktui.shared.errors import DictionaryError

        folder = Path(dict_path).resolve().parent
        if not os.access(folder, os.W_OK) or not os.access(dict_path, os.W_OK):
            raise DictionaryError(f"--store: {dict_path} cannot be replaced (no write permission here).")
    target = plan_outputs(("--json", json_out, None), overwrite=overwrite,
                          inputs=[dict_path, corpus, spans_path, *model_inputs(model_spec)])
    loaded = load_with_progress(model_spec, device, dtype)
    source = LabelSource(corpus=corpus_text, corpus_name=corpus or "", spans_path=spans_path)
    progress, update = stage_progress()
    t0 = time.perf_counter()
    token_level: dict = {}
    with progress:
        records, hs = evaluate_dictionary(loaded, dictionary, source, batch_size=batch_size, progress=update,
                                          token_level=token_level)
    summary = summarise_by_label(records)
    if hs.windowing_note():
        note("note:", hs.windowing_note())
    if by_layer:
        table = Table(title=escape(f"{dictionary.path.name} on {corpus or spans_path} (per chunk)"))
        for col in ("chunk", "layer", "positives", "TP rate", "FP rate", "accuracy"):
            table.add_column(col, justify="right" if col != "chunk" else "left")
        for r in records:
            if r.get("tp_rate") is None:
                table.add_row(escape(r["id"]), str(r["layer"]), "0", "-", "-", "-")
            else:
                table.add_row(escape(r["id"]), str(r["layer"]), str(r["positives"]), f"{r['tp_rate']:.3f}",
                              f"{r['fp_rate']:.4f}", f"{r['accuracy']:.4f}")
        console.print(table)
    table = Table(title=f"Held-out evaluation: mean over layers ({len(hs.tokens)} tokens, "
                        f"{time.perf_counter() - t0:.1f} s)")
    for col in ("concept", "layers", "positives", "TP rate", "FP rate", "accuracy"):
        table.add_column(col, justify="left" if col == "concept" else "right")
    for label, agg in summary.items():
        table.add_row(escape(label), str(agg["layers"]), str(agg["positives"]), f"{agg['tp_rate']:.3f}",
                      f"{agg['fp_rate']:.4f}", f"{agg['accuracy']:.4f}")
    console.print(table)
    tl = token_level
    console.print(f"colour rule on this text: {tl['coloured_non_concept']} of {tl['non_concept']} non-concept tokens "
                  f"shown with a concept ({tl['rate']:.2%}); {tl['shown_own']} of {tl['concept_tokens']} concept "
                  f"tokens show their own concept ({tl['recall']:.1%})" + ("" if tl["calibrated"] else
                                                                       " [uncalibrated rule]"), markup=False)
    missing = sorted({r["label"] for r in records if r.get("tp_rate") is None})
    if missing:
        note("not in the held-out text:", ", ".join(missing))
    if store:
        from pathlib import Path

        from chunktui.engine.build import store_heldout

        stored = store_heldout(dictionary, records, Path(corpus or spans_path).name, hs.digest)
        dictionary.save(dict_path)
        console.print(Text(f"stored held-out figures of {stored} of {len(dictionary.chunks)} chunks in {dict_path}"))
    if target is not None:
        target.write_json({"dictionary": str(dictionary.path), "corpus": corpus or spans_path,
                              "tokens": len(hs.tokens), "chunks": records, "by_label": summary,
                              "colour_rule": token_level})
        console.print(f"wrote {escape(str(target.path))}")


@click.command("calibrate")
@model_options
@click.option("--dict", "dict_path", required=True, type=click.Path(dir_okay=False))
@click.option("--corpus", type=click.Path(dir_okay=False), help="the dictionary's training text (word chunks)")
@click.option("--spans", "spans_path", type=click.Path(dir_okay=False), help="its training JSONL spans (span chunks)")
@click.option("--budget", default=0.01, show_default=True, callback=checked(validate.colour_budget),
              help="at most this share of the tokens that are no concept get a colour")
@click.option("--batch-size", default=16, show_default=True, callback=checked(validate.count))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="NAME.chunks.safetensors to write")
@overwrite_option
@friendly_errors
def calibrate_cmd(model_spec, device, dtype, dict_path, corpus, spans_path, budget, batch_size, out,
                  overwrite) -> None:
    """Add (or redo) a dictionary's colour rule: which concept a token shows, calibrated on its training text.

    A token shows a concept when the concept's chunks at layers 1+ agree enough; the evidence needed is set
    per concept so that at most --budget of the training tokens that are no concept get a colour. Dictionaries
    made by `chunktui build` carry one already; older ones colour by any matching chunk until calibrated."""
    from chunktui.engine.build import LabelSource
    from chunktui.engine.calibrate import calibrate_dictionary
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.engine.labels import read_spans
    from chunktui.shared.errors import CorpusError
    from chunktui.shared.texts import read_text

    if bool(corpus) == bool(spans_path):
        raise CorpusError("Give exactly one of --corpus and --spans (the dictionary's training text).")
    dictionary = load_dictionary(dict_path)
    corpus_text = read_text(corpus) if corpus else None
    if spans_path:
        read_spans(spans_path)
    target = plan_outputs(("--out", out, ".chunks.safetensors"), overwrite=overwrite,
                          inputs=[corpus, spans_path, *model_inputs(model_spec)])
    loaded = load_with_progress(model_spec, device, dtype)
    source = LabelSource(corpus=corpus_text, corpus_name=corpus or "", spans_path=spans_path)
    progress, update = stage_progress()
    t0 = time.perf_counter()
    rate = {"done": 0}

    def step(k: int) -> None:
        rate["done"] += k
        update("calibrate", None, f"{rate['done']} tokens")

    with progress:
        rule = calibrate_dictionary(loaded, dictionary, source, budget=budget, batch_size=batch_size, progress=step)
    dictionary.notes["calibrate_command"] = command_line()
    path = dictionary.save(target)
    o = rule.overall
    console.print(f"wrote [bold]{escape(str(path))}[/] in {time.perf_counter() - t0:.1f} s: on its training text "
                  f"{o['coloured_non_concept']} of {o['non_concept']} non-concept tokens coloured "
                  f"({o['rate']:.2%}, budget {budget:.2%})")


@click.command("inspect")
@click.argument("dict_path", type=click.Path(dir_okay=False))
@click.option("--chunks", "show_chunks", is_flag=True, help="list every chunk")
@click.option("--cards", "show_cards", is_flag=True, help="print the chunk cards stored with discovered chunks")
@friendly_errors
def inspect_cmd(dict_path, show_chunks, show_cards) -> None:
    """Summarise a dictionary file."""
    from chunktui.engine.dictionary import load_dictionary

    d = load_dictionary(dict_path)
    m = d.model
    console.print(f"[bold]{escape(d.path.name)}[/]  ({len(d)} chunks, created {escape(str(d.created or '?'))})")
    console.print(escape(f"model: {m.get('name')}  {m.get('architecture', '')}  width {m.get('hidden_size')}  "
                         f"layers {m.get('n_layers')}  weights {m.get('fingerprint_digest')}"))
    if d.notes:
        console.print(Text("built: " + ", ".join(f"{k}={v}" if not isinstance(v, (list, dict)) else f"{k}=({len(v)} records)"
                                            for k, v in d.notes.items() if k != "command")))
        if d.notes.get("command"):
            console.print(Text(str(d.notes["command"]), style="dim"))
    table = Table(title="Concepts")
    for col in ("concept", "kind", "layers", "mean size", "mean fit TP", "mean fit FP"):
        table.add_column(col, justify="left" if col in ("concept", "kind") else "right")
    by_label: dict[str, list] = {}
    for c in d.chunks:
        by_label.setdefault(c.label, []).append(c)
    for label, chunks in by_label.items():
        tps = [c.fit.get("tp_rate") for c in chunks if c.fit.get("tp_rate") is not None]
        fps = [c.fit.get("fp_rate") for c in chunks if c.fit.get("fp_rate") is not None]
        layers = sorted(c.layer for c in chunks)
        span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
        table.add_row(escape(label), chunks[0].kind, f"{len(layers)} ({span})", f"{sum(c.size for c in chunks) / len(chunks):.0f}",
                      f"{sum(tps) / len(tps):.3f}" if tps else "-", f"{sum(fps) / len(fps):.4f}" if fps else "-")
    console.print(table)
    if show_chunks:
        t = Table(title="Chunks")
        for col in ("id", "layer", "size", "threshold", "tolerance", "fit TP", "fit FP"):
            t.add_column(col)
        for c in d.chunks:
            t.add_row(escape(c.id), str(c.layer), str(c.size), f"{c.threshold:.4g}",
                      f"{c.tolerance:.3g}" if c.tolerance is not None else "-",
                      _rate(c.fit.get("tp_rate"), 3), _rate(c.fit.get("fp_rate"), 4))
        console.print(t)
    if show_cards:
        from chunktui.engine.cards import stored_card

        cards = [card for card in (stored_card(c) for c in d.chunks) if card is not None]
        if not cards:
            console.print("[dim]no stored cards: cards are written by `chunktui discover`[/]")
        for card in cards:
            console.print(card.text(), markup=False, highlight=False)


def _rate(value, digits: int) -> str:
    """A stored fit rate for a table cell ('-' when the file has none)."""
    return "-" if value is None else f"{value:.{digits}f}"
