"""Cold and warm load of a GGUF model, each in a fresh process.

cold: dequantise the GGUF with transformers and write the safetensors cache
      (what the first `chunktui` run does; the download is excluded);
warm: load from that cache (every later run), in a fresh process, and again
      in the same process (what switching models in the app costs).
Both are timed inside a fresh interpreter (library import time printed separately).

    python benchmarks/load.py [--model smollm2-135m] [--repeats 3]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from chunktui.engine.models import load_model
t1 = time.perf_counter()
m = load_model(sys.argv[1], device="cpu")
t2 = time.perf_counter()
del m
m = load_model(sys.argv[1], device="cpu")  # again: modules already imported, only the model's own work
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "reload": t3 - t2}))
"""


def run_child(spec: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, spec], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--model", "spec", default="smollm2-135m")
@click.option("--repeats", default=3)
def main(spec, repeats):
    from chunktui.engine.models import cache_dir, fetch_builtin
    from chunktui.shared.specs import BUILTIN_MODELS

    gguf = fetch_builtin(spec) if spec in BUILTIN_MODELS else Path(spec)
    with tempfile.TemporaryDirectory() as tmp:
        # a private cache holding only the GGUF: the first load must convert it
        (Path(tmp) / "gguf").mkdir()
        shutil.copy(gguf, Path(tmp) / "gguf" / gguf.name)
        env = dict(os.environ, CHUNKTUI_CACHE=tmp, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        cold = run_child(spec, env)
        warm = [run_child(spec, env) for _ in range(repeats)]
    warm_load = statistics.median(w["load"] for w in warm)
    warm_import = statistics.median(w["import"] for w in warm)
    reload = statistics.median(w["reload"] for w in warm)
    print(f"model {spec}")
    print(f"cold load (dequantise GGUF + write cache): {cold['load']:.2f} s  (+ {cold['import']:.2f} s imports)")
    print(f"warm load (safetensors cache), median of {repeats}: {warm_load:.2f} s  (+ {warm_import:.2f} s imports)")
    print(f"warm / cold = {warm_load / cold['load']:.3f}  ({cold['load'] / warm_load:.1f}x faster)")
    print(f"of the warm load, transformers importing the model's modules on first use is most; loading again in "
          f"the same process (modules imported) takes {reload:.2f} s")


if __name__ == "__main__":
    main()
