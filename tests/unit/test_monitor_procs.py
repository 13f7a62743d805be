"""`chunktui monitor --procs K`: two gloo processes write what one writes, and a killed sharded run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from chunktui.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model", "random:llama-tiny", "--device", "cpu"]


def chunktui_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "chunktui", *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["COLUMNS"] = "120"  # the same table width in and out of the test process
    return e


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_corpus):
    """A corpus, a span file marking cheese, and prompts."""
    folder = tmp_path_factory.mktemp("monitor-procs")
    lines = tiny_corpus.splitlines()
    (folder / "corpus.txt").write_text("\n".join(lines[:30]))
    with (folder / "spans.jsonl").open("w") as fh:
        for line in lines[30:90]:
            marks = [[i, i + 6, "cheese"] for i in range(len(line)) if line.startswith("cheese", i)]
            fh.write(json.dumps({"text": line, "spans": marks}) + "\n")
    (folder / "prompts.txt").write_text("The dog ate\n# a comment\nI like cheese\nA cat found\n")
    return folder


TEXT_RULES = ["--rule", "one: when cheese@1 -> alert", "--rule", "two: when cheese>=2 or dog for 2 -> alert",
              "--rule", "three: when not cake@0 for 3 -> stop"]
KINDS = {
    "corpus": ["--corpus", "corpus.txt", *TEXT_RULES, "--batch-size", "4"],
    # --spans: in the resume test below (two processes, killed and resumed, against one)
    # every row fires every rule (a: most tokens, g: an intervention, s: a stop), so rows out of order show
    "prompts": ["--prompts", "prompts.txt", "--generate", "6", "--samples", "2", "--temperature", "1.0", "--no-chat",
                "--rule", "a: when not cake@0 -> alert", "--rule", "g: when not cheese for 2 -> suppress dog@1-2 x1 for 2",
                "--rule", "s: when not dog for 5 -> stop", "--batch-size", "2"],
}


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(_alive(pid) for pid in pids):
        time.sleep(0.01)


def _volatile(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("seconds", "tokens_per_second", "procs")}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_two_gloo_processes_write_what_one_writes(inputs, tiny_dict, kind, monkeypatch):
    _, dict_path = tiny_dict
    monkeypatch.chdir(inputs)
    monkeypatch.setenv("COLUMNS", "120")
    common = ["monitor", *TINY, "--dict", str(dict_path), *KINDS[kind]]
    r = CliRunner().invoke(main, [*common, "--out", f"one-{kind}.jsonl", "--json", f"one-{kind}.json"])
    assert r.exit_code == 0, r.output
    p = subprocess.run(chunktui_cmd(*common, "--procs", "2", "--out", f"two-{kind}.jsonl", "--json",
                                    f"two-{kind}.json"), env=env(), capture_output=True, text=True, timeout=600,
                       cwd=inputs)
    assert p.returncode == 0, p.stdout + p.stderr
    one, two = (inputs / f"one-{kind}.jsonl").read_text(), (inputs / f"two-{kind}.jsonl").read_text()
    lines = [json.loads(x) for x in one.splitlines()]
    assert len(lines) >= 10
    key = "prompt" if kind == "prompts" else "context"
    assert len({(x[key], x.get("seed")) for x in lines}) >= 4  # firings from many rows or contexts, both ranks'
    assert two == one  # the same lines in the same order
    s1, s2 = (json.loads((inputs / f"{n}-{kind}.json").read_text()) for n in ("one", "two"))
    assert (s1["procs"], s2["procs"]) == (1, 2)
    assert _volatile(s2) == _volatile(s1)  # per rule: firings, prompts / contexts, first tokens; the scores
    if kind == "corpus":
        assert s1["scores"]["one"]["positives"] > 0 and "precision" in p.stdout and "recall" in p.stdout
    # the printed tables too (the lines before "wrote")
    table = lambda text: [x.rstrip() for x in text.splitlines() if "│" in x or "firings over" in x]  # noqa: E731
    assert table(p.stdout) == table(r.stdout) and len(table(r.stdout)) >= 3


def test_a_killed_sharded_run_resumes_to_the_same_output(inputs, tiny_dict, monkeypatch):
    """--spans on two processes, both killed (SIGKILL) once each has checkpointed, then resumed on two: the
    firings, precision and recall of one uninterrupted process."""
    _, dict_path = tiny_dict
    monkeypatch.chdir(inputs)
    # one context a batch, dozens a process: the run cannot end before the slower process has done all of its
    # own, so a kill once both have checkpointed once comes before the end
    common = ["monitor", *TINY, "--dict", str(dict_path), "--spans", "spans.jsonl", *TEXT_RULES, "--batch-size", "1",
              "--checkpoint-every", "1"]
    r = CliRunner().invoke(main, [*common, "--out", "fresh.jsonl", "--json", "fresh.json"])
    assert r.exit_code == 0, r.output
    fresh = json.loads((inputs / "fresh.json").read_text())
    assert fresh["contexts"] >= 50 and fresh["scores"]["one"]["positives"] > 0
    proc = subprocess.Popen(chunktui_cmd(*common, "--procs", "2", "--out", "killed.jsonl"), env=env(), cwd=inputs,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    folder = inputs / "killed.jsonl.partial"
    metas = [folder / "rank0.json", folder / "rank1.json"]
    try:
        while proc.poll() is None and not all(m.exists() for m in metas):
            time.sleep(0.005)
    finally:
        workers = _children(proc.pid)  # torchrun starts each worker in a session of its own
        for pid in [proc.pid, *workers]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        _wait_gone(workers)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(workers) == 2
    assert not (inputs / "killed.jsonl").exists()
    done = [json.loads(m.read_text())["batches_done"] for m in metas]
    assert all(d > 0 for d in done) and min(done) < fresh["contexts"] // 2
    # each process resumes its own share: a resume on another number of processes is refused before any loads
    r = CliRunner().invoke(main, [*common, "--out", "killed.jsonl", "--resume"])
    assert r.exit_code == 2 and "--procs 2" in r.output and "Traceback" not in r.output
    assert "loaded" not in r.output
    p = subprocess.run(chunktui_cmd(*common, "--procs", "2", "--out", "killed.jsonl", "--resume", "--json",
                                    "resumed.json"), env=env(), cwd=inputs, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    resumed = json.loads((inputs / "resumed.json").read_text())
    assert resumed["resumed_batches"] == sum(done) and resumed["procs"] == 2
    assert (inputs / "killed.jsonl").read_text() == (inputs / "fresh.jsonl").read_text()
    drop = lambda d: {k: v for k, v in _volatile(d).items() if k != "resumed_batches"}  # noqa: E731
    assert drop(resumed) == drop(fresh)  # per rule: firings, contexts, first tokens; precision and recall
    assert not folder.exists()


@pytest.mark.parametrize("extra, message", [
    (["--procs", "0"], "--procs must be at least 1, got 0"),
    (["--procs", "-3"], "--procs must be at least 1"),
    (["--procs", "4"], "more processes than there are batches of work: 3 batches of up to 2"),
])
def test_monitor_bad_procs_exit_2_before_anything_launches(inputs, tiny_dict, monkeypatch, extra, message):
    _, dict_path = tiny_dict
    monkeypatch.chdir(inputs)
    launched = []
    monkeypatch.setattr("chunktui.engine.distributed.launch", lambda *a: launched.append(a) or 0)
    r = CliRunner().invoke(main, ["monitor", *TINY, "--dict", str(dict_path), *KINDS["prompts"], "--out", "x.jsonl",
                                  *extra])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output and "loaded" not in r.output
    assert not launched and not (inputs / "x.jsonl").exists()


def test_monitor_procs_passes_every_option_to_its_processes(inputs, tiny_dict, monkeypatch):
    """The workers run the command as given: repeated rules, --no-chat, placement options, less --procs."""
    _, dict_path = tiny_dict
    monkeypatch.chdir(inputs)
    launched = []
    monkeypatch.setattr("chunktui.engine.distributed.launch", lambda procs, argv: launched.append((procs, argv)) or 0)
    r = CliRunner().invoke(main, ["monitor", *TINY, "--offline", "--dict", str(dict_path), *KINDS["prompts"],
                                  "--out", "y.jsonl", "--procs", "3", "--seed", "7"])
    assert r.exit_code == 0, r.output
    [(procs, argv)] = launched
    assert procs == 3 and argv[0] == "monitor" and "--procs" not in argv
    assert argv.count("--rule") == 3 and "--no-chat" in argv and "--offline" in argv
    assert argv[argv.index("--seed") + 1] == "7" and argv[argv.index("--samples") + 1] == "2"
    assert argv[argv.index("--prompts") + 1] == "prompts.txt"
    assert not (inputs / "y.jsonl").exists()  # checked and released for rank 0, which writes it


def test_monitor_texts_refuses_more_processes_than_batches(tiny_model, tiny_dict, inputs):
    """Called under torchrun directly (no CLI check first), the engine refuses a world larger than the work."""
    from chunktui.api import Engine
    from chunktui.engine.build import LabelSource
    from chunktui.engine.distributed import SingleProcess
    from chunktui.engine.labels import labelled_corpus
    from chunktui.engine.monitor import monitor_texts
    from chunktui.shared.errors import CorpusError

    class Wide(SingleProcess):
        world_size = 99

    dictionary, _ = tiny_dict
    program = Engine.from_loaded(tiny_model, dictionary).rules(["a: when cheese -> alert"])
    corpus, labels = labelled_corpus(tiny_model, dictionary, LabelSource(corpus=(inputs / "corpus.txt").read_text()))
    with pytest.raises(CorpusError, match="--procs 99 is more processes than there are batches"):
        monitor_texts(tiny_model, program, corpus, labels, batch_size=16, group=Wide())


class _Share(Exception):
    """Raised by a stand-in rank at the gather: what it made of its share."""


class _Rank:
    """Rank `rank` of `world`, in this process: the gather returns the other ranks' parts given, or raises
    _Share with this rank's own part when none are given (how a rank's share is read without the others)."""

    def __init__(self, rank: int, world: int, parts: dict | None = None):
        from chunktui.engine.distributed import SingleProcess

        self.base = SingleProcess()
        self.rank, self.world_size, self.parts, self.is_main = rank, world, parts, rank == 0

    def all_gather_json(self, obj):
        if self.parts is None:
            raise _Share(obj)
        return [obj if r == self.rank else self.parts[r] for r in range(self.world_size)]

    def __getattr__(self, name):
        return getattr(self.base, name)


def test_generated_rows_sharded_and_resumed_are_one_process_rows(tiny_model, tiny_dict):
    """generate_rows on two ranks (stand-ins, in this process): rank 1 stopped after its first checkpoint and
    resumed; rank 0 gathers rank 1's rows: every row equals the one-process run's, in row order."""
    import tempfile

    from chunktui.api import Engine
    from chunktui.engine.build import Checkpoint
    from chunktui.engine.rules import generate_rows
    from chunktui.shared.settings import Sampling

    dictionary, _ = tiny_dict
    program = Engine.from_loaded(tiny_model, dictionary).rules(
        ["a: when not cake@0 -> alert", "g: when not cheese for 2 -> suppress dog@1-2 x1 for 2",
         "s: when not dog for 4 -> stop"])
    sampling = Sampling(max_new_tokens=5, temperature=1.0, seed=3, stop_at_eos=False)
    prompts = ["The dog ate", "I like cheese", "A cat", "The rain", "My friend saw"]
    args = (tiny_model, prompts, 2, sampling, program)
    plain = [r.to_json() for r in generate_rows(*args, chat=False, batch_size=2)]  # 10 rows, 5 batches
    with tempfile.TemporaryDirectory() as folder:
        def stop_after_first(done, total):
            raise KeyboardInterrupt  # a kill, right after the first batch's checkpoint

        with pytest.raises(KeyboardInterrupt):
            generate_rows(*args, chat=False, batch_size=2, group=_Rank(1, 2), progress=stop_after_first,
                          checkpoint=Checkpoint(folder, every=1))
        checkpoint = Checkpoint(folder, every=1, resume=True)
        with pytest.raises(_Share) as share:
            generate_rows(*args, chat=False, batch_size=2, group=_Rank(1, 2), checkpoint=checkpoint)
        assert checkpoint.resumed == 1  # batch 1 restored, batch 3 made
        part1 = share.value.args[0]
        assert part1 == plain[2:4] + plain[6:8]  # rank 1: batches 1 and 3
        rows = generate_rows(*args, chat=False, batch_size=2, group=_Rank(0, 2, {1: part1}))
    assert [r.to_json() for r in rows] == plain
    assert len({tuple(r["ids"]) for r in plain}) >= 4 and sum(len(r["firings"]) for r in plain) > 10
