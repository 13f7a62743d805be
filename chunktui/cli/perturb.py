"""`chunktui perturb`: graft or suppress chunks and compare against an unperturbed run."""

from __future__ import annotations

import click
from rich.table import Table

from chunktui.cli.common import (console, err_console, friendly_errors, load_with_progress, model_options,
                                 stage_progress)
from chunktui.engine.perturb_defaults import DEFAULT_LAYERS, DEFAULT_POSITIONS, MODES
from chunktui.paths import DEFAULT_DICT_NAME, sample_path


@click.command("perturb")
@model_options
@click.option("--dict", "dict_path", default=None, help="dictionary (default: the sample dictionary)")
@click.option("--chunk", "chunk_names", required=True, help="LABEL[,LABEL] or chunk ids")
@click.option("--mode", default="graft", show_default=True,
              type=click.Choice(list(MODES)))
@click.option("--strength", type=float, default=None,
              help="a for graft/amplify, b for freeze/suppress (default: graft 0.05, amplify 2, freeze 1, suppress 0.5, "
                   "mean-ablate 1). The sample dictionary's chunks span the whole width, so a = 1 replaces the state "
                   "and breaks the answer; 0.05 on every prompt token steers it")
@click.option("--layers", default=DEFAULT_LAYERS, show_default=True, help="each layer uses the concept's chunk of that layer")
@click.option("--positions", default=DEFAULT_POSITIONS, show_default=True,
              help="prompt, prompt-last:K, generated or all")
@click.option("--prompt", help="one prompt")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help="file of prompts, one per line")
@click.option("--limit", default=0, help="use only the first N prompts of --prompts")
@click.option("--samples", default=1, show_default=True, help="continuations per prompt (seeds seed..seed+N-1)")
@click.option("--max-new-tokens", default=48, show_default=True)
@click.option("--temperature", default=0.8, show_default=True)
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--chat/--no-chat", default=True, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False))
@click.option("--show", default=3, show_default=True, help="print this many pairs of continuations")
@friendly_errors
def perturb_cmd(model_spec, device, dtype, dict_path, chunk_names, mode, strength, layers, positions, prompt,
                prompts_file, limit, samples, max_new_tokens, temperature, top_p, seed, chat, batch_size, json_out,
                show) -> None:
    """Regenerate with chunks grafted or suppressed; identical sampling and seeds in both arms."""
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.engine.errors import CorpusError
    from chunktui.engine.hidden import parse_layers
    from chunktui.engine.io import write_json
    from chunktui.engine.perturb import Intervention, Positions, compare, select_chunks
    from chunktui.engine.streaming import Sampling

    if bool(prompt) == bool(prompts_file):
        raise CorpusError("Give exactly one of --prompt and --prompts.")
    if prompt:
        prompts = [prompt]
    else:
        from chunktui.engine.build import read_text

        prompts = [p.strip() for p in read_text(prompts_file).splitlines() if p.strip() and not p.startswith("#")]
        if limit:
            prompts = prompts[:limit]
    loaded = load_with_progress(model_spec, device, dtype)
    dictionary = load_dictionary(dict_path or sample_path(DEFAULT_DICT_NAME), identity=loaded.identity())
    layer_list = parse_layers(layers, loaded.layout.n_states)
    chunks = select_chunks(dictionary, chunk_names.split(","), layer_list)
    intervention = Intervention(chunks=chunks, mode=mode, strength=strength, positions=Positions.parse(positions),
                                layer_means=dictionary.layer_means)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    progress, update = stage_progress()
    with progress:
        report = compare(loaded, intervention, prompts, samples, sampling, chat, batch_size,
                         progress=lambda stage, frac: update(stage, frac, f"{stage} arm"))
    table = Table(title=f"{mode} x{intervention.strength:g} at layers {layers}, positions {positions} "
                        f"({len(prompts)} prompts x {samples} samples, T={temperature}, top-p={top_p})")
    for col in ("concept", "control rate", "perturbed rate", "change", "log p control", "log p perturbed", "change"):
        table.add_column(col, justify="left" if col == "concept" else "right")
    for label, c in report.concepts.items():
        table.add_row(label, f"{c['control_rate']:.2f}", f"{c['perturbed_rate']:.2f}", f"{c['delta_rate']:+.2f}",
                      f"{c['logprob_control']:.2f}", f"{c['logprob_perturbed']:.2f}", f"{c['delta_logprob']:+.2f}")
    console.print(table)
    for pair in report.pairs[:show]:
        console.print(f"[bold]{pair['prompt']}[/] (seed {pair['seed']})")
        console.print(f"  [dim]control  :[/] {pair['control'][:300]!s}")
        console.print(f"  [dim]perturbed:[/] {pair['perturbed'][:300]!s}")
    if json_out:
        write_json(json_out, dict(report.to_json(), model=loaded.name, dictionary=str(dictionary.path)))
        err_console.print(f"wrote {json_out}")
