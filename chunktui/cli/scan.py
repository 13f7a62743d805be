"""`chunktui scan` and `chunktui demo`: text coloured by the dictionary's colour rule (shared/evidence.py)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.text import Text

from chunktui.cli.rules_options import early_rules, print_firings, rule_options
from chunktui.cli.common import (checked, console, friendly_errors, load_with_progress, model_inputs,
                                 model_options, note, overwrite_option, plan_outputs)
from chunktui.shared import validate
from chunktui.shared.specs import DEFAULT_MODEL
from chunktui.palette import label_colours
from chunktui.paths import DEFAULT_DICT_NAME, sample_path

def plain_output() -> bool:
    """No colours on screen (NO_COLOR, a dumb terminal, or output piped to a file): labels go in the text."""
    return console.no_color or not console.is_terminal or console.color_system is None


def render_tokens(texts: list[str], labels: list[str | None], colours: dict[str, str],
                  plain: bool | None = None) -> Text:
    """Tokens with a background colour per concept; with `plain` (no colours), each coloured token is followed
    by its label in brackets: `The cheese[cheese] was`."""
    plain = plain_output() if plain is None else plain
    out = Text()
    for piece, label in zip(texts, labels):
        if label is None:
            out.append(piece)
        elif plain:
            out.append(piece)
            out.append(f"[{label}]", style="bold")
        else:
            out.append(piece, style=f"bold black on {colours[label]}")
    return out


def legend_line(present: list[str], colours: dict[str, str], plain: bool | None = None) -> Text:
    plain = plain_output() if plain is None else plain
    legend = Text("legend: ")
    for label in present:
        legend.append(f"[{label}]" if plain else f" {label} ", style="bold" if plain else f"bold black on {colours[label]}")
        legend.append(" ")
    if not present:
        legend.append("no concept shown", style="dim")
    return legend


def token_records(texts, ids, matches, chunks, rule=None, voters: dict | None = None) -> list[dict]:
    """Per token: the chunk whose label colours it (the colour rule's decision: `strongest_label` is the label
    the app colours the token by, or null), the evidence for it, and every raw hit per layer (for --json)."""
    records = []
    hit = matches.hit
    agree = matches.token_agree
    evidence = matches.token_evidence
    for t, (piece, token_id) in enumerate(zip(texts, ids)):
        best = int(matches.token_chunk[t])
        label = chunks[best].label if best >= 0 else None
        ev = None if evidence is None or best < 0 else float(evidence[t])
        conf = rule.confidence(label, ev) if rule is not None and label is not None else None
        per_layer = {}
        for c in hit[t].nonzero().flatten().tolist():
            chunk = chunks[c]
            per_layer.setdefault(str(chunk.layer), []).append(
                {"id": chunk.id, "label": chunk.label, "value": float(matches.value[t, c]),
                 "threshold": float(chunk.threshold), "score": float(matches.score[t, c])})
        records.append({"index": t, "token_id": token_id, "text": piece,
                        "strongest": chunks[best].id if best >= 0 else None,
                        "strongest_label": label,
                        "agree": None if agree is None or best < 0 else int(agree[t]),
                        "voters": (voters or {}).get(label) if label is not None else None,
                        "evidence": None if ev is None or ev != ev else round(ev, 4),
                        "precision": None if conf is None else {"value": round(conf[0], 4), "n": conf[1],
                                                                "on": "training"},
                        "matches_by_layer": per_layer})
    return records


def _load_dict(path, loaded, dictionary=None, optional: bool = False):
    """The engine facade over `loaded` with the dictionary (read before the model loads, when given) checked
    against the model and packed: (engine, dictionary, packed).

    `optional` (the default sample dictionary): a model it was not made for scans with no chunks, and a note
    says how to build its own."""
    from chunktui.engine.dictionary import ChunkDictionary, load_dictionary
    from chunktui.shared.errors import IncompatibleDictionaryError

    try:
        if dictionary is None:
            dictionary = load_dictionary(path, identity=loaded.identity())
        else:
            dictionary.check_compatible(loaded.identity())
    except IncompatibleDictionaryError:
        if not optional:
            raise
        note("note:", f"the sample dictionary is for the built-in model, not {loaded.name}: no chunks to match; "
                      "build this model's own with `chunktui build` and pass it with --dict")
        dictionary = ChunkDictionary(model=loaded.identity(), chunks=[])
    from chunktui.api import Engine

    engine = Engine.from_loaded(loaded, dictionary)  # the facade the app's engine process and notebooks use
    return engine, dictionary, engine.packed


@click.command("scan")
@model_options
@click.option("--dict", "dict_path", default=None, help="dictionary (default: the sample dictionary)")
@click.option("--text", help="text to scan (teacher-forced)")
@click.option("--file", "file_path", type=click.Path(dir_okay=False), help="scan a text file")
@click.option("--prompt", help="generate from this prompt instead of scanning")
@click.option("--generate", "n_new", default=40, show_default=True, callback=checked(validate.max_new_tokens),
              help="tokens to generate with --prompt (>= 1)")
@click.option("--chat/--no-chat", default=True, show_default=True, help="apply the chat template to --prompt")
@click.option("--temperature", default=0.0, show_default=True, callback=checked(validate.temperature),
              help="0 (greedy) to 10")
@click.option("--top-p", default=1.0, show_default=True, callback=checked(validate.top_p), help="in (0, 1]")
@click.option("--seed", default=0, show_default=True, callback=checked(validate.seed))
@click.option("--truncate", is_flag=True,
              help="cut a --prompt that leaves no room for --generate tokens in the model's context, from the start")
@click.option("--layers", default="all", show_default=True, callback=checked(validate.layer_spec),
              help="colour by the strongest raw match at these layers only (instead of the calibrated colour rule)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write per-token, per-layer matches")
@rule_options
@overwrite_option
@friendly_errors
def scan_cmd(model_spec, device, dtype, dict_path, text, file_path, prompt, n_new, chat, temperature, top_p, seed,
             truncate, layers, json_out, rule_texts, rule_files, on_prompt, overwrite) -> None:
    """Print text with each token coloured by the concept the dictionary's colour rule shows, and a legend.

    Without colours (NO_COLOR, or output piped to a file) each shown token is followed by its label: cheese[cheese].
    With --rule/--rules, the rules watch every generated token (--prompt): their firings are printed and
    written to --json, a `stop` ends the generation and an intervention edits from the next token on. On a
    teacher-forced --text/--file they are evaluated on every token and their firings recorded (nothing
    can be steered or stopped there)."""
    import torch

    from chunktui.shared.texts import read_text
    from chunktui.shared.errors import CorpusError
    from chunktui.shared.validate import parse_layers
    from chunktui.shared.settings import Sampling
    from chunktui.engine.tokens import encode_prompt

    if sum(x is not None for x in (text, file_path, prompt)) != 1:
        raise CorpusError("Give exactly one of --text, --file and --prompt.")
    if text is not None and not text.strip():
        raise CorpusError("--text is empty: there is nothing to scan.")
    if prompt is not None:
        validate.prompt_text(prompt, "--prompt")
    default_dict = dict_path is None
    dict_path = dict_path or sample_path(DEFAULT_DICT_NAME)
    body = read_text(file_path) if file_path else text
    from chunktui.engine.dictionary import load_dictionary

    early = load_dictionary(dict_path)  # a damaged dictionary is reported before the model loads
    rules = early_rules(rule_texts, rule_files, early)  # bad rules are reported before the model loads
    target = plan_outputs(("--json", json_out, None), overwrite=overwrite,
                          inputs=[dict_path, file_path, *rule_files, *model_inputs(model_spec)])
    loaded = load_with_progress(model_spec, device, dtype)
    engine, dictionary, packed = _load_dict(dict_path, loaded, early, optional=default_dict)
    keep = set(parse_layers(layers, loaded.layout.n_states))
    program = engine.rules(rules, on_prompt=on_prompt) if rules else None  # checked again against the model
    firings: list[dict] = []
    finished = None
    if prompt is not None:
        from chunktui.engine.context import fit_prompt
        from chunktui.engine.memory import ensure_fits

        fitted = fit_prompt(loaded, prompt, n_new, chat=chat, truncate=truncate)
        if fitted.note():
            note("note:", fitted.note())
        prompt = fitted.text
        n_prompt = len(encode_prompt(loaded, prompt, chat))
        ensure_fits(loaded, "generating", n_prompt, n_new, kept_states=n_prompt + n_new)  # every state is kept
        events = list(engine.stream(prompt, sampling=Sampling(max_new_tokens=n_new, temperature=temperature,
                                                              top_p=top_p, seed=seed), chat=chat, rules=program))
        firings = [f.to_json() for e in events for f in e.firings]
        finished = events[-1].finished if events else None
        texts = [e.text for e in events]
        ids = [e.token_id for e in events]
        from chunktui.engine.matching import MatchResult

        fields = MatchResult.__dataclass_fields__
        matches = MatchResult(*(None if getattr(events[0].matches, f) is None else
                                torch.cat([getattr(e.matches, f) for e in events]).cpu() for f in fields))
        generated = [e.generated for e in events]
    else:
        result = engine.scan(body)
        texts, ids, matches = result.texts, result.ids, result.matches
        generated = [False] * len(ids)
        if program is not None:
            program.reset(1)
            hit = matches.hit.to(program.device)[None]
            firings = [f.to_json() for f in program.observe(hit, [list(range(len(ids)))], [texts])[0]]
    chunks = packed.chunks
    rule = engine.colour_rule
    if keep != set(range(loaded.layout.n_states)):
        # recolour using only the chosen layers: the raw strongest match there (the colour rule pools all its layers)
        note("note:", "--layers colours each token by its strongest raw match at those layers, not by the "
                      "dictionary's calibrated colour rule")
        rule = None
        matches.token_agree = matches.token_evidence = None
        allowed = torch.tensor([c.layer in keep for c in chunks])
        score = torch.where(matches.hit & allowed, matches.score, torch.tensor(float("-inf")))
        best_score, best = score.max(-1)
        matches.token_chunk = torch.where(torch.isfinite(best_score), best, torch.tensor(-1))
    labels = [chunks[int(c)].label if int(c) >= 0 else None for c in matches.token_chunk]
    colours = label_colours(dictionary.labels())
    skip = 1 if ids and ids[0] == loaded.tokenizer.bos_token_id and prompt is None else 0  # the BOS scan added
    shown = render_tokens(texts[skip:], labels[skip:], colours)
    console.print(shown)
    present = sorted({label for label in labels if label})
    console.print(legend_line(present, colours))
    hits = int(matches.hit.any(-1).sum())
    shown_n = sum(label is not None for label in labels[skip:])
    console.print(f"[dim]{len(ids)} tokens, {shown_n} shown with a concept ({hits} with some raw match at some "
                  f"layer), {len(chunks)} chunks at {len(dictionary.layers())} layers; generated tokens: "
                  f"{sum(generated)}[/]")
    if rule is not None:
        console.print(f"[dim]colour rule: {rule.describe()}[/]")
    if program is not None:
        print_firings(firings)
        if finished == "rule":
            stop = [f for f in firings if f["action"] == "stop"][-1]
            console.print(f"stopped by rule [bold]{escape(stop['rule'])}[/] at token {stop['token']}")
    if target is not None:
        voters = dict(zip(packed.concepts, packed.voters)) if rule is not None else {}
        record = {"model": loaded.name, "dictionary": str(dictionary.path), "text": "".join(texts),
                  "rule": rule.describe() if rule is not None else "strongest raw match at --layers",
                  "settings": {"temperature": temperature, "top_p": top_p, "seed": seed,
                               "max_new_tokens": n_new, "chat": chat} if prompt is not None else {},
                  "tokens": token_records(texts, ids, matches, chunks, rule, voters),
                  "generated": generated}
        if program is not None:
            record.update(rules=program.describe(), firings=firings, finished=finished)
        target.write_json(record)
        note("wrote", str(target.path), style="default")


@click.command("demo")
@click.option("--model", "-m", "model_spec", default=DEFAULT_MODEL, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dict", "dict_path", default=None, help="dictionary (default: the sample dictionary)")
@friendly_errors
def demo_cmd(model_spec, device, dict_path) -> None:
    """Headless demo: scan the sample sequences and print highlighted tokens."""
    from chunktui.shared.texts import iter_jsonl

    from chunktui.engine.dictionary import load_dictionary

    early = load_dictionary(dict_path or sample_path(DEFAULT_DICT_NAME))
    loaded = load_with_progress(model_spec, device, "auto")
    engine, dictionary, packed = _load_dict(dict_path, loaded, early)
    colours = label_colours(dictionary.labels())
    seq_path = sample_path("sequences.jsonl")
    texts = [rec["text"] for _, rec in iter_jsonl(seq_path)] if Path(seq_path).is_file() else [
        "I had a slice of cheese cake by the river while the rain fell."]
    seen: set[str] = set()
    for body in texts[:6]:
        n_tokens = len(loaded.tokenizer(body, add_special_tokens=False)["input_ids"]) + 1
        if n_tokens > loaded.context_length:
            note("skipped", f"a {n_tokens}-token sequence: longer than {loaded.name}'s context "
                            f"({loaded.context_length} tokens)")
            continue
        result = engine.scan(body)
        labels = [packed.chunks[int(c)].label if int(c) >= 0 else None for c in result.matches.token_chunk]
        skip = 1 if result.ids[0] == loaded.tokenizer.bos_token_id else 0  # the BOS we added
        console.print(render_tokens(result.texts[skip:], labels[skip:], colours))
        seen.update(label for label in labels[skip:] if label)
        console.print()
    console.print(legend_line(sorted(seen), colours))
    console.print("[dim]each token is coloured by the dictionary's colour rule (its concept's layers agree); "
                  "`chunktui scan --json` lists every match per layer[/]")
