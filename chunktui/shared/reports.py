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
from pathlib import Path

from chunktui.palette import label_colours
from chunktui.shared.errors import ExportError
from chunktui.shared.io import DICTIONARY_METADATA_KEY, atomic_write_text, safetensors_metadata
from chunktui.shared.session import SESSION_FORMAT, SESSION_VERSION

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
    for i, run in enumerate(session["runs"], 1):
        for key, kind in (("pairs", list), ("concepts", dict), ("intervention", dict), ("settings", dict)):
            if key in run and not isinstance(run[key], kind):
                bad(f"run {i}: '{key}' must be a {'list' if kind is list else 'JSON object'}")
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
                           "matches_by_layer": tok.get("matches_by_layer", {})})
        base["traces"].append({"kind": "stream" if any(generated) else "scan", "title": source or "scan",
                               "settings": {}, "text": obj.get("text", "".join(t["text"] for t in tokens)),
                               "tokens": tokens, "finished": obj.get("finished"),
                               "firings": obj.get("firings") or []})
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
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ExportError(f"Could not read {path}: {err}.") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}).") from None
    return normalise(obj, source=path.name)


# --------------------------------------------------------------------------- rendering


def colours_for(session: dict) -> dict[str, str]:
    return label_colours(session.get("labels") or [])


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
    return (f"{iv.get('mode', '?')} x{iv.get('strength', '?')} of {', '.join(iv.get('labels', []))} at layers "
            f"{span}, positions {iv.get('positions', '?')}")


def render_json(session: dict) -> str:
    return json.dumps(session, indent=2, allow_nan=False) + "\n"


def render_markdown(session: dict) -> str:
    out = [f"# chunktui session", "", f"- model: {_describe_model(session)}",
           f"- dictionary: {session.get('dictionary') or 'none'}", f"- created: {session.get('created') or '?'}", ""]
    for i, trace in enumerate(session.get("traces", []), 1):
        out += [f"## {i}. {trace.get('kind', 'trace')}: {trace.get('title', '')}", ""]
        out += ["```text", trace.get("text", ""), "```", ""]
        hits = [t for t in trace.get("tokens", []) if t.get("strongest_label")]
        if hits:
            out += ["| # | token | strongest chunk | layers matched |", "|---:|---|---|---|"]
            for t in hits:
                piece = (t.get("text") or "").replace("|", "\\|").replace("\n", "\\n")
                out.append(f"| {t.get('index')} | `{piece}` | {t.get('strongest_label')} | "
                           f"{', '.join(_layers_hit(t))} |")
            out.append("")
        else:
            out += ["No token matched a chunk.", ""]
        out += _md_firings(trace)
    for i, run in enumerate(session.get("runs", []), 1):
        out += [f"## Perturbation {i}: {_intervention_line(run)}", ""]
        out += ["| concept | control rate | perturbed rate | change | log p control | log p perturbed | change |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for label, c in run.get("concepts", {}).items():
            out.append(f"| {label} | {c['control_rate']:.2f} | {c['perturbed_rate']:.2f} | {c['delta_rate']:+.2f} | "
                       f"{c['logprob_control']:.2f} | {c['logprob_perturbed']:.2f} | {c['delta_logprob']:+.2f} |")
        out.append("")
        for pair in run.get("pairs", []):
            out += [f"**{pair.get('prompt', '')}** (seed {pair.get('seed')})", "",
                    f"- control: {pair.get('control', '')}", f"- perturbed: {_md_diff(pair)}", ""]
    return "\n".join(out).rstrip() + "\n"


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
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
    out = ["Rule firings" + (" (stopped by a rule)" if trace.get("finished") == "rule" else "") + ":", "",
           "| token | text | rule | layers | action |", "|---:|---|---|---|---|"]
    for f in firings:
        out.append(f"| {f.get('token')} | `{cell(f.get('text', ''))}` | {cell(f.get('rule', ''))} | "
                   f"{_firing_layers(f)} | {cell(f.get('action', ''))} |")
    return out + [""]


def _md_diff(pair: dict) -> str:
    """The perturbed text with changes marked: ~~removed~~ **added**."""
    if not pair.get("diff"):
        return pair.get("perturbed", "")
    parts = []
    for op in pair["diff"]:
        if op["op"] == "equal":
            parts.append(op["perturbed"])
        else:
            if op["control"].strip():
                parts.append(f"~~{op['control']}~~")
            if op["perturbed"].strip():
                parts.append(f"**{op['perturbed']}**")
    return "".join(parts)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; background: #fff; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #555; }
.tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7; padding: .8em;
          border: 1px solid #ddd; border-radius: 4px; background: #fafafa; }
.tok { border-radius: 2px; color: #000; font-weight: bold; }
.gen { text-decoration: underline dotted; }
.legend span { display: inline-block; padding: 0 .4em; margin: .2em; border-radius: 2px; color: #000;
               font-weight: bold; }
table { border-collapse: collapse; margin: .8em 0; } td, th { border: 1px solid #ddd; padding: .2em .6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.pair div { font-family: ui-monospace, monospace; white-space: pre-wrap; border: 1px solid #ddd; padding: .6em; }
del { background: #fdd; } ins { background: #dfd; text-decoration: none; font-weight: bold; }
"""


def render_html(session: dict) -> str:
    colours = colours_for(session)
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>chunktui session</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>chunktui session</h1>",
           f'<p class="meta">model: {e(_describe_model(session))}<br>dictionary: '
           f"{e(str(session.get('dictionary') or 'none'))}<br>created: {e(str(session.get('created') or '?'))}</p>"]
    for i, trace in enumerate(session.get("traces", []), 1):
        out.append(f"<h2>{i}. {e(trace.get('kind', 'trace'))}: {e(str(trace.get('title', '')))}</h2>")
        spans, present = [], []
        for t in trace.get("tokens", []):
            label = t.get("strongest_label")
            cls = "tok gen" if t.get("generated") else "tok"
            piece = e(t.get("text") or "")
            if label:
                if label not in present:
                    present.append(label)
                colour = colours.get(label, "#cccccc")
                spans.append(f'<span class="{cls}" style="background:{colour}" title="{e(label)}">{piece}</span>')
            elif t.get("generated"):
                spans.append(f'<span class="gen">{piece}</span>')
            else:
                spans.append(piece)
        out.append(f'<div class="tokens">{"".join(spans)}</div>')
        legend = "".join(f'<span style="background:{colours.get(l, "#ccc")}">{e(l)}</span>' for l in sorted(present))
        out.append(f'<p class="legend">{legend or "no chunk matched"}</p>')
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
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_diff(pair: dict) -> tuple[str, str]:
    e = html.escape
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


CSV_COLUMNS = ["source", "kind", "index", "text", "generated", "label", "score", "logprob", "layers"]


def render_csv(session: dict) -> str:
    """One row per token of every trace, then one row per concept of every perturbation run."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, trace in enumerate(session.get("traces", []), 1):
        source = f"trace {i}: {trace.get('title', '')}"
        for t in trace.get("tokens", []):
            writer.writerow([source, trace.get("kind", ""), t.get("index"), t.get("text", ""),
                             int(bool(t.get("generated"))), t.get("strongest_label") or "",
                             "" if t.get("strongest_score") is None else t["strongest_score"],
                             "" if t.get("logprob") is None else t["logprob"], " ".join(_layers_hit(t))])
        for f in trace.get("firings") or []:  # one row per rule firing: kind "rule ACTION", label = the rule
            writer.writerow([source, f"rule {f.get('action', '')}", f.get("token"), f.get("text", ""), "",
                             f.get("rule", ""), "", "", " ".join(str(x) for x in f.get("layers", []))])
    for i, run in enumerate(session.get("runs", []), 1):
        source = f"run {i}: {_intervention_line(run)}"
        for label, c in run.get("concepts", {}).items():
            writer.writerow([source, "concept", "", label, "", label, f"{c['delta_rate']:+.4f}",
                             f"{c['delta_logprob']:+.4f}", " ".join(str(l) for l in run.get("intervention", {})
                                                                      .get("layers", []))])
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
