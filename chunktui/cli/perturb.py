"""`chunktui perturb`: graft or suppress chunks and compare against an unperturbed run.

Every arm's occurrence rate comes with a Wilson 95% interval, every arm with
its fluency (perplexity under the unperturbed model, degenerate answers);
`--control` adds a random control intervention of the same size and
`--sweep` several strengths in one table. Progress goes to stderr: a bar on a
terminal, else plain lines (a line per batch and per finished prompt).
"""

from __future__ import annotations

import contextlib
import time

import click
from rich import box
from rich.markup import escape
from rich.table import Table

from chunktui.cli.rules_options import early_rules, print_firings, rule_options
from chunktui.cli.common import (checked, console, err_console, friendly_errors, load_with_progress, model_inputs,
                                 model_options, note, overwrite_option, plan_outputs, stage_progress)
from chunktui.shared import validate
from click.core import ParameterSource

from chunktui.shared.perturb_stats import rate_text
from chunktui.shared.reports import layer_diff_lines
from chunktui.shared.settings import (CONTROL_KINDS, DEFAULT_LAYERS, DEFAULT_POSITIONS, DEFAULT_SAMPLES, DEFAULT_SITE,
                                      MODES, PROTOCOLS, SITES, protocol_lines, resolve_protocol)
from chunktui.paths import DEFAULT_DICT_NAME, sample_path


@click.command("perturb")
@model_options
@click.option("--dict", "dict_path", default=None, help="dictionary (default: the sample dictionary)")
@click.option("--chunk", "chunk_names", default=None,
              help="LABEL[,LABEL] or chunk ids (or, instead, --rule/--rules: compare a guarded run)")
@click.option("--mode", default="graft", show_default=True,
              type=click.Choice(list(MODES)))
@click.option("--strength", type=float, default=None,
              help="a for graft/amplify, b for freeze/suppress (default: graft 0.05, amplify 2, freeze 1, suppress 0.5, "
                   "mean-ablate 1). The sample dictionary's chunks are wide (most neurons), so a = 1 all but "
                   "replaces the state and breaks the answer; 0.05 on every prompt token steers it. Range: graft, amplify, mean-ablate "
                   "0 < a <= 10; freeze, suppress 0 < b <= 1")
@click.option("--layers", default=DEFAULT_LAYERS, show_default=True, callback=checked(validate.layer_spec),
              help="each layer uses the concept's chunk of that layer; 'all' = every block (0..L-1), since the "
                   "final norm's output L cannot be edited")
@click.option("--positions", default=DEFAULT_POSITIONS, show_default=True,
              help="prompt, prompt-last:K, prompt[START:STOP] (a Python slice over the prompt's tokens: "
                   "prompt[-4:-1] is the three before the last), generated or all")
@click.option("--site", default=DEFAULT_SITE, show_default=True, type=click.Choice(list(SITES)),
              help="residual: edit the stream entering each block; attention: edit only the input of each "
                   "block's attention-side norm (input_layernorm, ln_1), leaving the residual stream as it was")
@click.option("--protocol", default="default", show_default=True, type=click.Choice(list(PROTOCOLS)),
              help="paper: the paper's question experiment (residual site, blocks 2-9, prompt[-4:-1], graft to the "
                   "template exactly, freeze to 0, top-p 0.9 in both arms, T 0.6, no chat template, 190 new "
                   "tokens); options you give override it")
@click.option("--paper-confounds", is_flag=True,
              help="add the paper code's three deviations (chunk of layer l-1 at block l; control top-p 0.5 vs "
                   "perturbed 0.9; scoring includes the prompt), to measure how much they move the result; "
                   "implies --protocol paper")
@click.option("--prompt", help="one prompt")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="file of prompts, one per line (# comments), or .jsonl with a \"prompt\" field per line")
@click.option("--limit", default=0, callback=checked(validate.non_negative_int),
              help="use only the first N prompts of --prompts (0: all)")
@click.option("--samples", default=DEFAULT_SAMPLES, show_default=True, callback=checked(validate.samples),
              help="continuations per prompt in each arm (seeds seed..seed+N-1); rates get Wilson 95% intervals")
@click.option("--sweep", default=None, metavar="A,B,...",
              help="several strengths in one run and one table (the control arm is generated once); "
                   "replaces --strength")
@click.option("--control", "control_kind", type=click.Choice(list(CONTROL_KINDS)), default=None,
              help="add a random control intervention of the same size: 'subpopulation' (PA chunks on a random "
                   "subpopulation of the same size, direction chunks on a random direction of the same norm) or "
                   "'direction' (each position's edit, same norm, along a random direction)")
@click.option("--control-seed", default=0, show_default=True, callback=checked(validate.seed),
              help="seed of the control intervention's random subpopulation or direction")
@click.option("--max-new-tokens", default=48, show_default=True, callback=checked(validate.max_new_tokens))
@click.option("--temperature", default=0.8, show_default=True, callback=checked(validate.temperature),
              help="0 (greedy) to 10")
@click.option("--top-p", default=0.9, show_default=True, callback=checked(validate.top_p), help="in (0, 1]")
@click.option("--seed", default=0, show_default=True, callback=checked(validate.seed))
@click.option("--chat/--no-chat", default=True, show_default=True)
@click.option("--truncate", is_flag=True,
              help="cut prompts that leave no room for --max-new-tokens in the model's context, from the start")
@click.option("--batch-size", default=16, show_default=True, callback=checked(validate.count))
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
@rule_options
@overwrite_option
@click.option("--show", default=3, show_default=True, callback=checked(validate.non_negative_int),
              help="print this many pairs of continuations")
@click.pass_context
@friendly_errors
def perturb_cmd(ctx, model_spec, device, dtype, dict_path, chunk_names, mode, strength, layers, positions, site,
                protocol, paper_confounds, prompt, prompts_file, limit, samples, sweep, control_kind, control_seed,
                max_new_tokens, temperature, top_p, seed, chat, truncate, batch_size, json_out, rule_texts, rule_files,
                on_prompt, overwrite, show) -> None:
    """Regenerate with chunks grafted or suppressed; identical sampling and seeds in every arm.

    With --rule/--rules instead of --chunk: the rules act on the generated tokens, and on the prompt as
    --on-prompt says (guarded arm), and the unguarded arm records where they would have fired; identical
    sampling and seeds in both arms."""
    from chunktui.api import Engine
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.shared.errors import CorpusError
    from chunktui.engine.perturb import Positions
    from chunktui.shared.settings import Sampling

    if (prompt is None) == (prompts_file is None):
        raise CorpusError("Give exactly one of --prompt and --prompts.")
    guarded = bool(rule_texts or rule_files)
    if guarded == (chunk_names is not None):
        raise CorpusError("Give --chunk (perturb those chunks) or --rule/--rules (compare a guarded run), "
                          "not both and not neither.")
    strength = validate.strength(strength, mode, "--strength")
    strengths = validate.strengths(sweep, mode, "--sweep")
    if strengths is not None and strength is not None:
        raise validate.InvalidValue("Give --strength or --sweep, not both (a sweep lists its strengths).")
    given = {key: value for key, value in (("layers", layers), ("positions", positions), ("site", site),
                                           ("strength", strength), ("top_p", top_p), ("temperature", temperature),
                                           ("chat", chat), ("max_new_tokens", max_new_tokens))
             if ctx.get_parameter_source(key) not in (ParameterSource.DEFAULT, None)}
    settings = resolve_protocol(protocol, paper_confounds, mode, given)
    layers, positions, site, strength = settings["layers"], settings["positions"], settings["site"], settings["strength"]
    top_p, temperature, chat = settings["top_p"], settings["temperature"], settings["chat"]
    max_new_tokens = settings["max_new_tokens"]
    where = Positions.parse(positions)
    if not guarded:
        validate.chunk_names(chunk_names, "--chunk")
    if seed + samples - 1 > validate.SEED_MAX:
        raise validate.InvalidValue(f"--seed {seed} with --samples {samples} runs past the largest seed "
                                    f"({validate.SEED_MAX}).")
    dict_path = dict_path or sample_path(DEFAULT_DICT_NAME)
    if prompts_file is None:
        prompts = [validate.prompt_text(prompt, "--prompt")]
    else:
        from chunktui.shared.texts import read_prompts

        prompts = read_prompts(prompts_file)
        if limit:
            prompts = prompts[:limit]
    target = plan_outputs(("--json", json_out, None), overwrite=overwrite,
                          inputs=[dict_path, prompts_file, *rule_files, *model_inputs(model_spec)])
    dictionary = load_dictionary(dict_path)  # a damaged dictionary is reported before the model loads
    rules = early_rules(rule_texts, rule_files, dictionary) if guarded else []
    loaded = load_with_progress(model_spec, device, dtype)
    dictionary.check_compatible(loaded.identity())
    engine = Engine.from_loaded(loaded, dictionary)  # the same facade as the app's engine process and notebooks
    if guarded:
        return _compare_guarded(engine, rules, prompts, samples, max_new_tokens, temperature, top_p, seed, chat,
                                truncate, batch_size, target, show, on_prompt=on_prompt, site=site)
    intervention = engine.intervention(chunk_names, mode, strength, layers, str(where), site,
                                       settings["chunk_layer_shift"])  # 'all': blocks 0..L-1
    from chunktui.engine.context import fit_prompt

    fitted = [fit_prompt(loaded, p, max_new_tokens, chat=chat, truncate=truncate) for p in prompts]
    cut = [f for f in fitted if f.dropped_tokens]
    if cut:
        note("note:", f"{len(cut)} prompt{'s were' if len(cut) > 1 else ' was'} cut from the start to fit "
                     f"{loaded.name}'s context of {loaded.context_length} tokens (--truncate)")
    prompts = [f.text for f in fitted]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    bar, hear = _progress()
    with bar:
        report = engine.compare(None, prompts, intervention=intervention, samples=samples, sampling=sampling,
                                chat=chat, batch_size=batch_size, progress=hear, control=control_kind,
                                control_seed=control_seed, sweep=strengths, protocol=protocol,
                                paper_confounds=paper_confounds, layer_diff=target is not None)
    for line in protocol_lines(report.protocol):
        console.print(escape(line), style="bold yellow" if line.startswith("PAPER CONFOUNDS") else "dim")
    entries = report.sweep or [{"strength": intervention.strength, "concepts": report.concepts,
                                "fluency": report.fluency}]
    what = f"{mode} x" + ",".join(format(e["strength"], "g") for e in entries)
    arms = ["control", "perturbed"] + (["random"] if control_kind else [])
    table = Table(title=f"{what} at {site} site, layers {escape(layers)}, positions {escape(positions)}: {len(prompts)} prompts "
                        f"x {samples} samples = {len(prompts) * samples} rows per arm (T={temperature}, top-p={top_p})",
                  caption="share of rows with the word [Wilson 95% interval]; Δ: change against the control arm "
                          "[Newcombe 95%]", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ["x", "concept", "control", "perturbed", "Δ"] + (["random", "Δ"] if control_kind else []) \
            + ["Δ log p"]:
        table.add_column(col, justify="left" if col in ("concept", "x") else "right", overflow="fold",
                         no_wrap=True)
    for e in entries:
        for label, c in e["concepts"].items():
            row = [f"{e['strength']:g}", escape(label)]
            for arm in arms:
                row.append(rate_text(c[f"{arm}_rate"], c.get(f"{arm}_ci"), sep="\n"))
                if arm != "control":
                    delta = "delta" if arm == "perturbed" else "random_delta"
                    row.append(rate_text(c[f"{delta}_rate"], c.get(f"{delta}_ci"), signed=True, sep="\n"))
            table.add_row(*row, f"{c['delta_logprob']:+.2f}")
    console.print(table)
    fluency = Table(title="fluency: perplexity of each arm's text under the unperturbed model; degenerate answers",
                    caption="degenerate: no word, a 1-3 word run repeated 3+ times, or >= 12 words under 35% "
                            "distinct (docs/method.md section 3)", box=box.SIMPLE_HEAD)
    for col in ("x", "arm", "perplexity", "degenerate", "95% interval"):
        fluency.add_column(col, justify="left" if col in ("x", "arm") else "right")
    fluency.add_row("-", "control", *_fluency_cells(report.fluency.get("control")))
    for e in entries:
        for arm in arms[1:]:
            fluency.add_row(f"{e['strength']:g}", arm, *_fluency_cells(e["fluency"].get(arm)))
    console.print(fluency)
    if report.control_intervention:
        ci = report.control_intervention
        overlap = ci.get("mean_overlap_with_real_subpopulation")
        console.print(f"random control ({escape(ci['kind'])}, seed {ci['seed']}): {escape(ci['what'])}"
                      + (f"; mean overlap with the real subpopulation {overlap:.0%}" if overlap is not None else ""))
    for pair in report.pairs[:show]:
        console.print(f"[bold]{escape(pair['prompt'])}[/] (seed {pair['seed']})")
        console.print(f"  [dim]control  :[/] {escape(pair['control'][:300])}")
        console.print(f"  [dim]perturbed:[/] {escape(pair['perturbed'][:300])}")
        if "random" in pair:
            console.print(f"  [dim]random   :[/] {escape(pair['random'][:300])}")
        for line in layer_diff_lines(pair, limit=6):
            console.print(f"  [dim]{escape(line)}[/]")
    if target is not None:
        target.write_json(dict(report.to_json(), model=loaded.name, dictionary=str(dictionary.path)))
        note("wrote", str(target.path), style="default")


def _fluency_cells(f: dict | None) -> list[str]:
    if not f:
        return ["?", "?", "?"]
    ppl = "?" if f.get("perplexity") is None else f"{f['perplexity']:.2f}"
    lo, hi = f.get("degenerate_ci") or (0.0, 1.0)
    return [ppl, f"{f['degenerate']}/{f['rows']}", f"{100 * lo:.0f}-{100 * hi:.0f}%"]


def _progress():
    """(context, callback): a bar on a terminal; plain lines on stderr otherwise, one per new message (every
    batch as it starts and every finished prompt), each with the seconds since the start."""
    if err_console.is_terminal:
        bar, update = stage_progress()
        return bar, lambda stage, fraction, message: update(stage, fraction, message)
    start, last = time.monotonic(), [None]

    def line(stage: str, fraction: float | None, message: str) -> None:
        if message != last[0]:
            last[0] = message
            click.echo(f"[{time.monotonic() - start:6.1f} s] {message}", err=True)

    return contextlib.nullcontext(), line


def _compare_guarded(engine, rules, prompts, samples, max_new_tokens, temperature, top_p, seed, chat, truncate,
                     batch_size, target, show, on_prompt=None, site=None) -> None:
    """perturb --rules: the guarded arm against the unguarded one, identical sampling and seeds."""
    from chunktui.engine.context import fit_prompt
    from chunktui.engine.rules import compare_rules
    from chunktui.shared.settings import Sampling

    loaded = engine.loaded
    program = engine.rules(rules, on_prompt=on_prompt, site=site)
    prompts = [fit_prompt(loaded, p, max_new_tokens, chat=chat, truncate=truncate).text for p in prompts]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    progress, update = stage_progress()
    with progress:
        report = compare_rules(loaded, program, prompts, samples, sampling, chat, batch_size,
                               progress=lambda stage, frac: update(stage, frac, f"{stage} arm"))
    table = Table(title=f"guarded vs unguarded ({len(prompts)} prompts x {samples} samples, T={temperature}, "
                        f"top-p={top_p}, same seeds; rules on the prompt: {program.on_prompt}, {program.site} site)")
    for col in ("concept", "unguarded", "guarded", "change (95% CI)"):
        table.add_column(col, justify="left" if col == "concept" else "right")
    for label, c in report["concepts"].items():
        lo, hi = c["delta_ci"]
        table.add_row(escape(label), f"{c['control_hits']}/{c['rows']}", f"{c['perturbed_hits']}/{c['rows']}",
                      f"{c['delta_rate']:+.2f} ({lo:+.2f} to {hi:+.2f})")
    console.print(table)
    for arm, name in (("control", "unguarded"), ("perturbed", "guarded")):
        f = report["fluency"][arm]
        ppl = f"{f['perplexity']:.2f}" if f["perplexity"] is not None else "-"
        console.print(f"[dim]{name}: perplexity {ppl} under the unguarded model, degenerate "
                      f"{f['degenerate']}/{f['rows']}[/]")
    rules_table = Table(title="rules")
    for col in ("rule", "action", "rows fired (unguarded)", "rows fired (guarded)", "firings (guarded)"):
        rules_table.add_column(col, justify="left" if col in ("rule", "action") else "right")
    for name, s in report["rules_summary"].items():
        rules_table.add_row(escape(name), escape(s["action"]), f"{s['rows_fired_unguarded']}/{s['rows']}",
                            f"{s['rows_fired_guarded']}/{s['rows']}", str(s["firings_guarded"]))
    console.print(rules_table)
    d = report["distinct_bigrams"]
    if d["unguarded"] is not None and d["guarded"] is not None:
        console.print(f"[dim]distinct bigrams per answer (1 = no repetition): unguarded {d['unguarded']:.3f}, "
                      f"guarded {d['guarded']:.3f}[/]")
    for pair in report["pairs"][:show]:
        console.print(f"[bold]{escape(pair['prompt'])}[/] (seed {pair['seed']})")
        console.print(f"  [dim]unguarded:[/] {escape(pair['control'][:300])}")
        console.print(f"  [dim]guarded  :[/] {escape(pair['perturbed'][:300])}")
    if report["pairs"][:show]:
        print_firings([f for pair in report["pairs"][:show] for f in pair["firings"]], "firings in the pairs shown")
    if target is not None:
        target.write_json(dict(report, model=loaded.name, dictionary=str(engine.dictionary.path)))
        note("wrote", str(target.path), style="default")
