"""Outputs that never clobber: existing files, inputs (through links), folders, and concurrent writers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from chunktui.shared.outputs import OutputError, plan_output, plan_outputs


@pytest.fixture(autouse=True)
def _state(tmp_path, monkeypatch):
    monkeypatch.setenv("CHUNKTUI_STATE_DIR", str(tmp_path / "state"))


def test_existing_file_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "o.json"
    out.write_text("keep")
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        plan_output(out, option="--json")
    assert out.read_text() == "keep"
    with plan_output(out, overwrite=True) as target:
        assert target.existed
        target.write_json({"a": 1})
    assert out.read_text().strip() == '{\n  "a": 1\n}'


@pytest.mark.parametrize("how", ["same", "relative", "symlink", "hardlink"])
def test_an_input_is_never_an_output_even_with_overwrite(tmp_path, monkeypatch, how):
    src = tmp_path / "in.txt"
    src.write_text("input")
    out = {"same": src, "relative": "sub/../in.txt", "symlink": tmp_path / "link.txt",
           "hardlink": tmp_path / "hard.txt"}[how]
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    if how == "symlink":
        os.symlink(src, out)
    if how == "hardlink":
        os.link(src, out)
    with pytest.raises(OutputError, match="also an input"):
        plan_output(out, inputs=[str(src)], overwrite=True)
    assert src.read_text() == "input"


def test_folders_and_impossible_parents_are_refused_before_any_work(tmp_path):
    with pytest.raises(OutputError, match="is a folder"):
        plan_output(tmp_path)
    with pytest.raises(OutputError, match="is a folder"):
        plan_output(str(tmp_path / "new") + "/")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        plan_output(tmp_path / "file" / "deeper" / "o.json")
    with pytest.raises(OutputError, match="must end in .chunks.safetensors"):
        plan_output(tmp_path / "o.json", suffix=".chunks.safetensors")
    target = plan_output(tmp_path / "a" / "b" / "o.txt")  # a folder that can be created is fine
    assert not (tmp_path / "a").exists()  # ...and is created only when the file is written
    target.write_text("hi")
    assert (tmp_path / "a" / "b" / "o.txt").read_text() == "hi"


def test_a_second_writer_is_refused_and_the_first_completes(tmp_path):
    out = tmp_path / "o.txt"
    first = plan_output(out, option="--out")
    with pytest.raises(OutputError, match="another chunktui command is writing"):
        plan_output(out, option="--out")
    with pytest.raises(OutputError, match="another chunktui command is writing"):
        plan_output(tmp_path / "." / "o.txt", overwrite=True)  # the same file under another spelling
    first.write_text("first")
    assert out.read_text() == "first"
    assert list((tmp_path / "state" / "locks").iterdir()) == []  # the lock file goes with the lock
    with pytest.raises(OutputError, match="already exists"):  # the lock is gone; the file now exists
        plan_output(out)


def test_a_writer_in_another_process_holds_the_lock(tmp_path):
    out = tmp_path / "o.txt"
    code = textwrap.dedent(f"""
        import sys
        from chunktui.shared.outputs import plan_output
        target = plan_output({str(out)!r})
        print("locked", flush=True)
        sys.stdin.readline()
        target.write_text("from the first process")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match="another chunktui command"):
            plan_output(out)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    assert out.read_text() == "from the first process"


def test_cli_second_build_to_one_out_is_refused(tmp_path, tiny_corpus):
    from chunktui.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text(tiny_corpus)
    out = tmp_path / "d.chunks.safetensors"
    running = plan_output(out, option="--out")  # a build that is still collecting
    r = CliRunner().invoke(main, ["build", "--model", "random:llama-tiny", "--corpus", str(corpus), "--words",
                                  "cheese", "--layers", "1", "--out", str(out)])
    assert r.exit_code == 2 and "another chunktui command is writing" in " ".join(r.output.split()), r.output
    assert not out.exists()
    running.release()
    r = CliRunner().invoke(main, ["build", "--model", "random:llama-tiny", "--corpus", str(corpus), "--words",
                                  "cheese", "--layers", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "o.txt"
    target = plan_output(out)
    out.write_text("someone else's")
    with pytest.raises(OutputError, match="appeared while this command ran"):
        target.write_text("ours")
    assert out.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.txt", "state"]  # no temp file left behind


def test_outputs_of_one_command_must_differ(tmp_path):
    with pytest.raises(OutputError, match="same file"):
        plan_outputs([("--out", tmp_path / "x", None), ("--json", str(tmp_path / "." / "x"), None)])
    a, b = plan_outputs([("--out", tmp_path / "x", None), ("--json", None, None)])
    assert b is None and a.path == tmp_path / "x"
    a.release()


def test_non_finite_numbers_are_written_as_null(tmp_path):
    target = plan_output(tmp_path / "n.json")
    target.write_json({"a": float("nan"), "b": [1.0, float("inf")]})
    assert (tmp_path / "n.json").read_text().split() == ['{', '"a":', 'null,', '"b":', '[', '1.0,', 'null', ']', '}']
