"""`chunktui monitor`: rules over many prompts, a corpus or labelled spans; one JSONL line per firing."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click
from rich.markup import escape
from rich.table import Table

from chunktui.cli.common import (checked, console, friendly_errors, load_with_progress, model_inputs, model_options,
                                 note, overwrite_option, plan_outputs, print_error, stage_progress, worker_argv)
from chunktui.cli.rules_options import early_rules, rule_options
from chunktui.paths import DEFAULT_DICT_NAME, sample_path
from chunktui.shared import validate


@click.command("monitor")
@model_options
@click.option("--dict", "dict_path", default=None, help="dictionary (default: the sample dictionary)")
@rule_options
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="generate from each prompt (one per line, # comments) with the rules acting")
@click.option("--generate", "n_new", default=48, show_default=True, callback=checked(validate.max_new_tokens),
              help="tokens to generate per prompt with --prompts")
@click.option("--corpus", type=click.Path(dir_okay=False),
              help="read a text corpus (teacher-forced), labelled with the dictionary's words as `evaluate` does")
@click.option("--spans", "spans_path", type=click.Path(dir_okay=False),
              help="read a JSONL span file (teacher-forced), labelled by its spans")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="write one JSON line per firing here")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the per-rule summary here")
@click.option("--samples", default=1, show_default=True, callback=checked(validate.samples),
              help="continuations per prompt (seeds seed..seed+N-1)")
@click.option("--temperature", default=0.0, show_default=True, callback=checked(validate.temperature),
              help="0 (greedy) to 10")
@click.option("--top-p", default=1.0, show_default=True, callback=checked(validate.top_p), help="in (0, 1]")
@click.option("--seed", default=0, show_default=True, callback=checked(validate.seed))
@click.option("--chat/--no-chat", default=True, show_default=True)
@click.option("--limit", default=0, callback=checked(validate.non_negative_int),
              help="use only the first N prompts of --prompts (0: all)")
@click.option("--batch-size", default=16, show_default=True, callback=checked(validate.count))
@click.option("--procs", default=1, show_default=True, type=int,
              help="processes, launched with torchrun's launcher as `build --procs` does (gloo on CPU, nccl with one "
                   "GPU per process on CUDA); each takes every K-th batch, and --out and the summary are those of "
                   "one process")
@click.option("--resume", is_flag=True,
              help="continue a killed monitor from its checkpoint (OUT.partial/), with the same --procs")
@click.option("--checkpoint-every", default=20, show_default=True, callback=checked(validate.count),
              help="save the firings so far every N batches (per process) to OUT.partial/, for --resume")
@overwrite_option
@friendly_errors
def monitor_cmd(model_spec, device, dtype, dict_path, rule_texts, rule_files, on_prompt, prompts_file, n_new, corpus,
                spans_path, out_path, json_out, samples, temperature, top_p, seed, chat, limit, batch_size, procs,
                resume, checkpoint_every, overwrite) -> None:
    """Run rules over many prompts (--prompts, generating) or texts (--corpus / --spans, reading).

    Writes one JSON line per firing to --out and prints, per rule, how many prompts or contexts it fired
    in and at which token first. With --corpus or --spans each alert rule is also scored against the
    labels its condition names: precision and recall per token, on the same tokens and labels `evaluate`
    uses. --procs K (or `torchrun --nproc-per-node K -m chunktui monitor ...`) deals the batches to K
    processes and gathers the firings: the same --out, in the same order, and the same summary as one
    process. --resume continues a killed run from OUT.partial/ (the build's checkpoints, one per process;
    same command, same --procs)."""
    from chunktui.engine.build import Checkpoint
    from chunktui.engine.distributed import check_procs, launch, launched_by_torchrun, process_group, rank_device
    from chunktui.shared.errors import CorpusError
    from chunktui.shared.rules import RuleError

    if sum(x is not None for x in (prompts_file, corpus, spans_path)) != 1:
        raise CorpusError("Give exactly one of --prompts, --corpus and --spans.")
    if not rule_texts and not rule_files:
        raise RuleError("Give rules to monitor with: --rule \"when cheese -> alert\" or --rules FILE.toml.")
    check_procs(procs, device)
    dict_path = dict_path or sample_path(DEFAULT_DICT_NAME)
    from chunktui.engine.dictionary import load_dictionary

    dictionary = load_dictionary(dict_path)  # a damaged dictionary is reported before the model loads
    rules = early_rules(rule_texts, rule_files, dictionary)
    prompts = None
    if prompts_file is not None:
        from chunktui.shared.texts import read_text

        prompts = [p.strip() for p in read_text(prompts_file).splitlines() if p.strip() and not p.startswith("#")]
        if not prompts:
            raise CorpusError(f"{prompts_file} holds no prompts (blank lines and lines starting with # are skipped).")
        prompts = prompts[:limit] if limit else prompts
        if seed + samples - 1 > validate.SEED_MAX:
            raise validate.InvalidValue(f"--seed {seed} with --samples {samples} runs past the largest seed "
                                        f"({validate.SEED_MAX}).")
        batches = -(-len(prompts) * samples // batch_size)
        if procs > batches:
            from chunktui.engine.rules import too_many_processes

            raise CorpusError(too_many_processes(procs, batches, batch_size))
    partial = out_path + ".partial"
    if os.path.lexists(partial) and not os.path.isdir(partial):
        raise CorpusError(f"{partial} exists and is not a folder; monitor keeps its checkpoints there. Remove it "
                          "or choose another --out.")
    inputs = [dict_path, prompts_file, corpus, spans_path, *rule_files, *model_inputs(model_spec)]
    outputs = (("--out", out_path, None), ("--json", json_out, None))
    if not launched_by_torchrun():
        Checkpoint.check_procs(partial, procs, resume)
    if procs > 1 and not launched_by_torchrun():
        from chunktui.shared.outputs import plan_outputs as check

        for target in check(outputs, inputs=[i for i in inputs if i], overwrite=overwrite):
            if target is not None:  # checked here, before any model loads; rank 0 locks them
                target.release()
        sys.exit(launch(procs, ["monitor", *worker_argv(click.get_current_context(), "procs")]))

    group = process_group(device)
    try:
        _monitor(group, model_spec, rank_device(device), dtype, dictionary, rules, on_prompt, prompts, n_new, corpus,
                 spans_path, outputs, inputs, samples, temperature, top_p, seed, chat, batch_size, resume,
                 checkpoint_every, overwrite, partial)
    finally:
        group.close()


def _monitor(group, model_spec, device, dtype, dictionary, rules, on_prompt, prompts, n_new, corpus, spans_path,
             outputs, inputs, samples, temperature, top_p, seed, chat, batch_size, resume, checkpoint_every, overwrite, partial):
    """One process's share (all of it in one process). Rank 0 prints and writes; every rank ends together."""
    from chunktui.engine.build import Checkpoint

    main = group.is_main
    out_target, json_target = plan_outputs(*outputs, overwrite=overwrite, inputs=inputs) if main else (None, None)
    loaded = load_with_progress(model_spec, device, dtype, quiet=not main)
    dictionary.check_compatible(loaded.identity())
    from chunktui.api import Engine

    engine = Engine.from_loaded(loaded, dictionary)
    program = engine.rules(rules, on_prompt=on_prompt)
    from chunktui.engine.monitor import rule_summary

    checkpoint = Checkpoint(partial, every=checkpoint_every, resume=resume)
    progress, update = stage_progress()
    if not main:
        update = lambda *a: None  # noqa: E731  one bar, on rank 0
    bar = progress if main else contextlib.nullcontext()
    summary: dict = {"model": loaded.name, "dictionary": str(dictionary.path), "rules": program.describe()}
    if prompts is not None:
        from chunktui.engine.context import fit_prompt
        from chunktui.engine.rules import generate_rows
        from chunktui.shared.settings import Sampling

        prompts = [fit_prompt(loaded, p, n_new, chat=chat).text for p in prompts]
        sampling = Sampling(max_new_tokens=n_new, temperature=temperature, top_p=top_p, seed=seed)
        mark = "" if group.world_size == 1 else f" (rank 0 of {group.world_size})"
        with bar:
            runs = generate_rows(loaded, prompts, samples, sampling, program, chat, batch_size,
                                 progress=lambda d, t: update("monitor", d / t, f"{d}/{t} rows{mark}"),
                                 checkpoint=checkpoint, group=group)
        firings = [f for r in runs for f in r.firings]
        tokens = sum(len(r.ids) for r in runs)
        per_rule = rule_summary(program, firings, len(prompts), "prompt")
        summary.update(prompts=len(prompts), samples=samples, rows=len(runs), tokens=tokens, rules_summary=per_rule,
                       settings=dict(sampling.describe(), chat=chat),
                       finished={k: sum(r.finished == k for r in runs) for k in ("eos", "length", "rule")})
        scores = {}
        unit, rows = "prompts", len(prompts)
    else:
        from chunktui.engine.build import LabelSource
        from chunktui.engine.corpus import schedule
        from chunktui.engine.labels import labelled_corpus
        from chunktui.engine.monitor import monitor_texts
        from chunktui.engine.rules import too_many_processes
        from chunktui.shared.texts import read_text

        source = LabelSource(corpus=read_text(corpus) if corpus else None, spans_path=spans_path)
        text_corpus, labels = labelled_corpus(loaded, dictionary, source)
        batches = len(schedule(text_corpus, batch_size))
        if group.world_size > batches:  # every rank finds it alike: rank 0 says so, and all leave with exit 2
            if main:
                print_error(too_many_processes(group.world_size, batches, batch_size))
            group.barrier()
            sys.exit(2)
        with bar:
            found = monitor_texts(loaded, program, text_corpus, labels, batch_size,
                                  progress=lambda frac: update("monitor", frac, "reading"), checkpoint=checkpoint,
                                  group=group)
        firings, tokens, scores = found.firings, found.tokens, found.scores
        per_rule = rule_summary(program, firings, found.contexts, "context")
        summary.update(contexts=found.contexts, tokens=tokens, rules_summary=per_rule, scores=scores,
                       seconds=round(found.seconds, 3), tokens_per_second=round(tokens / max(found.seconds, 1e-9), 1))
        unit, rows = "contexts", found.contexts
        if main and any(rule.action.kind != "alert" for rule in program.rules):
            note("note:", "the texts are read, not generated: stops and interventions are recorded, not applied")
    resumed = sum(group.all_gather_json(getattr(checkpoint, "resumed", 0)))
    summary.update(procs=group.world_size, resumed_batches=resumed)
    if main:
        _report(out_target, json_target, summary, firings, per_rule, scores, unit, rows, tokens, resumed)
    group.barrier()  # everything is written before any process removes its checkpoint
    checkpoint.clear()  # everything is written: the checkpoint has done its job


def _report(out_target, json_target, summary, firings, per_rule, scores, unit, rows, tokens, resumed) -> None:
    out_target.write_text("".join(json.dumps(f.to_json(), ensure_ascii=False) + "\n" for f in firings))
    table = Table(title=f"{len(firings)} firings over {rows} {unit}, {tokens} tokens")
    for col in ("rule", "action", "firings", unit, "first tokens"):
        table.add_column(col, justify="left" if col in ("rule", "action", "first tokens") else "right")
    for name, s in per_rule.items():
        first = s["first_token"]
        shown = ", ".join(f"{k}:{v}" for k, v in list(first.items())[:6]) + (" ..." if len(first) > 6 else "")
        table.add_row(escape(name), escape(s["action"]), str(s["firings"]), f"{s[unit[:-1] + 's_fired']}/{rows}",
                      escape(shown) or "-")
    console.print(table)
    if scores:
        t2 = Table(title="alert rules against the labels (per token)")
        for col in ("rule", "labels", "alerts", "labelled", "precision", "recall", "fp rate"):
            t2.add_column(col, justify="left" if col in ("rule", "labels") else "right")
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        for name, s in scores.items():
            t2.add_row(escape(name), escape(",".join(s["labels"])), str(s.get("alerts", "-")),
                       str(s.get("positives", "-")), fmt(s["precision"]), fmt(s["recall"]), fmt(s.get("fp_rate")))
        console.print(t2)
    if resumed:
        note("resumed", f"{resumed} batch{'es' if resumed != 1 else ''} from the checkpoint", style="default")
    note("wrote", str(out_target.path), style="default")
    if json_target is not None:
        json_target.write_json(summary)
        note("wrote", str(json_target.path), style="default")
