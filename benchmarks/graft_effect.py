"""Does grafting a concept's chunks make the model talk about it? (docs/method.md section 3)

One control arm (no intervention) and one grafted arm per concept, identical
prompts, sampling settings and seeds. Prints, per concept, the occurrence rate
(whole word, case-insensitive) in both arms and the change in the next-token
log-probability of the concept's first token; optionally writes every pair.

    python benchmarks/graft_effect.py --concepts cheese,cake,chocolate,coffee,dog --prompts 30
"""

from __future__ import annotations

import time

import click
import torch


@click.command()
@click.option("--model", "spec", default="smollm2-135m")
@click.option("--dict", "dict_path", default="sample_data/smollm2-135m.chunks.safetensors")
@click.option("--concepts", default="cheese,cake,chocolate,coffee,pizza")
@click.option("--questions", default="sample_data/questions.txt")
@click.option("--prompts", "n_prompts", default=30)
@click.option("--samples", default=1)
@click.option("--layers", default="2-9")
@click.option("--positions", default="prompt")
@click.option("--mode", default="graft")
@click.option("--strength", default=0.05)
@click.option("--max-new-tokens", default=48)
@click.option("--temperature", default=0.8)
@click.option("--top-p", default=0.9)
@click.option("--seed", default=0)
@click.option("--batch-size", default=16)
@click.option("--threads", default=2)
@click.option("--inviting", default="sample_data/inviting.jsonl",
              help="completions that invite each concept: the effect of freezing on its log-probability")
@click.option("--json", "json_out", default=None)
def main(spec, dict_path, concepts, questions, n_prompts, samples, layers, positions, mode, strength, max_new_tokens,
         temperature, top_p, seed, batch_size, threads, inviting, json_out):
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.shared.validate import parse_layers
    from chunktui.engine.models import load_model
    from chunktui.engine.perturb import Intervention, Positions, compare, run_arm, select_chunks
    from chunktui.shared.settings import Sampling

    torch.set_num_threads(threads)
    loaded = load_model(spec)
    dictionary = load_dictionary(dict_path, identity=loaded.identity())
    prompts = [q.strip() for q in open(questions, encoding="utf-8") if q.strip()][:n_prompts]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    layer_list = parse_layers(layers, loaded.layout.n_states)
    t0 = time.perf_counter()
    control = run_arm(loaded, prompts, samples, sampling, None, True, batch_size)
    print(f"control arm: {len(control)} continuations in {time.perf_counter() - t0:.0f} s", flush=True)
    rows, reports = [], {}
    for label in concepts.split(","):
        iv = Intervention(select_chunks(dictionary, [label], layer_list), mode, strength, Positions.parse(positions))
        t1 = time.perf_counter()
        report = compare(loaded, iv, prompts, samples, sampling, True, batch_size, control=control)
        c = report.concepts[label]
        rows.append((label, c))
        reports[label] = report.to_json()
        print(f"{label:<10} control {c['control_rate']:.2f}  {mode} {c['perturbed_rate']:.2f}  "
              f"change {c['delta_rate']:+.2f}   log p first token {c['logprob_control']:.2f} -> "
              f"{c['logprob_perturbed']:.2f} ({c['delta_logprob']:+.2f})   [{time.perf_counter() - t1:.0f} s]", flush=True)
    freeze = {}
    if inviting:
        import json

        from chunktui.engine.perturb import first_token_ids, next_token_logprobs

        records = [json.loads(line) for line in open(inviting, encoding="utf-8") if line.strip()]
        print(f"\nfreeze x1 at layers {layers}, all prompt positions, on completions that invite the concept (no chat template):")
        for label in concepts.split(","):
            texts = [r["prompt"] for r in records if r["concept"] == label]
            if not texts:
                continue
            ids = first_token_ids(loaded, label)
            iv = Intervention(select_chunks(dictionary, [label], layer_list), "freeze", 1.0, Positions("prompt"))
            base = next_token_logprobs(loaded, texts, None, chat=False)[:, ids].logsumexp(-1)
            frozen = next_token_logprobs(loaded, texts, iv, chat=False)[:, ids].logsumexp(-1)
            freeze[label] = {"prompts": len(texts), "logprob_control": float(base.mean()),
                             "logprob_frozen": float(frozen.mean()), "delta_logprob": float((frozen - base).mean()),
                             "lowered": int((frozen < base).sum())}
            f = freeze[label]
            print(f"{label:<10} log p {f['logprob_control']:.2f} -> {f['logprob_frozen']:.2f} "
                  f"({f['delta_logprob']:+.2f}), lowered in {f['lowered']}/{f['prompts']} prompts", flush=True)
    mean = sum(c["delta_rate"] for _, c in rows) / len(rows)
    print(f"\n{mode} x{strength} at layers {layers}, positions {positions}, {len(prompts)} prompts x {samples} "
          f"samples, T={temperature}, top-p={top_p}, same seeds in both arms")
    print(f"mean change in occurrence rate over {len(rows)} concepts: {mean:+.3f}")
    if json_out:
        from chunktui.shared.io import write_json

        write_json(json_out, {"mean_delta_rate": mean, "reports": reports, "freeze": freeze})


if __name__ == "__main__":
    main()
