"""Device memory: the report the app shows, and runs refused up front when they will not fit."""

import pytest
import torch
from click.testing import CliRunner

from chunktui.cli import main
from chunktui.engine import allocator, memory
from chunktui.shared.errors import DeviceMemoryError
from chunktui.engine.corpus import collect
from chunktui.engine.memory import estimate_run, memory_report
from chunktui.engine.streaming import generate_stream, scan_text
from chunktui.shared.settings import Sampling


def test_report_of_a_plain_load(tiny_model):
    rows = memory_report(tiny_model, kv_tokens=10, state_tokens=7)
    assert [r.device for r in rows] == ["cpu"]
    cpu = rows[0]
    assert cpu.weights == sum(p.numel() * 4 for p in tiny_model.model.parameters())
    assert cpu.kv_cache == 10 * 4 * 2 * 2 * 16 * 4 and cpu.states == 7 * 5 * 64 * 4
    assert cpu.used == cpu.weights + cpu.kv_cache + cpu.states
    assert set(cpu.to_json()) >= {"device", "weights", "kv_cache", "states", "free", "total", "peak", "used"}


def test_estimate_grows_with_tokens_batch_and_recording(tiny_model):
    small = estimate_run(tiny_model, 10, 10)["cpu"]
    assert estimate_run(tiny_model, 10, 110)["cpu"]["kv_cache"] == 6 * small["kv_cache"]
    assert estimate_run(tiny_model, 10, 10, batch=4)["cpu"]["kv_cache"] == 4 * small["kv_cache"]
    assert "states" not in estimate_run(tiny_model, 10, 10, record=False)["cpu"]
    assert estimate_run(tiny_model, 10, 0, full_logits=True)["cpu"]["logits"] == 10 * small["logits"]


class _Forwards:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.calls += 1


def test_runs_that_will_not_fit_are_refused_before_any_work(tiny_model, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * 1024)  # 64 KiB free
    counter = _Forwards(tiny_model.model)
    try:
        with pytest.raises(DeviceMemoryError, match=r"Not started: generating .* on cpu .*KV cache.*free"):
            list(generate_stream(tiny_model, "The dog", Sampling(max_new_tokens=500)))
        with pytest.raises(DeviceMemoryError, match="Not started: scanning"):
            scan_text(tiny_model, "The dog ate the cheese. " * 20)
        with pytest.raises(DeviceMemoryError, match="Not started: collecting"):
            collect(tiny_model, "The dog ate the cheese. " * 200, batch_size=64)
        assert counter.calls == 0
        # a run that fits still runs
        monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 30)
        assert len(list(generate_stream(tiny_model, "The dog", Sampling(max_new_tokens=3)))) > 3
        assert counter.calls > 0
    finally:
        counter.handle.remove()


def test_unknown_free_memory_refuses_nothing(tiny_model, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    assert list(generate_stream(tiny_model, "The dog", Sampling(max_new_tokens=2)))


def test_cli_refuses_a_generation_larger_than_memory(tiny_dict, monkeypatch):
    _, path = tiny_dict
    monkeypatch.setattr(memory, "available_bytes", lambda where: 64 * 1024)  # a nearly full device
    r = CliRunner().invoke(main, ["scan", "--model", "random:llama-tiny", "--dict", str(path), "--prompt", "hi",
                                  "--generate", "400"])
    assert r.exit_code == 2 and "Not started: generating" in r.output and "Traceback" not in r.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh there)")
def test_cuda_report_has_free_total_and_peak():
    from chunktui.engine.models import load_model

    loaded = load_model("random:llama-tiny", device="cuda")
    (row,) = [r for r in memory_report(loaded, kv_tokens=5) if r.device.startswith("cuda")]
    assert row.weights > 0 and row.free is not None and row.total >= row.free and row.peak >= row.weights


_FAULTS_SCRIPT = """
import os, resource, sys, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def cycle():  # take 64 MiB, write it, free it; the faults of the sixth time
    # (the heap may take a second fresh region in the second or third round, when a small block lands above the
    # first one while it is free; from then on it reuses the two)
    for _ in range(6):
        before = faults()
        torch.ones(16 << 20)
    return faults() - before
default = cycle()
if sys.argv[1] == "engine":  # what the app's engine process does: load, generate
    from chunktui.api import Engine
    engine = Engine.load("random:llama-tiny", device="cpu")
    assert len(list(engine.stream("The dog", max_new_tokens=3))) > 3
elif sys.argv[1] != "none":
    from chunktui.engine.models import load_model
    from chunktui.engine.streaming import generate_stream
    from chunktui.shared.settings import Sampling
    loaded = load_model("random:llama-tiny", device="cpu")
    assert len(list(generate_stream(loaded, "The dog", Sampling(max_new_tokens=3)))) > 3
if sys.argv[1] == "collect":
    from chunktui.engine.corpus import collect
    assert len(collect(loaded, "The dog runs. The cat sleeps.").tokens) > 0
if sys.argv[1] == "cache":
    import tempfile
    from chunktui.engine.corpus import cache_states, prepare_corpus
    corpus = prepare_corpus(loaded.tokenizer, "The dog runs. The cat sleeps.")
    cache_states(loaded, corpus, [0, 1], tempfile.mkdtemp())
print(default, cycle())
"""


@pytest.mark.skipif(allocator._glibc() is None, reason="the allocator setting is glibc's (Linux)")
@pytest.mark.parametrize("how", ["collect", "cache", "generate", "engine", "none"])
def test_a_corpus_job_reuses_the_memory_it_frees_and_generation_keeps_the_default(how):
    import os
    import subprocess
    import sys

    # an allocator the user tuned would be left alone: run with glibc's defaults
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("CHUNKTUI_MALLOC", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, how], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    default, after = int(out[0]), int(out[1])
    # glibc's default maps a 64 MiB block of its own and unmaps it when freed: every page faults again
    assert default >= (16 << 20) * 4 // 4096 * 0.9
    if how in ("collect", "cache"):
        assert after < default // 10  # the heap keeps the block: the pages are the ones already there
    else:  # loading a model and generating (the app's engine) leave glibc's defaults
        assert after >= default * 0.9


def test_the_allocator_is_left_alone_where_the_user_tuned_it(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_glibc", lambda: calls.append(1))
    for env, why in [({"CHUNKTUI_MALLOC": "default"}, "CHUNKTUI_MALLOC=default"),
                     ({"MALLOC_TRIM_THRESHOLD_": "1000"}, "tuned in the environment"),
                     ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, "tuned in the environment")]:
        monkeypatch.setattr(allocator, "_allocator_state", None)
        for key in ("CHUNKTUI_MALLOC", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert why in allocator.keep_freed_memory()
        assert allocator.release_freed_memory() is False
    assert calls == []  # mallopt was never reached
