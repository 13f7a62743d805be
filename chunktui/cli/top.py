"""`chunktui top`: where a chunk fires, as the contexts of a corpus where it matches most strongly."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from chunktui.cli.common import (checked, console, friendly_errors, load_with_progress, model_inputs, model_options,
                                 note, overwrite_option, plan_outputs, stage_progress)
from chunktui.paths import DEFAULT_DICT_NAME, sample_path
from chunktui.shared import validate

DEFAULT_CORPUS = "heldout.txt"  # the sample held-out text: the sample dictionary was fitted on train.txt


@click.command("top")
@model_options
@click.option("--dict", "dict_path", default=None, type=click.Path(dir_okay=False),
              help="dictionary (default: the sample dictionary)")
@click.option("--chunk", "name", required=True,
              help="a label (all its layers, or those of --layer) or a chunk id such as cheese@5")
@click.option("--corpus", type=click.Path(dir_okay=False),
              help="UTF-8 text to search (default: the sample held-out text, sample_data/heldout.txt)")
@click.option("--k", "k", default=10, show_default=True, callback=checked(validate.count),
              help="contexts to show (>= 1)")
@click.option("--layer", "layers", default=None, callback=checked(validate.layer_spec),
              help="only these layers of a label: '5', '2-9' or '0,4,8-10'")
@click.option("--batch-size", default=16, show_default=True, callback=checked(validate.count))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the contexts as JSON")
@overwrite_option
@friendly_errors
def top_cmd(model_spec, device, dtype, dict_path, name, corpus, k, layers, batch_size, json_out, overwrite) -> None:
    """Show the contexts of a corpus where a chunk fires most strongly (as max-activating examples).

    Every context (sentence) of the corpus runs through the model once; per
    context the best token is kept. Tokens rank by how many of the chunk's
    layers match them, then by the matching score (ln(threshold/deviation) for
    PA chunks: above 0 is inside the threshold). One example per context.
    """
    from chunktui.shared.validate import parse_layers
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.engine.top import resolve_units, top_tables
    from chunktui.shared.texts import read_text

    dict_path = dict_path or str(sample_path(DEFAULT_DICT_NAME))
    corpus = corpus or str(sample_path(DEFAULT_CORPUS))
    dictionary = load_dictionary(dict_path)  # a damaged dictionary or corpus is reported before the model loads
    text = read_text(corpus)
    n_states = int(dictionary.model.get("n_layers") or 0) + 1
    layer_list = parse_layers(layers, n_states) if layers else None
    chunks = resolve_units(dictionary, name, layer_list)
    target = plan_outputs(("--json", json_out, None), overwrite=overwrite,
                          inputs=[dict_path, corpus, *model_inputs(model_spec)])
    loaded = load_with_progress(model_spec, device, dtype)
    from chunktui.engine.allocator import keep_freed_memory

    keep_freed_memory()  # a corpus job in a process of its own (the app's engine searches with glibc's defaults)
    progress, update = stage_progress()
    with progress:
        tables = top_tables(loaded, dictionary, text, {name: chunks}, batch_size=batch_size,
                            progress=lambda fraction, message: update("search", fraction, message))
    examples = tables.examples(name, k)
    matches, T = int(tables.matches[0]), tables.tokens
    layer_text = _layers(tables.layers(name))
    title = (f"{name} ({layer_text}) in {corpus}: fires on {matches} of {T} tokens "
             f"({100 * matches / T:.2f}%), {len(examples)} best contexts of {len(tables.corpus.rows)}")
    table = Table(title=Text(title), title_justify="left")
    for col, justify in (("#", "right"), ("layer", "right"), ("score", "right"), ("layers", "right"),
                         ("context", "left")):
        table.add_column(col, justify=justify, no_wrap=col != "context")
    styled = console.is_terminal and not console.no_color  # piped or NO_COLOR: the token in brackets
    for i, e in enumerate(examples, 1):
        token = Text(e.token, style="bold reverse") if styled else Text(f"[{e.token}]")
        context = Text(e.before) + token + Text(e.after)
        table.add_row(str(i), str(e.layer), f"{e.score:+.2f}", f"{e.agree}/{e.layers}", context)
    if examples:
        console.print(table)
    else:
        note("no match:", f"{name} ({layer_text}) fires nowhere in {corpus} ({T} tokens).")
    console.print(Text("score: the matcher's (ln(threshold/deviation) for PA chunks), above 0 inside the "
                       "threshold; layers: how many of the chunk's layers match that token", style="dim"))
    if target is not None:
        target.write_json({"format": "chunktui.top", "version": 1, "dictionary": str(dict_path),
                           "model": loaded.name, "corpus": str(corpus), "chunk": name, "layers": tables.layers(name),
                           "tokens": T, "contexts": len(tables.corpus.rows), "matches": matches, "k": k,
                           "ranking": "layers agreeing, then score; one example per context",
                           "seconds": round(tables.seconds, 3), "examples": [e.to_json() for e in examples]})
        console.print(Text(f"wrote {target.path}"))


def _layers(layers: list[int]) -> str:
    if len(layers) == 1:
        return f"layer {layers[0]}"
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"layers {layers[0]}-{layers[-1]}" if contiguous else f"layers {', '.join(map(str, layers))}"
