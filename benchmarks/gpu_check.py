"""The GPU figures in one table: load, streaming (generate vs stream), perturbation overhead, the app.

Run by scripts/gpu_check.sh on a CUDA machine (bfloat16 on `cuda` by default); it also runs on the CPU
(`--device cpu --dtype float32`) to check the script itself. Each row gives the peak memory torch
allocated on the GPU while it ran.

    python benchmarks/gpu_check.py [--model smollm2-135m] [--device cuda] [--dtype bfloat16]
                                   [--device-map auto] [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOAD_CHILD = r"""
import json, sys, time
import torch
import transformers.modeling_utils  # imports are not the model's load time
from chunktui.engine.models import load_model
args = json.loads(sys.argv[1])
t = time.perf_counter()
m = load_model(args["model"], device=args["device"], dtype=args["dtype"], device_map=args["device_map"])
if torch.cuda.is_available():
    torch.cuda.synchronize()
seconds = time.perf_counter() - t
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print(json.dumps({"seconds": seconds, "peak": peak, "placement": m.card()["placement"], "dtype": m.card()["dtype"]}))
"""


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> str:
    if not torch.cuda.is_available():
        return "-"
    torch.cuda.synchronize()
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


def _synthetic_dictionary(loaded, labels: int = 34, seed: int = 0):
    """A dictionary the size of the sample one (34 concepts x every layer) for a model that has none."""
    from chunktui.engine.dictionary import Chunk, ChunkDictionary

    g = torch.Generator().manual_seed(seed)
    d = loaded.hidden_size
    chunks = []
    for label in range(labels):
        for layer in range(loaded.layout.n_states):
            neurons = torch.randperm(d, generator=g)[: d // 4].sort().values
            chunks.append(Chunk(id=f"c{label}@{layer}", label=f"c{label}", layer=layer, subpopulation=neurons,
                                template=torch.randn(len(neurons), generator=g), threshold=1.0))
    return ChunkDictionary(chunks=chunks, model=loaded.identity())


@click.command()
@click.option("--model", "spec", default="smollm2-135m", show_default=True)
@click.option("--dict", "dict_path", default=None, help="default: the sample dictionary for the built-in model, "
                                                        "else a synthetic one of the same size")
@click.option("--device", default="cuda", show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--device-map", default=None, help="e.g. auto, to shard a model larger than one GPU")
@click.option("--tokens", default=128, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--json", "json_out", default=None, help="also write the figures here")
def main(spec, dict_path, device, dtype, device_map, tokens, repeats, json_out):
    from benchmarks.streaming import measure
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.engine.matching import pack
    from chunktui.engine.memory import describe_report, memory_report
    from chunktui.engine.models import load_model
    from chunktui.paths import DEFAULT_DICT_NAME, sample_path

    rows: list[tuple[str, str, str, str]] = []  # benchmark, figure, value, peak VRAM
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = json.dumps({"model": spec, "device": device, "dtype": dtype, "device_map": device_map})
    # 1. load, in a fresh process (imports excluded), weights straight onto the device
    load = json.loads(subprocess.run([sys.executable, "-c", LOAD_CHILD, args], env=env, capture_output=True,
                                     text=True, check=True).stdout.strip().splitlines()[-1])
    peak = f"{load['peak'] / 2**30:.2f} GiB" if load["peak"] is not None else "-"
    rows.append(("load", f"{spec} onto {load['placement']} ({load['dtype']})", f"{load['seconds']:.2f} s", peak))

    # 2. and 3. streaming and perturbation overhead, in this process
    loaded = load_model(spec, device=device, dtype=dtype, device_map=device_map)
    if dict_path is None and spec == "smollm2-135m":
        dict_path = str(sample_path(DEFAULT_DICT_NAME))
    dictionary = load_dictionary(dict_path, identity=loaded.identity()) if dict_path else _synthetic_dictionary(loaded)
    packed = pack(dictionary.chunks, loaded.hidden_size, loaded.layout.n_states, loaded.device)
    _peak_reset()
    r = measure(loaded, packed, dictionary, tokens, repeats)
    stream_peak = _peak()
    rows.append(("streaming", "model.generate", f"{r['generate']:.1f} tok/s", stream_peak))
    rows.append(("streaming", f"stream, {loaded.layout.n_states} layers recorded, {len(packed)} chunks matched "
                              f"({packed.precision})", f"{r['stream']:.1f} tok/s", stream_peak))
    rows.append(("streaming", "ratio stream / generate (target >= 0.9)", f"{r['ratio']:.3f}", stream_peak))
    rows.append(("perturbation", f"decode, graft {r['graft']}", f"{r['decode_graft']:.1f} tok/s", stream_peak))
    rows.append(("perturbation", "overhead vs plain decode (target < 5%)", f"{r['overhead_percent']:+.1f}%",
                 stream_peak))
    memory = describe_report(memory_report(loaded, kv_tokens=tokens, state_tokens=tokens))

    # 4. the app, when this version has its benchmark command (its engine loads with dtype auto: bf16 on CUDA)
    chunktui = [sys.executable, "-c", "from chunktui.cli import main; main()"]
    has_bench = subprocess.run(chunktui + ["bench", "--help"], env=env, capture_output=True, text=True)
    if has_bench.returncode == 0 and "app" in has_bench.stdout:
        figures = Path(tempfile.mkdtemp()) / "app.json"
        out = subprocess.run(chunktui + ["bench", "app", "--model", spec, "--device", device, "--tokens",
                                         str(max(tokens, 200)), "--json", str(figures)],
                             env=env, capture_output=True, text=True)
        if out.returncode == 0 and figures.is_file():
            app = json.loads(figures.read_text())
            lat = app.get("key_latency_ms", {})
            rows.append(("app", "engine alone / in the app", f"{app['engine_alone']['tokens_per_second']} / "
                                                             f"{app['app']['tokens_per_second']} tok/s", "-"))
            rows.append(("app", "ratio app / engine", str(app.get("ratio")), "-"))
            rows.append(("app", "key latency median / p95", f"{lat.get('median')} / {lat.get('p95')} ms", "-"))
            rows.append(("app", "frame rate", f"{app.get('frame_rate')} frames/s", "-"))
        else:
            last = (out.stderr.strip() or out.stdout.strip() or "no output").splitlines()[-1][:120]
            rows.append(("app", f"chunktui bench app failed (exit {out.returncode})", last, "-"))
    else:
        rows.append(("app", "skipped: this version has no `chunktui bench app`", "-", "-"))

    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and device.startswith("cuda") else device
    print(f"\nchunktui GPU check: {spec}, {dtype} on {device_name}, {tokens} new tokens, median of {repeats}")
    widths = [max(len(row[i]) for row in rows + [("benchmark", "figure", "value", "peak VRAM")]) for i in range(4)]
    for row in [("benchmark", "figure", "value", "peak VRAM")] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(f"\nmemory after the streaming runs:\n{memory}")
    if json_out:
        Path(json_out).write_text(json.dumps({"model": spec, "device": device_name, "dtype": dtype, "rows": rows,
                                              "streaming": {k: v for k, v in r.items() if k != "runs"},
                                              "load": load}, indent=2))
    if shutil.which("nvidia-smi") and device.startswith("cuda"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv"])


if __name__ == "__main__":
    main()
