"""Streaming and perturbation overhead on the built-in model.

1. `model.generate` (greedy, 128 new tokens) against `generate_stream` with
   every layer's hidden state captured and every chunk of the sample
   dictionary matched, same prompt and length. Ratio = streaming tok/s over
   generate tok/s (target >= 0.9 on CPU).
2. The same decode loop with and without an intervention (graft one concept
   at layers 2-9, on every position: the worst case) (target: < 5% slower).

    python benchmarks/streaming.py [--tokens 128] [--repeats 3] [--device cpu] [--dtype auto]
"""

from __future__ import annotations

import statistics
import time

import click
import torch


def measure(loaded, packed, dictionary, tokens: int = 128, repeats: int = 3) -> dict:
    """generate vs stream (every layer recorded, every chunk matched) and the decode loop with and without a graft.

    Returns tok/s medians and the per-repeat figures; interleaved, so drift in machine load hits all arms alike.
    """
    from chunktui.engine.perturb import Intervention, Positions, intervene, select_chunks
    from chunktui.engine.streaming import PhaseFlag, decode, generate_stream
    from chunktui.shared.settings import Sampling
    from chunktui.engine.tokens import encode_prompt

    ids = encode_prompt(loaded, "Tell me about your favourite foods and where they come from.", chat=True)
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)

    from chunktui.engine.lean import transformers_twin

    reference = transformers_twin(loaded.model)  # transformers' generate over the same weights

    def run_generate():
        x = torch.tensor([ids], device=loaded.device)
        sync()
        t = time.perf_counter()
        out = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens,
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

    label = "cheese" if "cheese" in dictionary.labels() else dictionary.labels()[0]
    layers = [l for l in range(2, 10) if l < loaded.n_layers] or [0]
    intervention = Intervention(select_chunks(dictionary, [label], layers), "graft", 1.0, Positions("all"))

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
    for _ in range(repeats):
        gen.append(run_generate())
        stream.append(run_stream())
        plain.append(run_decode(None))
        pert.append(run_decode(intervention))
    g, s, p, q = (statistics.median(x) for x in (gen, stream, plain, pert))
    return {"generate": g, "stream": s, "ratio": s / g, "decode": p, "decode_graft": q,
            "overhead_percent": (p / q - 1) * 100, "runs": {"generate": gen, "stream": stream, "decode": plain,
                                                             "decode_graft": pert},
            "graft": f"{label} at layers {layers[0]}-{layers[-1]}, all positions"}


@click.command()
@click.option("--model", "spec", default="smollm2-135m")
@click.option("--dict", "dict_path", default="sample_data/smollm2-135m.chunks.safetensors")
@click.option("--tokens", default=128)
@click.option("--repeats", default=3)
@click.option("--device", default="cpu")
@click.option("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 elsewhere")
@click.option("--threads", default=2)
def main(spec, dict_path, tokens, repeats, device, dtype, threads):
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.engine.matching import pack
    from chunktui.engine.models import load_model

    torch.set_num_threads(threads)
    loaded = load_model(spec, device=device, dtype=dtype)
    dictionary = load_dictionary(dict_path, identity=loaded.identity())
    packed = pack(dictionary.chunks, loaded.hidden_size, loaded.layout.n_states, loaded.device)
    r = measure(loaded, packed, dictionary, tokens, repeats)
    runs = r["runs"]
    print(f"{loaded.name} on {loaded.device} ({threads} threads), {tokens} new tokens, greedy, median of {repeats}; "
          f"{len(packed)} chunks at {len(dictionary.layers())} layers")
    print(f"model.generate                                  {r['generate']:7.1f} tok/s   "
          f"{[round(x, 1) for x in runs['generate']]}")
    print(f"stream + all {loaded.layout.n_states} layers captured + all chunks matched  {r['stream']:7.1f} tok/s   "
          f"{[round(x, 1) for x in runs['stream']]}")
    print(f"ratio stream / generate = {r['ratio']:.3f}  (target >= 0.9)")
    print(f"decode loop, no intervention                    {r['decode']:7.1f} tok/s   "
          f"{[round(x, 1) for x in runs['decode']]}")
    print(f"decode loop, graft {r['graft']} {r['decode_graft']:7.1f} tok/s   "
          f"{[round(x, 1) for x in runs['decode_graft']]}")
    print(f"perturbation overhead = {r['overhead_percent']:+.1f}%  (target < 5%)")


if __name__ == "__main__":
    main()
