"""`chunktui perturb`: graft or suppress chunks and compare against an unperturbed run."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from chunktui.cli.rules_options import early_rules, print_firings, rule_options
from chunktui.cli.common import (checked, console, friendly_errors, load_with_progress, model_inputs, model_options,
                                 note, overwrite_option, plan_outputs, stage_progress)
from chunktui.shared import validate
from chunktui.shared.settings import DEFAULT_LAYERS, DEFAULT_POSITIONS, MODES
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
              help="prompt, prompt-last:K, generated or all")
@click.option("--prompt", help="one prompt")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help="file of prompts, one per line")
@click.option("--limit", default=0, callback=checked(validate.non_negative_int),
              help="use only the first N prompts of --prompts (0: all)")
@click.option("--samples", default=1, show_default=True, callback=checked(validate.samples),
              help="continuations per prompt (seeds seed..seed+N-1)")
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
@friendly_errors
def perturb_cmd(model_spec, device, dtype, dict_path, chunk_names, mode, strength, layers, positions, prompt,
                prompts_file, limit, samples, max_new_tokens, temperature, top_p, seed, chat, truncate, batch_size,
                json_out, rule_texts, rule_files, overwrite, show) -> None:
    """Regenerate with chunks grafted or suppressed; identical sampling and seeds in both arms.

    With --rule/--rules instead of --chunk: the rules act on the generated tokens (guarded arm) and the
    unguarded arm records where they would have fired; identical sampling and seeds in both arms."""
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
        from chunktui.shared.texts import read_text

        prompts = [p.strip() for p in read_text(prompts_file).splitlines() if p.strip() and not p.startswith("#")]
        if not prompts:
            raise CorpusError(f"{prompts_file} holds no prompts (blank lines and lines starting with # are skipped).")
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
                                truncate, batch_size, target, show)
    intervention = engine.intervention(chunk_names, mode, strength, layers, str(where))  # 'all': blocks 0..L-1
    from chunktui.engine.context import fit_prompt

    fitted = [fit_prompt(loaded, p, max_new_tokens, chat=chat, truncate=truncate) for p in prompts]
    cut = [f for f in fitted if f.dropped_tokens]
    if cut:
        note("note:", f"{len(cut)} prompt{'s were' if len(cut) > 1 else ' was'} cut from the start to fit "
                     f"{loaded.name}'s context of {loaded.context_length} tokens (--truncate)")
    prompts = [f.text for f in fitted]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    progress, update = stage_progress()
    with progress:
        report = engine.compare(None, prompts, intervention=intervention, samples=samples, sampling=sampling,
                                chat=chat, batch_size=batch_size,
                                progress=lambda stage, frac: update(stage, frac, f"{stage} arm"))
    table = Table(title=f"{mode} x{intervention.strength:g} at layers {escape(layers)}, positions {escape(positions)} "
                        f"({len(prompts)} prompts x {samples} samples, T={temperature}, top-p={top_p})")
    for col in ("concept", "control rate", "perturbed rate", "change", "log p control", "log p perturbed", "change"):
        table.add_column(col, justify="left" if col == "concept" else "right")
    for label, c in report.concepts.items():
        table.add_row(escape(label), f"{c['control_rate']:.2f}", f"{c['perturbed_rate']:.2f}", f"{c['delta_rate']:+.2f}",
                      f"{c['logprob_control']:.2f}", f"{c['logprob_perturbed']:.2f}", f"{c['delta_logprob']:+.2f}")
    console.print(table)
    for pair in report.pairs[:show]:
        console.print(f"[bold]{escape(pair['prompt'])}[/] (seed {pair['seed']})")
        console.print(f"  [dim]control  :[/] {escape(pair['control'][:300])}")
        console.print(f"  [dim]perturbed:[/] {escape(pair['perturbed'][:300])}")
    if target is not None:
        target.write_json(dict(report.to_json(), model=loaded.name, dictionary=str(dictionary.path)))
        note("wrote", str(target.path), style="default")


def _compare_guarded(engine, rules, prompts, samples, max_new_tokens, temperature, top_p, seed, chat, truncate,
                     batch_size, target, show) -> None:
    """perturb --rules: the guarded arm against the unguarded one, identical sampling and seeds."""
    from chunktui.engine.context import fit_prompt
    from chunktui.engine.rules import compare_rules
    from chunktui.shared.settings import Sampling

    loaded = engine.loaded
    program = engine.rules(rules)
    prompts = [fit_prompt(loaded, p, max_new_tokens, chat=chat, truncate=truncate).text for p in prompts]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    progress, update = stage_progress()
    with progress:
        report = compare_rules(loaded, program, prompts, samples, sampling, chat, batch_size,
                               progress=lambda stage, frac: update(stage, frac, f"{stage} arm"))
    table = Table(title=f"guarded vs unguarded ({len(prompts)} prompts x {samples} samples, T={temperature}, "
                        f"top-p={top_p}, same seeds)")
    for col in ("concept", "unguarded rate", "guarded rate", "change"):
        table.add_column(col, justify="left" if col == "concept" else "right")
    for label, c in report["concepts"].items():
        table.add_row(escape(label), f"{c['control_rate']:.2f}", f"{c['perturbed_rate']:.2f}",
                      f"{c['delta_rate']:+.2f}")
    console.print(table)
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
