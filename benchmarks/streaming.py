"""Streaming and perturbation overhead on the built-in model.

1. `model.generate` (greedy, 128 new tokens) against `generate_stream` with
   every layer's hidden state captured and every chunk of the sample
   dictionary matched, same prompt and length. Ratio = streaming tok/s over
   generate tok/s (target >= 0.9 on CPU).
2. The same decode loop with and without an intervention (graft one concept
   at layers 2-9, on every position: the worst case) (target: < 5% slower).

    python benchmarks/streaming.py [--tokens 128] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import statistics
import time

import click
import torch


@click.command()
@click.option("--model", "spec", default="smollm2-135m")
@click.option("--dict", "dict_path", default="sample_data/smollm2-135m.chunks.safetensors")
@click.option("--tokens", default=128)
@click.option("--repeats", default=3)
@click.option("--device", default="cpu")
@click.option("--threads", default=2)
def main(spec, dict_path, tokens, repeats, device, threads):
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.engine.matching import pack
    from chunktui.engine.models import load_model
    from chunktui.engine.perturb import Intervention, Positions, intervene, select_chunks
    from chunktui.engine.streaming import PhaseFlag, Sampling, decode, encode_prompt, generate_stream

    torch.set_num_threads(threads)
    loaded = load_model(spec, device=device)
    dictionary = load_dictionary(dict_path, identity=loaded.identity())
    packed = pack(dictionary.chunks, loaded.hidden_size, loaded.layout.n_states, loaded.device)
    ids = encode_prompt(loaded, "Tell me about your favourite foods and where they come from.", chat=True)
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)

    def run_generate():
        x = torch.tensor([ids], device=loaded.device)
        sync()
        t = time.perf_counter()
        out = loaded.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
                                    min_new_tokens=tokens, do_sample=False)
        sync()
        assert out.shape[1] - len(ids) == tokens
        return tokens / (time.perf_counter() - t)

    def run_stream():
        sync()
        t = time.perf_counter()
        n = 0
        for event in generate_stream(loaded, ids, Sampling(max_new_tokens=tokens, stop_at_eos=False), packed=packed,
                                     include_prompt=False):
            n += event.generated
        sync()
        assert n == tokens
        return tokens / (time.perf_counter() - t)

    chunks = select_chunks(dictionary, ["cheese"], list(range(2, 10)))
    intervention = Intervention(chunks, "graft", 1.0, Positions("all"))

    def run_decode(iv):
        phase = PhaseFlag()
        sync()
        t = time.perf_counter()
        with intervene(loaded, iv, phase):
            n = sum(1 for _ in decode(loaded, [ids], Sampling(max_new_tokens=tokens), phase=phase))
        sync()
        return n / (time.perf_counter() - t)

    run_generate(), run_stream()  # warm up
    gen, stream, plain, pert = [], [], [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both arms alike
        gen.append(run_generate())
        stream.append(run_stream())
        plain.append(run_decode(None))
        pert.append(run_decode(intervention))
    g, s, p, q = (statistics.median(x) for x in (gen, stream, plain, pert))
    print(f"{loaded.name} on {loaded.device} ({threads} threads), {tokens} new tokens, greedy, median of {repeats}; "
          f"{len(packed)} chunks at {len(dictionary.layers())} layers")
    print(f"model.generate                                  {g:7.1f} tok/s   {[round(x, 1) for x in gen]}")
    print(f"stream + all {loaded.layout.n_states} layers captured + all chunks matched  {s:7.1f} tok/s   "
          f"{[round(x, 1) for x in stream]}")
    print(f"ratio stream / generate = {s / g:.3f}  (target >= 0.9)")
    print(f"decode loop, no intervention                    {p:7.1f} tok/s   {[round(x, 1) for x in plain]}")
    print(f"decode loop, graft at layers 2-9, all positions {q:7.1f} tok/s   {[round(x, 1) for x in pert]}")
    print(f"perturbation overhead = {(p / q - 1) * 100:+.1f}%  (target < 5%)")


if __name__ == "__main__":
    main()
