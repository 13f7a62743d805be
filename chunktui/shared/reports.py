"""Reports: a session (or a `chunktui scan --json` / `chunktui perturb --json` file) as JSON, Markdown, HTML or CSV.

The app's Export pane and `chunktui report` both call `render` and
`write_report`, so a file looks the same whichever made it. Token colours come
from the same palette as the app and the CLI (`label_colours` over the
dictionary's labels), so a concept has one colour everywhere. HTML is one
self-contained file: inline CSS, no scripts, no external resources.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
from pathlib import Path

from chunktui.palette import label_colours
from chunktui.shared.errors import ExportError
from chunktui.shared.io import DICTIONARY_METADATA_KEY, atomic_write_text, safetensors_metadata
from chunktui.shared.safe import visible
from chunktui.shared.session import SESSION_FORMAT, SESSION_VERSION
from chunktui.shared.settings import protocol_lines

FORMATS = ("json", "md", "html", "csv")


# --------------------------------------------------------------------------- input


def normalise(obj: dict, source: str = "") -> dict:
    """Any accepted input -> a session dict (format chunktui.session); a malformed one raises ExportError."""
    try:
        session = _normalise(obj, source)
    except (TypeError, KeyError, AttributeError, ValueError, IndexError) as err:
        raise ExportError(f"{source or 'The input'} is malformed: a field has an unexpected type or is missing "
                          f"({type(err).__name__}: {err}).") from None
    _check_shape(session, source)
    return session


def _check_shape(session: dict, source: str) -> None:
    """The containers every renderer walks: lists of objects, tokens with text."""
    where = source or "The input"

    def bad(what: str):
        raise ExportError(f"{where} is malformed: {what}.")

    if not isinstance(session.get("traces"), list) or not all(isinstance(t, dict) for t in session["traces"]):
        bad("'traces' must be a list of objects")
    if not isinstance(session.get("runs"), list) or not all(isinstance(r, dict) for r in session["runs"]):
        bad("'runs' must be a list of objects")
    for i, trace in enumerate(session["traces"], 1):
        tokens = trace.get("tokens", [])
        if not isinstance(tokens, list) or not all(isinstance(t, dict) for t in tokens):
            bad(f"trace {i}: 'tokens' must be a list of objects")
        if not all(isinstance(t.get("text", ""), str) for t in tokens):
            bad(f"trace {i}: every token's 'text' must be a string")
        firings = trace.get("firings", [])
        if not isinstance(firings, list) or not all(isinstance(f, dict) for f in firings):
            bad(f"trace {i}: 'firings' must be a list of objects")
    from chunktui.shared.journal import Damaged, check_run

    for i, run in enumerate(session["runs"], 1):
        for key, kind in (("pairs", list), ("concepts", dict), ("intervention", dict), ("settings", dict)):
            if key in run and not isinstance(run[key], kind):
                bad(f"run {i}: '{key}' must be a {'list' if kind is list else 'JSON object'}")
        try:
            check_run(run)
        except Damaged as err:
            bad(f"run {i}: {err}")
    for i, trace in enumerate(session["traces"], 1):
        for t in trace.get("tokens", []):
            if t.get("strongest_label") is not None and not isinstance(t["strongest_label"], str):
                bad(f"trace {i}: a token's 'strongest_label' must be text")
            for key in ("strongest_score", "logprob"):
                if t.get(key) is not None and (isinstance(t[key], bool) or not isinstance(t[key], (int, float))):
                    bad(f"trace {i}: a token's '{key}' must be a number")
    if not isinstance(session.get("labels", []), list):
        bad("'labels' must be a list")


def _normalise(obj: dict, source: str = "") -> dict:
    if not isinstance(obj, dict):
        raise ExportError(f"{source or 'The input'} is not a JSON object; expected a chunktui session, "
                          "`chunktui scan --json` or `chunktui perturb --json` output.")
    if obj.get("format") == SESSION_FORMAT:
        session = dict(obj)
        session.setdefault("traces", [])
        session.setdefault("runs", [])
        _check_shape(dict(session, labels=[]), source)
        session.setdefault("labels", sorted({t.get("strongest_label") for tr in session["traces"]
                                             for t in tr.get("tokens", []) if t.get("strongest_label")}))
        return session
    model = obj.get("model")
    model = model if isinstance(model, dict) else {"name": model} if model else {}
    base = {"format": SESSION_FORMAT, "version": SESSION_VERSION, "created": obj.get("created", ""), "model": model,
            "dictionary": obj.get("dictionary"), "traces": [], "runs": []}
    if "tokens" in obj and isinstance(obj["tokens"], list):  # chunktui scan --json
        if not all(isinstance(t, dict) for t in obj["tokens"]):
            raise ExportError(f"{source or 'The input'} is malformed: 'tokens' must be a list of objects.")
        generated = obj.get("generated") or [False] * len(obj["tokens"])
        if not isinstance(generated, list):
            raise ExportError(f"{source or 'The input'} is malformed: 'generated' must be a list.")
        tokens = []
        for tok, gen in zip(obj["tokens"], generated):
            tokens.append({"index": tok.get("index"), "token_id": tok.get("token_id"), "text": tok.get("text", ""),
                           "generated": bool(gen), "strongest": tok.get("strongest"),
                           "strongest_label": tok.get("strongest_label"),
                           **{k: tok[k] for k in ("agree", "voters", "evidence", "precision") if k in tok},
                           "matches_by_layer": tok.get("matches_by_layer", {})})
        settings = obj.get("settings") if isinstance(obj.get("settings"), dict) else {}
        base["traces"].append({"kind": "stream" if any(generated) else "scan", "title": source or "scan",
                               "settings": settings, "rule": obj.get("rule"),
                               "text": obj.get("text", "".join(t["text"] for t in tokens)), "tokens": tokens,
                               "finished": obj.get("finished"), "firings": obj.get("firings") or []})
        _check_shape(base, source)
        base["labels"] = _dictionary_labels(obj.get("dictionary")) or sorted(
            {t["strongest_label"] for t in tokens if t["strongest_label"]})
        return base
    if "pairs" in obj and "concepts" in obj:  # chunktui perturb --json
        base["runs"].append({k: obj[k] for k in ("settings", "intervention", "concepts", "pairs") if k in obj})
        base["labels"] = _dictionary_labels(obj.get("dictionary")) or sorted(obj["concepts"])
        return base
    raise ExportError(f"{source or 'The input'} is neither a chunktui session nor `chunktui scan --json` / "
                      "`chunktui perturb --json` output (no 'format', 'tokens' or 'pairs' field).")


def _dictionary_labels(path) -> list[str]:
    """The dictionary's labels (so colours match the app), if the file is still there."""
    if not path or not Path(path).is_file():
        return []
    try:  # the header alone (no torch: reports are written by the UI process too)
        doc = json.loads(safetensors_metadata(path)[DICTIONARY_METADATA_KEY])
        seen: dict[str, None] = {}
        for chunk in doc["chunks"]:
            seen.setdefault(str(chunk["label"]), None)
        return list(seen)
    except Exception:  # a report must not fail because the dictionary moved or changed
        return []


def read_input(path: str | Path) -> dict:
    """A session / scan / perturb JSON file: a regular readable file, strict UTF-8, JSON within the depth limit
    (lone surrogates replaced by U+FFFD), every field the renderers use checked by type."""
    from chunktui.shared.texts import check_input_file, decode_utf8, loads_json

    path = check_input_file(path, "JSON file", error=ExportError)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ExportError(f"Could not read {path}: {err.strerror or err}.") from None
    text = decode_utf8(data, str(path), error=ExportError)
    if _is_journal(text):  # the app's session journal (JSONL): the session it records
        return normalise(read_session_journal(path), source=path.name)
    try:
        obj = loads_json(text, surrogates="replace")
    except ValueError as err:
        msg = str(err)
        if msg.startswith("not valid JSON"):
            msg = "is " + msg
        raise ExportError(f"{path} {msg if msg.startswith('is ') else 'is refused: ' + msg}.") from None
    return normalise(obj, source=path.name)


def _is_journal(text: str) -> bool:
    """The first non-empty line is a journal's head record."""
    from chunktui.shared.texts import loads_json

    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        head = loads_json(first)
    except ValueError:  # not JSON, or nested too deeply: not a journal's head (read_input says what it is)
        return False
    from chunktui.shared.journal import JOURNAL_FORMAT

    return isinstance(head, dict) and head.get("type") == "journal" and head.get("format") == JOURNAL_FORMAT


def read_session_journal(path: str | Path) -> dict:
    """A session journal (`~/.local/state/chunktui/sessions/*.jsonl`) as a session document."""
    from chunktui.shared.journal import read_journal

    restored = read_journal(path)
    session = restored.session.to_json()
    if restored.skipped:
        session["journal_lines_skipped"] = restored.skipped
    return session


# --------------------------------------------------------------------------- rendering


def colours_for(session: dict) -> dict[str, str]:
    return label_colours(session.get("labels") or [])


def _evidence(token: dict) -> str:
    """'27/30 layers, 96% right in training (n 45)': the colour rule's evidence for a token's label."""
    parts = []
    if isinstance(token.get("agree"), int):
        voters = token.get("voters")
        parts.append(f"{token['agree']}/{voters} layers" if isinstance(voters, int) else f"{token['agree']} layers")
    prec = token.get("precision")
    if isinstance(prec, dict) and isinstance(prec.get("value"), (int, float)):
        parts.append(f"{prec['value']:.0%} right in {prec.get('on', 'training')} (n {prec.get('n', '?')})")
    return ", ".join(parts)


def _settings_line(settings) -> str:
    """The sampling settings a trace or run was made with, in words."""
    if not isinstance(settings, dict) or not settings:
        return ""
    names = {"max_new_tokens": "max new tokens", "top_p": "top-p", "top_k": "top-k", "stop_strings": "stop"}
    shown = []
    for key, value in settings.items():
        if value in (None, [], ""):
            continue
        shown.append(f"{names.get(key, key.replace('_', ' '))} {value}")
    return ", ".join(shown)


def _labelled_text(tokens: list[dict]) -> str:
    """The text with each coloured token followed by its label: 'The cheese[cheese] was' (colour-free)."""
    return "".join((t.get("text") or "") + (f"[{t['strongest_label']}]" if t.get("strongest_label") else "")
                   for t in tokens)


def _layers_hit(token: dict) -> list[str]:
    if "layer_chunk" in token:
        return [str(l) for l, c in enumerate(token["layer_chunk"]) if c]
    return sorted(token.get("matches_by_layer", {}), key=lambda x: int(x))


def _describe_model(session: dict) -> str:
    m = session.get("model") or {}
    if not m:
        return "unknown model"
    parts = [str(m.get("name", "?"))]
    if m.get("layers"):
        parts.append(f"{m['layers']} layers, width {m.get('width')}")
    if m.get("device"):
        parts.append(f"on {m['device']}")
    return ", ".join(parts)


def _intervention_line(run: dict) -> str:
    iv = run.get("intervention", {})
    if iv.get("mode") == "rules":  # perturb --rules: control = unguarded, perturbed = guarded
        rules = [r for r in iv.get("rules", []) if isinstance(r, dict)]
        return "guarded by " + "; ".join(f"{r.get('name')}: when {r.get('when')} -> {r.get('then')}" for r in rules)
    layers = iv.get("layers", [])
    span = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else (str(layers[0]) if layers else "?")
    line = (f"{iv.get('mode', '?')} x{iv.get('strength', '?')} of {', '.join(iv.get('labels', []))} at layers "
            f"{span}, positions {iv.get('positions', '?')}, {iv.get('site', 'residual')} site")
    protocol = run.get("protocol") or {}
    if protocol.get("protocol") == "paper":
        line += ", protocol paper"
    if protocol.get("paper_confounds"):
        line += " WITH THE PAPER CODE'S CONFOUNDS (for measuring them, not a fair comparison)"
    return line


def render_json(session: dict) -> str:
    return json.dumps(session, indent=2, allow_nan=False) + "\n"


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")


def md_text(value, one: bool = True) -> str:
    """Text for Markdown outside code: HTML escaped, every Markdown punctuation backslash-escaped, control
    characters visible; `one` also shows newlines as ␊ (headings and table cells stay one line)."""
    text = visible(value if isinstance(value, str) else str(value), newlines=not one, tab=" ")
    text = html.escape(text, quote=False)
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return text if one else text.replace("\n", "<br>\n")


def md_fence(text: str, info: str = "text") -> list[str]:
    """A fenced code block that nothing inside can close: the fence is longer than any backtick run in it."""
    body = visible(text, tab="\t")
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + info, body, fence]


def render_markdown(session: dict) -> str:
    e = md_text
    out = ["# chunktui session", "", f"- model: {e(_describe_model(session))}",
           f"- dictionary: {e(session.get('dictionary') or 'none')}", f"- created: {e(session.get('created') or '?')}",
           ""]
    for i, trace in enumerate(session.get("traces", []), 1):
        out += [f"## {i}. {e(trace.get('kind', 'trace'))}: {e(trace.get('title', ''))}", ""]
        settings = _settings_line(trace.get("settings"))
        if settings:
            out += [f"- settings: {e(settings)}"]
        if trace.get("rule"):
            out += [f"- colours: {e(trace['rule'])}"]
        if settings or trace.get("rule"):
            out.append("")
        hits = [t for t in trace.get("tokens", []) if t.get("strongest_label")]
        out += ["Text, each token shown with a concept followed by its label in brackets:", ""]
        out += md_fence(_labelled_text(trace.get("tokens", [])) if hits else str(trace.get("text", ""))) + [""]
        if hits:
            out += ["| # | token | concept | evidence (colour rule) | raw matches at layers |",
                    "|---:|---|---|---|---|"]
            for t in hits:
                out.append(f"| {e(t.get('index'))} | {e(t.get('text') or '')} | {e(t.get('strongest_label'))} | "
                           f"{e(_evidence(t) or '-')} | {e(', '.join(_layers_hit(t)))} |")
            out.append("")
        else:
            out += ["No token is shown with a concept.", ""]
        out += _md_firings(trace)
    for i, run in enumerate(session.get("runs", []), 1):
        out += [f"## Perturbation {i}: {e(_intervention_line(run))}", ""]
        if _settings_line(run.get("settings")):
            out += [f"- settings: {e(_settings_line(run.get('settings')))}", ""]
        if run.get("protocol"):
            out += [f"- {e(line)}" for line in protocol_lines(run["protocol"])] + [""]
        out += ["| concept | control rate | perturbed rate | change | log p control | log p perturbed | change |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for label, c in run.get("concepts", {}).items():
            out.append(f"| {e(label)} | {c['control_rate']:.2f} | {c['perturbed_rate']:.2f} | "
                       f"{c['delta_rate']:+.2f} | {c['logprob_control']:.2f} | {c['logprob_perturbed']:.2f} | "
                       f"{c['delta_logprob']:+.2f} |")
        out.append("")
        for pair in run.get("pairs", []):
            out += [f"**{e(pair.get('prompt', ''))}** (seed {e(pair.get('seed'))})", "",
                    f"- control: {md_text(pair.get('control', ''), one=False)}", f"- perturbed: {_md_diff(pair)}"]
            out += [f"- {e(line)}" for line in layer_diff_lines(pair)] + [""]
    return "\n".join(out).rstrip() + "\n"


def _md_mark(text: str, mark: str) -> str:
    """`text` between `mark`s with its outer whitespace outside them: CommonMark ignores '~~ word~~'."""
    core = text.strip()
    lead = text[:len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()):]
    return f"{lead}{mark}{core}{mark}{trail}"


def layer_diff_lines(pair: dict, limit: int = 12) -> list[str]:
    """What the perturbation changed, layer by layer, in words: where the texts diverge, then per aligned token
    the chunks that appeared (+) and disappeared (-) at each layer. Empty without a `layer_diff`."""
    diff = pair.get("layer_diff")
    if not diff:
        return []
    at = diff.get("diverged_at")
    tokens = diff.get("tokens", [])
    lines = ["layer diff: the texts agree throughout" if at is None else
             f"layer diff: the texts diverge at generated token {at}"
             + (f" ({tokens[at]['control']!r} vs {tokens[at]['perturbed']!r})" if at < len(tokens) else "")]
    shown = 0
    for t in tokens:
        if not t.get("aligned", True) and t["index"] != at:
            break
        changes = [f"L{layer} " + " ".join([f"+{c}" for c in d["appeared"]] + [f"-{c}" for c in d["disappeared"]])
                   for layer, d in t.get("layers", {}).items() if d["appeared"] or d["disappeared"]]
        if changes:
            if shown == limit:
                lines.append("...")
                break
            lines.append(f"token {t['index']} {t['perturbed']!r}: " + "; ".join(changes))
            shown += 1
    return lines


def _firing_layers(f: dict) -> str:
    from chunktui.shared.rules import format_layers

    try:
        return format_layers([int(x) for x in f.get("layers", [])]) or "-"
    except (TypeError, ValueError):
        return "?"


def _md_firings(trace: dict) -> list[str]:
    """The rules that fired on a trace's tokens (and the one that stopped it)."""
    firings = trace.get("firings") or []
    if not firings:
        return []
    cell = md_text  # escaped, one line: a table cell
    out = ["Rule firings" + (" (stopped by a rule)" if trace.get("finished") == "rule" else "") + ":", "",
           "| token | text | rule | layers | action |", "|---:|---|---|---|---|"]
    for f in firings:
        out.append(f"| {cell(f.get('token'))} | {cell(f.get('text', ''))} | {cell(f.get('rule', ''))} | "
                   f"{cell(_firing_layers(f))} | {cell(f.get('action', ''))} |")
    return out + [""]


def _md_diff(pair: dict) -> str:
    """The perturbed text with changes marked: ~~removed~~ **added** (each piece escaped; markers hug the words,
    so they render)."""
    if not pair.get("diff"):
        return md_text(pair.get("perturbed", ""), one=False)
    parts = []
    for op in pair["diff"]:
        if op["op"] == "equal":
            parts.append(md_text(op["perturbed"], one=False))
        else:
            removed, added = op["control"], op["perturbed"]
            if removed.strip():
                parts.append(_md_mark(md_text(removed, one=False), "~~"))
            if added.strip():
                if removed.strip() and not added[:1].isspace():
                    parts.append(" ")  # '~~a~~**b**' renders, but reads as one word
                parts.append(_md_mark(md_text(added, one=False), "**"))
    return "".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; background: #fff; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #555; }
.tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7; padding: .8em;
          border: 1px solid #ddd; border-radius: 4px; background: #fafafa; }
.tok { border-radius: 2px; color: #000; font-weight: bold; }
.gen { text-decoration: underline dotted; }
.lab { font-size: .7em; font-weight: normal; vertical-align: sub; padding-left: .1em; }
.legend span { display: inline-block; padding: 0 .4em; margin: .2em; border-radius: 2px; color: #000;
               font-weight: bold; }
table { border-collapse: collapse; margin: .8em 0; } td, th { border: 1px solid #ddd; padding: .2em .6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.pair div { font-family: ui-monospace, monospace; white-space: pre-wrap; border: 1px solid #ddd; padding: .6em; }
del { background: #fdd; } ins { background: #dfd; text-decoration: none; font-weight: bold; }
"""


def _h(value) -> str:
    """Text for HTML: control characters, bidi overrides and lone surrogates visible, then HTML-escaped."""
    return html.escape(visible(value if isinstance(value, str) else str(value)))


def render_html(session: dict) -> str:
    colours = colours_for(session)
    e = _h
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>chunktui session</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>chunktui session</h1>",
           f'<p class="meta">model: {e(_describe_model(session))}<br>dictionary: '
           f"{e(str(session.get('dictionary') or 'none'))}<br>created: {e(str(session.get('created') or '?'))}</p>"]
    for i, trace in enumerate(session.get("traces", []), 1):
        out.append(f"<h2>{i}. {e(trace.get('kind', 'trace'))}: {e(str(trace.get('title', '')))}</h2>")
        meta = [x for x in (("settings", _settings_line(trace.get("settings"))),
                            ("colours", trace.get("rule") or "")) if x[1]]
        if meta:
            out.append('<p class="meta">' + "<br>".join(f"{k}: {e(str(v))}" for k, v in meta) + "</p>")
        spans, present, rows = [], [], []
        for t in trace.get("tokens", []):
            label = t.get("strongest_label")
            cls = "tok gen" if t.get("generated") else "tok"
            piece = e(t.get("text") or "")
            if label:
                if label not in present:
                    present.append(label)
                colour = colours.get(label, "#cccccc")
                why = ", ".join(x for x in (_evidence(t), "raw matches at layers " + " ".join(_layers_hit(t))
                                            if _layers_hit(t) else "") if x)
                tip = f"{label}: {why}" if why else label
                spans.append(f'<span class="{cls}" style="background:{colour}" title="{e(tip)}">{piece}'
                             f'<span class="lab">{e(label)}</span></span>')
                rows.append(f"<tr><td class=num>{e(str(t.get('index')))}</td><td><code>{piece}</code></td>"
                            f'<td><span class="tok" style="background:{colour}">{e(label)}</span></td>'
                            f"<td>{e(_evidence(t) or '-')}</td><td>{e(', '.join(_layers_hit(t)))}</td></tr>")
            elif t.get("generated"):
                spans.append(f'<span class="gen">{piece}</span>')
            else:
                spans.append(piece)
        out.append(f'<div class="tokens">{"".join(spans)}</div>')
        legend = "".join(f'<span style="background:{colours.get(l, "#ccc")}">{e(l)}</span>' for l in sorted(present))
        out.append(f'<p class="legend">{legend or "no token is shown with a concept"}</p>')
        if rows:
            out.append("<table><tr><th>#</th><th>token</th><th>concept</th><th>evidence (colour rule)</th>"
                       "<th>raw matches at layers</th></tr>" + "".join(rows) + "</table>")
        firings = trace.get("firings") or []
        if firings:
            stopped = " (stopped by a rule)" if trace.get("finished") == "rule" else ""
            out.append(f"<p>Rule firings{stopped}:</p><table><tr><th>token</th><th>text</th><th>rule</th>"
                       "<th>layers</th><th>action</th></tr>")
            for f in firings:
                out.append(f"<tr><td class=num>{e(str(f.get('token')))}</td><td><code>{e(str(f.get('text', '')))}"
                           f"</code></td><td>{e(str(f.get('rule', '')))}</td><td>{e(_firing_layers(f))}</td>"
                           f"<td>{e(str(f.get('action', '')))}</td></tr>")
            out.append("</table>")
    for i, run in enumerate(session.get("runs", []), 1):
        out.append(f"<h2>Perturbation {i}: {e(_intervention_line(run))}</h2>")
        if _settings_line(run.get("settings")):
            out.append(f'<p class="meta">settings: {e(_settings_line(run.get("settings")))}</p>')
        if run.get("protocol"):
            out += [f"<p>{e(line)}</p>" for line in protocol_lines(run["protocol"])]
        out.append("<table><tr><th>concept</th><th>control rate</th><th>perturbed rate</th><th>change</th>"
                   "<th>log p control</th><th>log p perturbed</th><th>change</th></tr>")
        for label, c in run.get("concepts", {}).items():
            swatch = colours.get(label)
            name = f'<span class="tok" style="background:{swatch}">{e(label)}</span>' if swatch else e(label)
            out.append(f"<tr><td>{name}</td><td class=num>{c['control_rate']:.2f}</td>"
                       f"<td class=num>{c['perturbed_rate']:.2f}</td><td class=num>{c['delta_rate']:+.2f}</td>"
                       f"<td class=num>{c['logprob_control']:.2f}</td><td class=num>{c['logprob_perturbed']:.2f}</td>"
                       f"<td class=num>{c['delta_logprob']:+.2f}</td></tr>")
        out.append("</table>")
        for pair in run.get("pairs", []):
            control, perturbed = _html_diff(pair)
            out.append(f"<p><b>{e(pair.get('prompt', ''))}</b> (seed {e(str(pair.get('seed')))})</p>")
            out.append(f'<div class="pair"><div><b>control</b>\n{control}</div>'
                       f"<div><b>perturbed</b>\n{perturbed}</div></div>")
            out += [f"<p class=legend>{e(line)}</p>" for line in layer_diff_lines(pair)]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_diff(pair: dict) -> tuple[str, str]:
    e = _h
    if not pair.get("diff"):
        return e(pair.get("control", "")), e(pair.get("perturbed", ""))
    left, right = [], []
    for op in pair["diff"]:
        if op["op"] == "equal":
            left.append(e(op["control"]))
            right.append(e(op["perturbed"]))
        else:
            if op["control"]:
                left.append(f"<del>{e(op['control'])}</del>")
            if op["perturbed"]:
                right.append(f"<ins>{e(op['perturbed'])}</ins>")
    return "".join(left), "".join(right)


CSV_COLUMNS = ["source", "kind", "index", "text", "generated", "label", "score", "logprob", "layers", "agree",
               "voters", "precision"]


def csv_cell(value) -> str:
    """A text cell no spreadsheet runs: one starting with = + - @ (or tab/CR, which some strip first) gets a
    leading apostrophe; control characters shown as symbols, lone surrogates as U+FFFD."""
    text = "" if value is None else visible(str(value), tab="\t")
    if text[:1] in ("=", "+", "-", "@", "\t", "\r", "\u2409", "\u240d"):
        text = "'" + text
    return text


def _csv_number(value) -> str | float:
    """Our own numbers stay numbers; anything else in a number column is treated as text."""
    if value is None or value == "":
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return csv_cell(value)


def render_csv(session: dict) -> str:
    """One row per token of every trace, then one row per concept of every perturbation run."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    c = csv_cell
    for i, trace in enumerate(session.get("traces", []), 1):
        source = f"trace {i}: {trace.get('title', '')}"
        for t in trace.get("tokens", []):
            writer.writerow([c(source), c(trace.get("kind", "")), _csv_number(t.get("index")), c(t.get("text", "")),
                             int(bool(t.get("generated"))), c(t.get("strongest_label") or ""),
                             _csv_number(t.get("strongest_score")), _csv_number(t.get("logprob")),
                             c(" ".join(_layers_hit(t))),
                             t.get("agree") if isinstance(t.get("agree"), int) and not isinstance(t.get("agree"), bool)
                             else "",
                             t.get("voters") if isinstance(t.get("voters"), int) and not isinstance(t.get("voters"), bool)
                             else "",
                             _csv_number((t.get("precision") or {}).get("value"))
                             if isinstance(t.get("precision"), dict) else ""])
        for f in trace.get("firings") or []:  # one row per rule firing: kind "rule ACTION", label = the rule
            writer.writerow([c(source), c(f"rule {f.get('action', '')}"), _csv_number(f.get("token")),
                             c(f.get("text", "")), "", c(f.get("rule", "")), "", "",
                             c(" ".join(str(x) for x in f.get("layers", []))), "", "", ""])
    for i, run in enumerate(session.get("runs", []), 1):
        source = f"run {i}: {_intervention_line(run)}"
        for label, cc in run.get("concepts", {}).items():
            writer.writerow([c(source), "concept", "", c(label), "", c(label), f"{float(cc['delta_rate']):+.4f}",
                             f"{float(cc['delta_logprob']):+.4f}",
                             c(" ".join(str(l) for l in run.get("intervention", {}).get("layers", []))), "", "", ""])
    return buf.getvalue()


def render(session: dict, fmt: str) -> str:
    fmt = fmt.lower().lstrip(".")
    fmt = {"markdown": "md", "htm": "html"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ExportError(f"Unknown report format '{fmt}': use one of {', '.join(FORMATS)}.")
    try:
        return {"json": render_json, "md": render_markdown, "html": render_html, "csv": render_csv}[fmt](session)
    except (TypeError, KeyError, AttributeError, ValueError, IndexError) as err:
        # an input file edited by hand or from another tool: a field of the wrong type, whichever it is
        raise ExportError(f"The input is malformed: a field has an unexpected type or is missing "
                          f"({type(err).__name__}: {err}). Export it again from chunktui.") from None


def format_for_path(path: str | Path, default: str = "json") -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    suffix = {"markdown": "md", "htm": "html"}.get(suffix, suffix)
    return suffix if suffix in FORMATS else default


def write_report(session: dict, fmt: str, out) -> Path:
    """Render and write atomically; an unwritable path raises ExportError and leaves nothing behind.

    `out` is a path (replaced if it exists) or an `shared.outputs.OutputTarget`
    from `plan_output` (checked, locked, never replacing a file it may not).
    """
    from chunktui.shared.outputs import OutputTarget

    text = render(session, fmt)
    if isinstance(out, OutputTarget):
        return out.write_text(text)
    return atomic_write_text(out, text)
