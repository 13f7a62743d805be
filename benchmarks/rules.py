"""Rules on the built-in model: speed, a guard demonstration, and alert precision / recall.

    python benchmarks/rules.py stream  [--tokens 64] [--repeats 5]       # streaming with 5 rules vs none
    python benchmarks/rules.py monitor [--paragraphs 40] [--repeats 3]   # monitor tok/s vs a plain forward
    python benchmarks/rules.py guard   [--samples 4] [--tokens 32]       # "when C -> suppress C" on inviting.jsonl
    python benchmarks/rules.py alerts                                     # alert rules on heldout.txt vs evaluate
    python benchmarks/rules.py procs   [--paragraphs 40] [--procs 2]      # `monitor --procs K` vs --procs 1

Every run prints its figures and the settings; add --json FILE to keep them. Arms are interleaved
(A B A B ...) so drift in machine load hits both alike; medians and the range over repeats are given.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]

# 5 rules, 2 of them interventions; the first intervention holds on nearly every token (the worst case:
# its edit runs on every decode step), the second only where music matches at two layers of 5-25
STREAM_RULES = [
    "a: when cheese -> alert",
    "b: when coffee@10-20>=3 for 2 -> alert",
    "c: when (cake or bread) and not tea -> alert",
    "d: when not cheese@0 -> suppress cheese@2-9 x0.1 while",
    "e: when music@5-25>=2 -> graft tea x0.05 for 4",
]


def _load(threads: int):
    from chunktui.api import Engine

    torch.set_num_threads(threads)
    return Engine.load("smollm2-135m", dictionary="sample", device="cpu")


def _out(data: dict, json_path: str | None) -> None:
    print(json.dumps(data, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@click.group()
def cli() -> None:
    """Rules benchmarks on the built-in model (CPU)."""


@cli.command()
@click.option("--tokens", default=64, show_default=True)
@click.option("--repeats", default=5, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--json", "json_path", default=None)
def stream(tokens: int, repeats: int, threads: int, json_path: str | None) -> None:
    """Streaming (every layer recorded, all 1,054 chunks matched) with the 5 rules against without."""
    from chunktui.engine.streaming import generate_stream
    from chunktui.engine.tokens import encode_prompt
    from chunktui.shared.settings import Sampling

    engine = _load(threads)
    loaded = engine.loaded
    ids = encode_prompt(loaded, "Tell me about your favourite foods and where they come from.", chat=True)
    program = engine.rules(STREAM_RULES)

    def run(rules):
        t = time.perf_counter()
        n, fired = 0, 0
        for event in generate_stream(loaded, ids, Sampling(max_new_tokens=tokens, stop_at_eos=False),
                                     packed=engine.packed, include_prompt=False, rules=rules):
            n += event.generated
            fired += len(event.firings)
        assert n == tokens
        return tokens / (time.perf_counter() - t), fired

    run(None), run(program)  # warm-up
    plain, ruled, ratios, fired = [], [], [], []
    for _ in range(repeats):
        a, _ = run(None)
        b, f = run(program)
        plain.append(a), ruled.append(b), ratios.append(b / a), fired.append(f)
    _out({"benchmark": "rules stream", "tokens": tokens, "repeats": repeats, "threads": threads,
          "chunks": len(engine.packed.chunks), "layers": engine.n_states, "rules": STREAM_RULES,
          "firings_per_run": fired,
          "tok_s_plain_median": round(statistics.median(plain), 2),
          "tok_s_rules_median": round(statistics.median(ruled), 2),
          "ratio_median": round(statistics.median(ratios), 3),
          "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)], "goal": ">= 0.95"}, json_path)


@cli.command()
@click.option("--paragraphs", default=40, show_default=True, help="first N paragraphs of sample_data/heldout.txt")
@click.option("--repeats", default=3, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--json", "json_path", default=None)
def monitor(paragraphs: int, repeats: int, threads: int, batch_size: int, json_path: str | None) -> None:
    """monitor over a corpus (forward + states + matching + rules) against a plain forward of the same batches."""
    from chunktui.engine.build import LabelSource
    from chunktui.engine.corpus import _bos_id, schedule
    from chunktui.engine.monitor import labelled_corpus, monitor_texts

    engine = _load(threads)
    loaded = engine.loaded
    text = "\n".join((ROOT / "sample_data" / "heldout.txt").read_text(encoding="utf-8").splitlines()[:paragraphs])
    corpus, labels = labelled_corpus(loaded, engine.dictionary, LabelSource(corpus=text))
    program = engine.rules(STREAM_RULES[:3] + ["f: when tea for 2 -> alert", "g: when snow>=4 -> alert"])
    batches = schedule(corpus, batch_size)
    bos = _bos_id(loaded.tokenizer)
    pad = loaded.tokenizer.pad_token_id or 0

    @torch.no_grad()
    def plain() -> float:
        t = time.perf_counter()
        for batch in batches:
            rows = [([bos] if bos is not None else []) + corpus.rows[i][0] for i in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for k, r in enumerate(rows):
                ids[k, :len(r)] = torch.tensor(r)
                mask[k, :len(r)] = 1
            loaded.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        return len(corpus.tokens) / (time.perf_counter() - t)

    def ruled() -> tuple[float, int]:
        t = time.perf_counter()
        found = monitor_texts(loaded, program, corpus, labels, batch_size)
        return len(corpus.tokens) / (time.perf_counter() - t), len(found.firings)

    plain(), ruled()  # warm-up
    a_s, b_s, ratios = [], [], []
    for _ in range(repeats):
        a = plain()
        b, n = ruled()
        a_s.append(a), b_s.append(b), ratios.append(b / a)
    _out({"benchmark": "rules monitor", "paragraphs": paragraphs, "tokens": len(corpus.tokens),
          "contexts": len(corpus.contexts), "repeats": repeats, "threads": threads, "batch_size": batch_size,
          "rules": program.describe(), "firings": n,
          "tok_s_plain_forward_median": round(statistics.median(a_s), 1),
          "tok_s_monitor_median": round(statistics.median(b_s), 1),
          "ratio_median": round(statistics.median(ratios), 3),
          "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)], "goal": ">= 0.8"}, json_path)


def _mentions(word: str, text: str) -> int:
    import re

    return len(re.findall(rf"(?<![\w]){re.escape(word)}(?![\w])", text, flags=re.IGNORECASE))


@cli.command()
@click.option("--samples", default=4, show_default=True, help="seeds per prompt")
@click.option("--tokens", default=32, show_default=True)
@click.option("--temperature", default=0.8, show_default=True)
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--strength", default=None, type=float, help="suppress strength (default: perturb's, 0.5)")
@click.option("--threads", default=1, show_default=True)
@click.option("--json", "json_path", default=None)
def guard(samples: int, tokens: int, temperature: float, top_p: float, strength: float | None, threads: int,
          json_path: str | None) -> None:
    """For each concept C of sample_data/inviting.jsonl, the guard "when C -> suppress C" (default strength,
    layers 2-9, while the condition holds) on C's prompts, against the unguarded run with the same seeds.

    A rule sees a token only once it is generated, so the first answer token is out of its reach; the
    figures count mentions of C in the whole answer and after its first word."""
    from chunktui.engine.rules import distinct_bigrams, generate_rows
    from chunktui.shared.settings import Sampling

    engine = _load(threads)
    rows = [json.loads(line) for line in (ROOT / "sample_data" / "inviting.jsonl").read_text().splitlines()
            if line.strip()]
    concepts = sorted({r["concept"] for r in rows})
    sampling = Sampling(max_new_tokens=tokens, temperature=temperature, top_p=top_p, seed=0)
    per, pairs = {}, []
    start = time.perf_counter()
    for concept in concepts:
        prompts = [r["prompt"] for r in rows if r["concept"] == concept]
        x = f" x{strength:g}" if strength is not None else ""
        program = engine.rules([f"guard: when {concept} -> suppress {concept}{x}"])
        arms = {}
        for name, act in (("unguarded", False), ("guarded", True)):
            arms[name] = generate_rows(engine.loaded, prompts, samples, sampling, program, chat=False, act=act)
        n = len(arms["unguarded"])
        stats = {"rows": n}
        for name, runs in arms.items():
            stats[f"{name}_rows_with_word"] = sum(_mentions(concept, r.text) > 0 for r in runs)
            stats[f"{name}_mentions"] = sum(_mentions(concept, r.text) for r in runs)
            stats[f"{name}_rows_starting_with_word"] = sum(_mentions(concept, r.text.lstrip().split(" ")[0]) > 0
                                                           for r in runs)
            stats[f"{name}_mentions_after_first_word"] = sum(
                _mentions(concept, r.text.lstrip().partition(" ")[2]) for r in runs)
            stats[f"{name}_rows_fired"] = sum(bool(r.firings) for r in runs)
            values = [v for v in (distinct_bigrams(r.ids) for r in runs) if v is not None]
            stats[f"{name}_distinct_bigrams"] = round(sum(values) / len(values), 3)
        per[concept] = stats
        for u, g in zip(arms["unguarded"], arms["guarded"]):
            pairs.append({"concept": concept, "prompt": u.prompt, "seed": u.seed, "unguarded": u.text,
                          "guarded": g.text, "firings": len(g.firings)})
    total = {k: sum(s[k] for s in per.values()) for k in per[concepts[0]] if not k.endswith("bigrams")}
    _out({"benchmark": "rules guard", "samples": samples, "tokens": tokens, "temperature": temperature,
          "top_p": top_p, "chat": False,
          "rule": f"when C -> suppress C (x{strength if strength is not None else 0.5:g}, layers 2-9, while)",
          "seconds": round(time.perf_counter() - start, 1), "per_concept": per, "total": total,
          "pairs": pairs}, json_path)


@cli.command()
@click.option("--threads", default=1, show_default=True)
@click.option("--json", "json_path", default=None)
def alerts(threads: int, json_path: str | None) -> None:
    """Per concept C of the sample dictionary, on sample_data/heldout.txt (never used to build it):
    "when C -> alert" (any of its 31 layers) and "when C>=16 -> alert" (a majority of layers), precision and
    recall per token; next to `evaluate`'s TP / FP rates of C's chunks on the same tokens and labels."""
    from chunktui.engine.build import LabelSource, evaluate_dictionary, summarise_by_label
    from chunktui.engine.monitor import labelled_corpus, monitor_texts

    engine = _load(threads)
    text = (ROOT / "sample_data" / "heldout.txt").read_text(encoding="utf-8")
    labels_all = engine.dictionary.labels()
    rules = [f"{c}-any: when {c} -> alert" for c in labels_all] + [f"{c}-half: when {c}>=16 -> alert"
                                                                    for c in labels_all]
    program = engine.rules(rules)
    start = time.perf_counter()
    corpus, labels = labelled_corpus(engine.loaded, engine.dictionary, LabelSource(corpus=text))
    found = monitor_texts(engine.loaded, program, corpus, labels)
    records, _ = evaluate_dictionary(engine.loaded, engine.dictionary, LabelSource(corpus=text))
    by_label = summarise_by_label(records)
    rows = {}
    for c in labels_all:
        s_any, s_half = found.scores.get(f"{c}-any", {}), found.scores.get(f"{c}-half", {})
        ev = by_label.get(c, {})
        rows[c] = {"positives": s_any.get("positives"),
                   "any_precision": s_any.get("precision"), "any_recall": s_any.get("recall"),
                   "half_precision": s_half.get("precision"), "half_recall": s_half.get("recall"),
                   "evaluate_mean_tp_rate": ev.get("tp_rate"), "evaluate_mean_fp_rate": ev.get("fp_rate")}

    def mean(key):
        values = [r[key] for r in rows.values() if r[key] is not None]
        return round(sum(values) / len(values), 4) if values else None, len(values)

    summary = {k: mean(k) for k in ("any_precision", "any_recall", "half_precision", "half_recall",
                                    "evaluate_mean_tp_rate", "evaluate_mean_fp_rate")}
    _out({"benchmark": "rules alerts", "corpus": "sample_data/heldout.txt", "tokens": found.tokens,
          "contexts": found.contexts, "seconds": round(time.perf_counter() - start, 1),
          "means_over_concepts [value, concepts]": summary, "cheese": rows.get("cheese"), "per_concept": rows},
         json_path)


@cli.command()
@click.option("--paragraphs", default=40, show_default=True, help="first N paragraphs of sample_data/heldout.txt")
@click.option("--procs", "procs", default=2, show_default=True)
@click.option("--repeats", default=1, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--json", "json_path", default=None)
def procs(paragraphs: int, procs: int, repeats: int, batch_size: int, json_path: str | None) -> None:
    """`chunktui monitor --corpus` (the built-in model, the sample dictionary, 5 alert rules) run as a user runs it,
    three arms interleaved: --procs 1 (torch's default threads), --procs 1 with one thread (OMP_NUM_THREADS=1,
    what each of the K workers gets on a machine of K cores), and --procs K. Per run: the whole command's wall
    time (start, model load, labelling, reading, writing) and the reading loop's own seconds (rank 0, from
    --json, the gather included). Every run's firings file must be byte-identical to the first run's."""
    import os
    import subprocess
    import sys
    import tempfile

    text = "\n".join((ROOT / "sample_data" / "heldout.txt").read_text(encoding="utf-8").splitlines()[:paragraphs])
    rules = STREAM_RULES[:3] + ["f: when tea for 2 -> alert", "g: when snow>=4 -> alert"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("OMP_NUM_THREADS", None)
    arms = {"procs 1": (1, {}), "procs 1, 1 thread": (1, {"OMP_NUM_THREADS": "1"}), f"procs {procs}": (procs, {})}
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    reference = None
    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "heldout.txt"
        corpus.write_text(text, encoding="utf-8")
        for _ in range(repeats):
            for name, (k, extra) in arms.items():
                out, summary = Path(folder) / "f.jsonl", Path(folder) / "s.json"
                cmd = [sys.executable, "-m", "chunktui", "monitor", "--model", "smollm2-135m", "--device", "cpu",
                       "--corpus", str(corpus), "--batch-size", str(batch_size), "--procs", str(k),
                       "--out", str(out), "--json", str(summary), "--overwrite"]
                for rule in rules:
                    cmd += ["--rule", rule]
                t = time.perf_counter()
                p = subprocess.run(cmd, env=dict(env, **extra), capture_output=True, text=True)
                wall = time.perf_counter() - t
                if p.returncode:
                    raise SystemExit(p.stdout + p.stderr)
                data = json.loads(summary.read_text())
                lines = out.read_bytes()
                reference = reference if reference is not None else lines
                runs[name].append({"wall_s": round(wall, 2), "reading_s": data["seconds"], "tokens": data["tokens"],
                                   "contexts": data["contexts"], "firings": lines.count(b"\n"),
                                   "identical_to_first_run": lines == reference,
                                   "loadavg_after": [round(x, 2) for x in os.getloadavg()]})
                print(name, runs[name][-1], file=sys.stderr, flush=True)
    med = lambda name, key: round(statistics.median(r[key] for r in runs[name]), 2)  # noqa: E731
    _out({"benchmark": "monitor --procs", "paragraphs": paragraphs, "batch_size": batch_size, "repeats": repeats,
          "cpu_count": os.cpu_count(), "rules": rules, "runs": runs,
          "wall_s_median": {name: med(name, "wall_s") for name in runs},
          "reading_s_median": {name: med(name, "reading_s") for name in runs}}, json_path)

if __name__ == "__main__":
    cli()
