"""The paper's tables on the built-in model, beside the paper's figures (docs/method.md section 3.4).

(a) Detection: mean held-out TP and FP rates (population averaging), the paper's rule (accuracy, n = 5,
    built here on sample_data/train.txt) and fp-budget:0.001 (the sample dictionary, built the same way),
    both evaluated unchanged on sample_data/heldout.txt; the paper's SAE baseline for cheese, cake, cheesecake.
(b) Grafting per question category (sample_data/categories.jsonl, the first K questions of each class):
    occurrence of the concept word, control -> grafted, in three columns: `--protocol paper` (matched
    sampling), the same with `--paper-confounds`, and chunktui's default; 95% intervals by a bootstrap over
    questions (stratified by class for the mean row).
(c) Freezing: change in the concept's next-token log-probability on inviting completions
    (sample_data/inviting.jsonl) at both sites, with a same-size random subpopulation as a control.
(d) The attention-site hand trial (cheese chunks, blocks 2-29, the last prompt token, 12 questions): why the
    answers come out empty.

    python benchmarks/paper_tables.py [--per-category 5] [--concepts cheese,cake,chocolate,coffee,pizza]
        [--max-new-tokens 24] [--samples 1] [--threads 1] [--parts abcd] [--json out.json]
"""

from __future__ import annotations

import json
import random
import re
import time

import click
import torch

PAPER_CATEGORIES = {  # the paper's question experiment: control, grafted (mean over 75 words)
    "abbreviation": (0.149, 0.559), "description": (0.156, 0.490), "entity": (0.126, 0.481),
    "human": (0.119, 0.467), "location": (0.107, 0.475), "numeric": (0.115, 0.453),
}
PAPER_MEAN = (0.129, 0.488)
PAPER_SAE_TP = {"cheese": 0.39, "cake": 0.32, "cheesecake": 0.26}
# (column, protocol, confounds, options set on top): the fourth column is the paper's protocol with the chat
# template on, since the built-in model is an instruct model that often answers a bare question with nothing
COLUMNS = (("paper", "paper", False, {}), ("paper+confounds", "paper", True, {}),
           ("chunktui default", "default", False, {}), ("paper, chat template", "paper", False, {"chat": True}))


def _split_columns(text: str) -> list[str]:
    """Column names separated by commas ('paper, chat template' and 'paper, K distinctive' hold one)."""
    names, parts = [], [p.strip() for p in text.split(",")]
    for part in parts:
        if names and names[-1] == "paper" and (part == "chat template" or part.endswith("distinctive")):
            names[-1] = f"paper, {part}"
        else:
            names.append(part)
    return names


def bootstrap(hits: dict[str, torch.Tensor], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of per-class means, resampling questions within each class.

    `hits[class]` is (questions, ...) of 0/1 (or deltas); each resample draws that class's questions with
    replacement."""
    g = torch.Generator().manual_seed(seed)
    stats = torch.zeros(n)
    for values in hits.values():
        q = values.shape[0]
        idx = torch.randint(0, q, (n, q), generator=g)
        stats += values.float().reshape(q, -1).mean(1)[idx].mean(1)
    stats /= len(hits)
    lo, hi = torch.quantile(stats, torch.tensor([0.025, 0.975])).tolist()
    return lo, hi


def detection(loaded, threads: int) -> dict:
    from chunktui.engine.build import LabelSource, build_dictionary, collect_for, evaluate_hidden, summarise_by_label
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.engine.labels import read_word_list
    from chunktui.paths import DEFAULT_DICT_NAME, sample_path
    from chunktui.shared.texts import read_text

    words = [w + "*" if w == "cheesecake" else w for w in read_word_list("sample_data/concepts.txt")]
    src_ho = LabelSource(corpus=read_text("sample_data/heldout.txt"), words=words, min_count=1)
    t0 = time.perf_counter()
    hs_ho, _ = collect_for(loaded, src_ho, None)
    lab_ho = src_ho.labels(hs_ho, None)
    out = {"heldout_tokens": len(hs_ho.tokens), "collect_seconds": time.perf_counter() - t0, "rules": {}}
    t0 = time.perf_counter()
    paper_dict, report = build_dictionary(loaded, LabelSource(corpus=read_text("sample_data/train.txt"), words=words),
                                          n=5, criterion="accuracy", seed=0)
    out["build_seconds"] = time.perf_counter() - t0
    sample = load_dictionary(sample_path(DEFAULT_DICT_NAME), identity=loaded.identity())
    for name, dictionary in (("paper rule (accuracy, n=5)", paper_dict), ("fp-budget:0.001 (sample dictionary)", sample)):
        by_label = summarise_by_label(evaluate_hidden(dictionary, hs_ho, lab_ho, loaded.hidden_size))
        tps = [a["tp_rate"] for a in by_label.values()]
        fps = [a["fp_rate"] for a in by_label.values()]
        sizes = [c.size for c in dictionary.chunks]
        out["rules"][name] = {"mean_tp": sum(tps) / len(tps), "mean_fp": sum(fps) / len(fps), "words": len(tps),
                              "mean_subpopulation": sum(sizes) / len(sizes), "by_label": by_label}
    return out


def print_detection(det: dict) -> None:
    print(f"\n(a) DETECTION: population averaging on held-out text ({det['heldout_tokens']} tokens of "
          "sample_data/heldout.txt), mean over layers 0-30 per word")
    print(f"{'rule':<38}{'mean TP':>9}{'mean FP':>10}{'words':>7}{'mean |M|':>10}   cheese / cake / cheesecake TP")
    for name, r in det["rules"].items():
        trio = " / ".join(f"{r['by_label'].get(w, r['by_label'].get(w + '*', {})).get('tp_rate', float('nan')):.2f}"
                          for w in ("cheese", "cake", "cheesecake"))
        print(f"{name:<38}{r['mean_tp']:>9.3f}{r['mean_fp']:>10.5f}{r['words']:>7}{r['mean_subpopulation']:>10.0f}   {trio}")
    print(f"{'paper: SAE baseline (Llama-3-8B)':<38}{'':>9}{'':>10}{'':>7}{'':>10}   "
          + " / ".join(f"{PAPER_SAE_TP[w]:.2f}" for w in ("cheese", "cake", "cheesecake")))


def distinctive(chunks, keep: int, layer_means: torch.Tensor):
    """The chunks cut to the `keep` neurons whose template lies furthest from the corpus mean of its layer: a
    sparser, more concept-specific subpopulation (a further column; not how the sample dictionary is built)."""
    from chunktui.engine.dictionary import Chunk

    out = []
    for c in chunks:
        M = c.subpopulation.long()
        top = (c.template - layer_means[c.layer][M]).abs().topk(min(keep, c.size)).indices
        out.append(Chunk(id=f"{c.id}-d{keep}", label=c.label, layer=c.layer, subpopulation=M[top],
                         template=c.template[top]))
    return out


def grafting(loaded, dictionary, categories: dict[str, list[str]], concepts: list[str], samples: int,
             max_new_tokens: int, seed: int, batch_size: int, columns=None, sparse: int = 0) -> dict:
    from chunktui.engine.perturb import Intervention, Positions, occurs, run_arm, scored_text, select_chunks
    from chunktui.shared.settings import Sampling, resolve_protocol
    from chunktui.shared.validate import parse_layers

    questions = [q for qs in categories.values() for q in qs]
    cls_of = {q: c for c, qs in categories.items() for q in qs}
    out = {}
    for name, protocol, confounds, options in columns or COLUMNS:
        s = resolve_protocol(protocol, confounds, "graft", dict(options, max_new_tokens=max_new_tokens))
        sampling = Sampling(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"],
                            seed=seed)
        control_sampling = Sampling(max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                                    top_p=s["control_top_p"] or s["top_p"], seed=seed)
        t0 = time.perf_counter()
        control = run_arm(loaded, questions, samples, control_sampling, None, s["chat"], batch_size)
        layers = parse_layers(s["layers"], loaded.layout.n_states)
        col = {"settings": s, "concepts": {}, "seconds": 0.0}
        for concept in concepts:
            chunks = select_chunks(dictionary, [concept], [l - s["chunk_layer_shift"] for l in layers])
            if sparse and name.endswith("distinctive"):
                chunks = distinctive(chunks, sparse, dictionary.layer_means)
            iv = Intervention(chunks, "graft", s["strength"], Positions.parse(s["positions"]), site=s["site"],
                              chunk_layer_shift=s["chunk_layer_shift"])
            grafted = run_arm(loaded, questions, samples, sampling, iv, s["chat"], batch_size)
            rows = []
            for c, g in zip(control, grafted):
                rows.append({"class": cls_of[c.prompt], "prompt": c.prompt, "seed": c.seed,
                             "control_hit": occurs(concept, scored_text(c, s["score_prompt"])),
                             "grafted_hit": occurs(concept, scored_text(g, s["score_prompt"])),
                             "control_empty": not c.text.strip(), "grafted_empty": not g.text.strip(),
                             "control": c.text, "grafted": g.text})
            col["concepts"][concept] = rows
        col["seconds"] = time.perf_counter() - t0
        out[name] = col
        print(f"  column {name}: {len(concepts)} concepts x {len(control)} rows in {col['seconds']:.0f} s", flush=True)
    return out


def summarise_grafting(graft: dict, classes: list[str]) -> dict:
    table = {}
    for name, col in graft.items():
        concepts = list(col["concepts"])
        per_class = {}
        for cls in classes:
            # (questions, concepts * samples) hits, questions in order
            qs = sorted({r["prompt"] for r in col["concepts"][concepts[0]] if r["class"] == cls})
            def arr(key):
                return torch.tensor([[float(r[key]) for c in concepts for r in col["concepts"][c]
                                      if r["prompt"] == q] for q in qs])
            per_class[cls] = {k: arr(k) for k in ("control_hit", "grafted_hit", "control_empty", "grafted_empty")}
        rows = {}
        for cls in classes + ["mean"]:
            group = per_class if cls == "mean" else {cls: per_class[cls]}
            ctrl = {k: v["control_hit"] for k, v in group.items()}
            graf = {k: v["grafted_hit"] for k, v in group.items()}
            delta = {k: v["grafted_hit"] - v["control_hit"] for k, v in group.items()}
            mean = lambda d: sum(float(v.mean()) for v in d.values()) / len(d)  # noqa: E731
            rows[cls] = {"control": mean(ctrl), "grafted": mean(graf), "delta": mean(delta),
                         "control_ci": bootstrap(ctrl), "grafted_ci": bootstrap(graf), "delta_ci": bootstrap(delta),
                         "control_empty": mean({k: v["control_empty"] for k, v in group.items()}),
                         "grafted_empty": mean({k: v["grafted_empty"] for k, v in group.items()}),
                         "rows": sum(int(v["control_hit"].numel()) for v in group.values())}
        by_concept = {c: {"control": sum(r["control_hit"] for r in col["concepts"][c]) / len(col["concepts"][c]),
                          "grafted": sum(r["grafted_hit"] for r in col["concepts"][c]) / len(col["concepts"][c])}
                      for c in concepts}
        table[name] = {"rows": rows, "by_concept": by_concept}
    return table


def print_grafting(table: dict, classes: list[str], graft: dict, per_category: int, concepts: list[str],
                   samples: int) -> None:
    from chunktui.shared.settings import protocol_lines

    print(f"\n(b) GRAFTING per question class: occurrence of the concept word (whole word, case-insensitive), "
          f"control -> grafted; {len(concepts)} concepts ({', '.join(concepts)}) x {per_category} questions per "
          f"class x {samples} sample(s); [95% bootstrap interval over questions]")
    for name, col in graft.items():
        for line in protocol_lines(col["settings"]):
            print(f"  {name}: {line}")
    head = f"{'class':<14}{'paper (Llama-3-8B)':>20}" + "".join(f"{n:>34}" for n in table)
    print(head)
    for cls in classes + ["mean"]:
        pc = PAPER_MEAN if cls == "mean" else PAPER_CATEGORIES[cls]
        cells = []
        for name in table:
            r = table[name]["rows"][cls]
            cells.append(f"{r['control']:.3f} -> {r['grafted']:.3f} [{r['grafted_ci'][0]:.2f},{r['grafted_ci'][1]:.2f}]")
        print(f"{cls:<14}{pc[0]:>9.3f} -> {pc[1]:.3f}" + "".join(f"{c:>34}" for c in cells))
    print(f"{'change (mean)':<14}{PAPER_MEAN[1] - PAPER_MEAN[0]:>+20.3f}" + "".join(
        f"{table[n]['rows']['mean']['delta']:>+17.3f} [{table[n]['rows']['mean']['delta_ci'][0]:+.2f},"
        f"{table[n]['rows']['mean']['delta_ci'][1]:+.2f}]".rjust(34) for n in table))
    print(f"{'empty answers':<14}{'':>20}" + "".join(
        f"{table[n]['rows']['mean']['control_empty']:.2f} -> {table[n]['rows']['mean']['grafted_empty']:.2f}".rjust(34)
        for n in table))
    print("per concept (control -> grafted, all classes): " + "; ".join(
        f"{n}: " + ", ".join(f"{c} {v['control']:.2f}->{v['grafted']:.2f}" for c, v in table[n]["by_concept"].items())
        for n in table))


FUNCTION_WORDS = ("the", "in", "a", "of", "is")


def function_word_rates(graft: dict) -> dict:
    """What the confounds do where the control rate is not 0: occurrence of function words (the paper's 75 words
    include "in" and "the") in the control arms, top-p 0.9 (paper) against 0.5 (paper+confounds), scored on the
    continuation and on prompt + continuation. Read from the control texts already generated; no model run."""
    from chunktui.engine.perturb import occurs

    out = {}
    for name in ("paper", "paper+confounds"):
        if name not in graft:
            continue
        rows = next(iter(graft[name]["concepts"].values()))  # the control arm is the same for every concept
        out[name] = {w: {"continuation": sum(occurs(w, r["control"]) for r in rows) / len(rows),
                         "prompt + continuation": sum(occurs(w, f"{r['prompt']} {r['control']}") for r in rows)
                         / len(rows)} for w in FUNCTION_WORDS}
    return out


def print_function_words(rates: dict) -> None:
    print("\nthe confounds where the control is not 0: function words in the control arms "
          "(continuation / prompt + continuation)")
    print(f"{'control arm':<34}" + "".join(f"{w:>14}" for w in FUNCTION_WORDS))
    for name, r in rates.items():
        label = "top-p 0.9 (paper)" if name == "paper" else "top-p 0.5 (the code's control)"
        print(f"{label:<34}" + "".join(f"{r[w]['continuation']:.2f} / {r[w]['prompt + continuation']:.2f}".rjust(14)
                                       for w in FUNCTION_WORDS))


def freezing(loaded, dictionary, concepts: list[str], seed: int) -> dict:
    from chunktui.engine.dictionary import Chunk
    from chunktui.engine.perturb import Intervention, Positions, first_token_ids, next_token_logprobs, select_chunks
    from chunktui.shared.texts import iter_jsonl

    records = [r for _, r in iter_jsonl("sample_data/inviting.jsonl")]
    layers = list(range(2, 10))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for concept in concepts:
        texts = [r["prompt"] for r in records if r["concept"] == concept]
        if not texts:
            continue
        ids = first_token_ids(loaded, concept)
        base = next_token_logprobs(loaded, texts, None, chat=False)[:, ids].logsumexp(-1)
        chunks = select_chunks(dictionary, [concept], layers)
        random_chunks = [Chunk(id=f"random@{c.layer}", label=concept, layer=c.layer,
                               subpopulation=torch.randperm(loaded.hidden_size, generator=g)[:c.size].sort().values,
                               template=torch.zeros(c.size)) for c in chunks]
        out[concept] = {"prompts": len(texts), "logprob_control": float(base.mean()),
                        "mean_subpopulation": sum(c.size for c in chunks) / len(chunks), "conditions": {}}
        for site in ("residual", "attention"):
            for positions in ("prompt[-4:-1]", "prompt"):
                for which, cs in (("chunk", chunks), ("random same size", random_chunks)):
                    iv = Intervention(cs, "freeze", 1.0, Positions.parse(positions), site=site)
                    frozen = next_token_logprobs(loaded, texts, iv, chat=False)[:, ids].logsumexp(-1)
                    d = frozen - base
                    out[concept]["conditions"][f"{site} {positions} {which}"] = {
                        "delta": float(d.mean()), "lowered": int((d < 0).sum()), "deltas": d.tolist()}
    return out


def print_freezing(freeze: dict) -> None:
    print("\n(c) FREEZING (to 0) at blocks 2-9 on inviting completions (sample_data/inviting.jsonl, no chat template): "
          "change in log p(concept's first token), mean over prompts (lowered in k of n); a random subpopulation "
          "of the same size per layer, frozen the same way, is the control")
    concepts = list(freeze)
    conditions = list(freeze[concepts[0]]["conditions"])
    print(f"{'site, positions, what is frozen':<44}" + "".join(f"{c:>14}" for c in concepts) + f"{'all':>14}")
    print(f"{'(log p without freezing; mean |M|)':<44}" + "".join(
        f"{freeze[c]['logprob_control']:>8.2f}; {freeze[c]['mean_subpopulation']:.0f}" for c in concepts))
    for cond in conditions:
        cells = [f"{freeze[c]['conditions'][cond]['delta']:+.2f} ({freeze[c]['conditions'][cond]['lowered']}/"
                 f"{freeze[c]['prompts']})" for c in concepts]
        allv = [d for c in concepts for d in freeze[c]["conditions"][cond]["deltas"]]
        cells.append(f"{sum(allv) / len(allv):+.2f} ({sum(x < 0 for x in allv)}/{len(allv)})")
        print(f"{cond:<44}" + "".join(f"{x:>14}" for x in cells))


def _sparse(chunks, keep: int):
    """The same chunks restricted to the `keep` neurons whose template is furthest from zero (a sparser chunk)."""
    from chunktui.engine.dictionary import Chunk

    out = []
    for c in chunks:
        top = c.template.abs().topk(min(keep, c.size)).indices
        out.append(Chunk(id=f"{c.id}-top{keep}", label=c.label, layer=c.layer, subpopulation=c.subpopulation[top],
                         template=c.template[top]))
    return out


def attention_trial(loaded, dictionary) -> dict:
    """The hand trial: cheese chunks, blocks 2-29, the last prompt token, 12 questions, greedy."""
    from chunktui.engine.perturb import Intervention, Positions, next_token_logprobs, run_arm, select_chunks
    from chunktui.engine.tokens import eos_ids
    from chunktui.shared.settings import Sampling

    questions = [q.strip() for q in open("sample_data/questions.txt", encoding="utf-8") if q.strip()][:12]
    stops = sorted(eos_ids(loaded))
    tok = loaded.tokenizer
    greedy = Sampling(max_new_tokens=12, temperature=0.0)
    layers = list(range(2, 30))
    cheese = select_chunks(dictionary, ["cheese"], layers)
    dog = select_chunks(dictionary, ["dog"], layers)
    out = {"mean_subpopulation": sum(c.size for c in cheese) / len(cheese), "settings": {}}
    conditions = [(True, "attention", 1.0, "cheese", cheese), (True, "attention", 0.3, "cheese", cheese),
                  (True, "attention", 0.05, "cheese", cheese), (True, "attention", 1.0, "dog", dog),
                  (True, "attention", 1.0, "cheese top-64", _sparse(cheese, 64)),
                  (True, "residual", 1.0, "cheese", cheese), (True, "residual", 0.3, "cheese", cheese),
                  (True, "residual", 0.05, "cheese", cheese),
                  (False, "attention", 1.0, "cheese", cheese), (False, "residual", 1.0, "cheese", cheese)]
    base = {}
    for chat in (True, False):
        lp = next_token_logprobs(loaded, questions, None, chat=chat)
        rows = run_arm(loaded, questions, 1, greedy, None, chat, 12)
        base[chat] = {"p_eos_first": float(lp[:, stops].exp().sum(-1).mean()),
                      "empty": sum(not r.text.strip() for r in rows) / len(rows),
                      "eos_top": sum(int(lp[i].argmax()) in stops for i in range(len(questions))),
                      "top_first_tokens": [tok.decode([i]) for i in lp.mean(0).topk(3).indices.tolist()]}
        out[f"chat {'on' if chat else 'off'}, no edit"] = base[chat]
    for chat, site, strength, what, chunks in conditions:
        iv = Intervention(chunks, "graft", strength, Positions.parse("prompt[-1:]"), site=site)
        lp = next_token_logprobs(loaded, questions, iv, chat=chat)
        rows = run_arm(loaded, questions, 1, greedy, iv, chat, 12)
        out[f"chat {'on' if chat else 'off'}, {site}, {what} x{strength:g}"] = {
            "p_eos_first": float(lp[:, stops].exp().sum(-1).mean()),
            "empty": sum(not r.text.strip() for r in rows) / len(rows),
            "eos_top": sum(int(lp[i].argmax()) in stops for i in range(len(questions))),
            "top_first_tokens": [tok.decode([i]) for i in lp.mean(0).topk(3).indices.tolist()],
            "example": rows[0].text}
    return out


def print_attention_trial(trial: dict) -> None:
    print(f"\n(d) THE ATTENTION-SITE HAND TRIAL: graft at blocks 2-29, positions prompt[-1:], 12 questions "
          f"(sample_data/questions.txt), greedy, 12 new tokens; the cheese chunks hold {trial['mean_subpopulation']:.0f} "
          "of 576 neurons on average; 'top-64': the same chunks cut to the 64 neurons with the largest template")
    print(f"{'setting':<44}{'empty':>7}{'EOS top-1':>11}{'P(EOS first)':>14}   top first tokens (mean log p)")
    for key, r in trial.items():
        if not isinstance(r, dict) or "empty" not in r:
            continue
        print(f"{key:<44}{r['empty']:>7.2f}{r['eos_top']:>8}/12{r['p_eos_first']:>14.3f}   "
              f"{json.dumps(r['top_first_tokens'])}")


@click.command()
@click.option("--model", "spec", default="smollm2-135m")
@click.option("--dict", "dict_path", default="sample_data/smollm2-135m.chunks.safetensors")
@click.option("--categories", default="sample_data/categories.jsonl")
@click.option("--per-category", default=5, show_default=True, help="the first K questions of each class")
@click.option("--concepts", default="cheese,cake,chocolate,coffee,pizza", show_default=True)
@click.option("--samples", default=1, show_default=True)
@click.option("--max-new-tokens", default=24, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--threads", default=1, show_default=True)
@click.option("--parts", default="abcd", show_default=True,
              help="which tables: a detection, b grafting, c freezing, d the attention-site hand trial")
@click.option("--columns", default="paper,paper+confounds,chunktui default,paper, chat template", show_default=True,
              help="grafting columns (b), separated by ';' or ','; 'paper, K distinctive' adds the paper's protocol "
                   "with each chunk cut to its K most distinctive neurons (furthest from the corpus mean)")
@click.option("--json", "json_out", default=None)
def main(spec, dict_path, categories, per_category, concepts, samples, max_new_tokens, seed, batch_size, threads,
         parts, columns, json_out):
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.engine.models import load_model
    from chunktui.shared.texts import iter_jsonl

    torch.set_num_threads(threads)
    random.seed(seed)
    start = time.perf_counter()
    loaded = load_model(spec, device="cpu")
    dictionary = load_dictionary(dict_path, identity=loaded.identity())
    by_class: dict[str, list[str]] = {}
    for _, r in iter_jsonl(categories):
        by_class.setdefault(r["category"], []).append(r["question"])
    classes = list(PAPER_CATEGORIES)
    chosen = {c: by_class[c][:per_category] for c in classes}
    concept_list = [c.strip() for c in concepts.split(",") if c.strip()]
    print(f"model {loaded.name}, {threads} thread(s), seed {seed}; dictionary {dict_path}")
    result = {"model": loaded.name, "seed": seed, "threads": threads, "per_category": per_category,
              "concepts": concept_list, "samples": samples, "max_new_tokens": max_new_tokens}
    if "d" in parts:
        t0 = time.perf_counter()
        result["attention_trial"] = attention_trial(loaded, dictionary)
        print_attention_trial(result["attention_trial"])
        print(f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    if "c" in parts:
        t0 = time.perf_counter()
        result["freezing"] = freezing(loaded, dictionary, concept_list, seed)
        print_freezing(result["freezing"])
        print(f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    if "b" in parts:
        t0 = time.perf_counter()
        chosen_columns, sparse = [], 0
        for name in [c.strip() for c in columns.split(";")] if ";" in columns else _split_columns(columns):
            m = re.fullmatch(r"paper, (\d+) distinctive", name)
            if m:
                sparse = int(m.group(1))
                chosen_columns.append((name, "paper", False, {}))
            else:
                chosen_columns.append(next(c for c in COLUMNS if c[0] == name))
        graft = grafting(loaded, dictionary, chosen, concept_list, samples, max_new_tokens, seed, batch_size,
                         chosen_columns, sparse)
        table = summarise_grafting(graft, classes)
        print_grafting(table, classes, graft, per_category, concept_list, samples)
        rates = function_word_rates(graft)
        if rates:
            print_function_words(rates)
        result["function_words"] = rates
        print(f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        result["grafting"] = {"table": table, "runs": graft}
    if "a" in parts:
        t0 = time.perf_counter()
        result["detection"] = detection(loaded, threads)
        print_detection(result["detection"])
        print(f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    result["seconds"] = time.perf_counter() - start
    print(f"\ntotal {result['seconds']:.0f} s")
    if json_out:
        from chunktui.shared.io import write_json

        write_json(json_out, result)


if __name__ == "__main__":
    main()
