"""Rules on the built-in model: speed, a guard demonstration, and alert precision / recall.

    python benchmarks/rules.py stream  [--tokens 48] [--repeats 9]       # streaming with 5 rules vs none
    python benchmarks/rules.py monitor [--paragraphs 40] [--repeats 3]   # monitor tok/s vs a plain forward
    python benchmarks/rules.py guard   [--split dev|heldout] [--action 'x1 for 8' --on-prompt act ...]
                                                                          # "when C -> suppress C" on guard_prompts.jsonl
    python benchmarks/rules.py alerts                                     # alert rules on heldout.txt vs evaluate
    python benchmarks/rules.py procs   [--paragraphs 40] [--procs 2]      # `monitor --procs K` vs --procs 1

Every run prints its figures and the settings; add --json FILE to keep them. Timed arms are interleaved
(A B B A ...) so drift in machine load hits both alike; medians, quartiles and the range over repeats are
given. Run timed commands under `flock /tmp/chunktui-bench.lock` (the machine is shared).
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


def _load(threads: int, dictionary: str = "sample"):
    from chunktui.api import Engine

    torch.set_num_threads(threads)
    return Engine.load("smollm2-135m", dictionary=dictionary, device="cpu")


def _out(data: dict, json_path: str | None) -> None:
    print(json.dumps(data, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@click.group()
def cli() -> None:
    """Rules benchmarks on the built-in model (CPU)."""


@cli.command()
@click.option("--tokens", default=48, show_default=True)
@click.option("--repeats", default=9, show_default=True, help="interleaved pairs (ABBA order)")
@click.option("--threads", default=1, show_default=True)
@click.option("--on-prompt", default=None, help="off, watch or act (default: the rules' default)")
@click.option("--json", "json_path", default=None)
def stream(tokens: int, repeats: int, threads: int, on_prompt: str | None, json_path: str | None) -> None:
    """Streaming (every layer recorded, all 1,054 chunks matched) with the 5 rules against without; the rules
    read the prompt as they do by default (`on_prompt`).

    Run it under `flock /tmp/chunktui-bench.lock`. The two arms alternate A B B A A B ... (so drift in machine
    load hits both alike) and each pair gives one ratio; the figure is the median ratio, with the range and the
    interquartile range over the pairs, and the load averages before and after."""
    import os

    from chunktui.engine.streaming import generate_stream
    from chunktui.engine.tokens import encode_prompt
    from chunktui.shared.settings import Sampling

    engine = _load(threads)
    loaded = engine.loaded
    ids = encode_prompt(loaded, "Tell me about your favourite foods and where they come from.", chat=True)
    program = engine.rules(STREAM_RULES, on_prompt=on_prompt)
    load_before = os.getloadavg()

    def run(rules):
        t, c = time.perf_counter(), time.process_time()
        n, fired = 0, 0
        for event in generate_stream(loaded, ids, Sampling(max_new_tokens=tokens, stop_at_eos=False),
                                     packed=engine.packed, include_prompt=False, rules=rules):
            n += event.generated
            fired += len(event.firings)
        assert n == tokens
        return tokens / (time.perf_counter() - t), fired, tokens / (time.process_time() - c)

    run(None), run(program)  # warm-up
    plain, ruled, ratios, fired, cpu_ratios = [], [], [], [], []
    for i in range(repeats):
        if i % 2 == 0:
            a, _, ca = run(None)
            b, f, cb = run(program)
        else:
            b, f, cb = run(program)
            a, _, ca = run(None)
        plain.append(a), ruled.append(b), ratios.append(b / a), fired.append(f), cpu_ratios.append(cb / ca)
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    cq = statistics.quantiles(cpu_ratios, n=4) if len(cpu_ratios) >= 2 else [cpu_ratios[0]] * 3
    _out({"benchmark": "rules stream", "tokens": tokens, "repeats": repeats, "order": "ABBA", "threads": threads,
          "chunks": len(engine.packed.chunks), "layers": engine.n_states, "rules": STREAM_RULES,
          "firings_per_run": fired,
          "tok_s_plain_median": round(statistics.median(plain), 2),
          "tok_s_rules_median": round(statistics.median(ruled), 2),
          "ratio_median": round(statistics.median(ratios), 3),
          "ratio_iqr": [round(q[0], 3), round(q[2], 3)],
          "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)], "goal": ">= 0.95",
          # the same ratio in this process's CPU time (one torch thread): what other jobs' load moves least
          "cpu_ratio_median": round(statistics.median(cpu_ratios), 3),
          "cpu_ratio_iqr": [round(cq[0], 3), round(cq[2], 3)],
          "cpu_ratio_range": [round(min(cpu_ratios), 3), round(max(cpu_ratios), 3)],
          "on_prompt": program.on_prompt,
          "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]},
         json_path)


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


GUARD_PROMPTS = ROOT / "sample_data" / "guard_prompts.jsonl"


def _arm_stats(concept_of: list[str], runs, nll) -> dict:
    from chunktui.engine.rules import distinct_bigrams
    from chunktui.shared import perturb_stats as st

    n = len(runs)
    hits = sum(_mentions(c, r.text) > 0 for c, r in zip(concept_of, runs))
    later = sum(_mentions(c, r.text.lstrip().partition(" ")[2]) > 0 for c, r in zip(concept_of, runs))
    opening = sum(_mentions(c, r.text.lstrip().split(" ")[0]) > 0 for c, r in zip(concept_of, runs))
    reasons = [st.degenerate_reason(r.text) for r in runs]
    k = sum(x is not None for x in reasons)
    tokens = sum(t for _, t in nll)
    values = [v for v in (distinct_bigrams(r.ids) for r in runs) if v is not None]
    import math

    return {"rows": n, "rows_with_word": hits, "rate": round(hits / n, 4),
            "rate_ci": [round(x, 4) for x in st.wilson(hits, n)],
            "rows_with_word_after_first": later, "rows_opening_with_word": opening,
            "rows_fired": sum(bool(r.firings) for r in runs),
            "rows_fired_on_prompt": sum(any(f.extra.get("on_prompt") for f in r.firings) for r in runs),
            "perplexity": round(math.exp(sum(s for s, _ in nll) / tokens), 3) if tokens else None,
            "median_row_perplexity": round(statistics.median(math.exp(s / t) for s, t in nll if t), 3),
            "tokens": tokens, "degenerate": k, "degenerate_share": round(k / n, 4),
            "degenerate_ci": [round(x, 4) for x in st.wilson(k, n)],
            "distinct_bigrams": round(sum(values) / len(values), 4) if values else None}


@cli.command()
@click.option("--split", type=click.Choice(["dev", "heldout"]), default="dev", show_default=True,
              help="which half of sample_data/guard_prompts.jsonl (defaults are picked on dev only)")
@click.option("--samples", default=2, show_default=True, help="seeds per prompt")
@click.option("--tokens", default=40, show_default=True)
@click.option("--temperature", default=0.8, show_default=True)
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--action", "actions", multiple=True,
              help="the guard's action after 'suppress C' (e.g. 'x1 for 8', '@2-9 while'); repeat for several "
                   "configurations against one unguarded arm; default: perturb's defaults")
@click.option("--on-prompt", "on_prompts", multiple=True, help="off, watch or act (one per --action, or one for all)")
@click.option("--site", "sites", multiple=True, help="residual or attention (one per --action, or one for all)")
@click.option("--when", "whens", multiple=True, help="the condition, C standing for the concept (default: C; one per "
              "--action, or one for all)")
@click.option("--mode", "modes", multiple=True, help="the guard's mode (default suppress; one per --action, or one "
              "for all)")
@click.option("--limit", default=0, help="first N prompts per concept of the split (0: all)")
@click.option("--dict", "dictionary", default="sample", show_default=True,
              help="the dictionary the rules read (e.g. a pre-concept one built with --step 1)")
@click.option("--threads", default=1, show_default=True)
@click.option("--json", "json_path", default=None)
def guard(split: str, samples: int, tokens: int, temperature: float, top_p: float, actions, on_prompts, sites,
          whens, modes, limit: int, dictionary: str, threads: int, json_path: str | None) -> None:
    """For each concept C of sample_data/guard_prompts.jsonl (the split asked), the guard "when C -> suppress C
    ACTION" on C's prompts, against the unguarded run with the same seeds (completions, no chat template).

    Per arm: answers with the word (whole word, case-insensitive) with a Wilson 95% interval, the change with a
    Newcombe interval, perplexity under the unguarded model (perturb's measure) and the degenerate share."""
    from chunktui.engine.perturb import continuation_nll
    from chunktui.engine.rules import compile_rules, generate_rows
    from chunktui.shared import perturb_stats as st
    from chunktui.shared.settings import Sampling

    engine = _load(threads, dictionary)
    loaded = engine.loaded
    rows = [json.loads(line) for line in GUARD_PROMPTS.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == split]
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    by_concept = {c: [r["prompt"] for r in rows if r["concept"] == c] for c in concepts}
    if limit:
        by_concept = {c: p[:limit] for c, p in by_concept.items()}
    actions = list(actions) or [""]
    pick = lambda values, i, default: (values[i] if len(values) > 1 else values[0]) if values else default  # noqa
    sampling = Sampling(max_new_tokens=tokens, temperature=temperature, top_p=top_p, seed=0)
    start = time.perf_counter()
    arms: dict[str, list] = {}
    concept_of: list[str] = []
    configs = []
    for i, action in enumerate(actions):
        configs.append({"action": action, "on_prompt": pick(on_prompts, i, None), "site": pick(sites, i, None),
                        "when": pick(whens, i, "C"), "mode": pick(modes, i, "suppress")})
    for concept in concepts:
        prompts = by_concept[concept]
        concept_of.extend([concept] * (len(prompts) * samples))
        for i, cfg in enumerate(configs):
            when = cfg["when"].replace("C", concept)
            program = compile_rules([f"guard: when {when} -> {cfg['mode']} {concept} {cfg['action']}".strip()],
                                    engine.packed, loaded, engine.dictionary, on_prompt=cfg["on_prompt"],
                                    site=cfg["site"])
            cfg["rule"] = str(program.rules[0]).replace(concept, "C")  # (the last concept's, C for it)
            cfg["on_prompt"], cfg["site"] = program.on_prompt, program.site
            if i == 0:
                arms.setdefault("unguarded", []).extend(
                    generate_rows(loaded, prompts, samples, sampling, program, chat=False, act=False))
            arms.setdefault(f"guarded{i}", []).extend(
                generate_rows(loaded, prompts, samples, sampling, program, chat=False, act=True))
    nll = {name: continuation_nll(loaded, runs, chat=False) for name, runs in arms.items()}
    stats = {name: _arm_stats(concept_of, runs, nll[name]) for name, runs in arms.items()}
    n = stats["unguarded"]["rows"]
    base = stats["unguarded"]["rows_with_word"]
    for i, cfg in enumerate(configs):
        g = stats[f"guarded{i}"]
        g["config"] = cfg
        g["delta_rate"] = round((g["rows_with_word"] - base) / n, 4)
        g["delta_ci"] = [round(x, 4) for x in st.newcombe_difference(base, n, g["rows_with_word"], n)]
    pairs = [{"concept": c, "prompt": u.prompt, "seed": u.seed, "unguarded": u.text,
              **{name: arms[name][k].text for name in arms if name != "unguarded"}}
             for k, (c, u) in enumerate(zip(concept_of, arms["unguarded"]))]
    _out({"benchmark": "rules guard", "split": split, "prompts": sum(len(p) for p in by_concept.values()),
          "concepts": concepts, "samples": samples, "tokens": tokens, "temperature": temperature, "top_p": top_p,
          "chat": False, "seed": 0, "seconds": round(time.perf_counter() - start, 1),
          "load": list(__import__("os").getloadavg()), "arms": stats}, None)
    if json_path:
        Path(json_path).write_text(json.dumps({"arms": stats, "pairs": pairs}, indent=2) + "\n", encoding="utf-8")


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
