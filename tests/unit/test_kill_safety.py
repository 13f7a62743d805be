"""Kills lose nothing and leave nothing: SIGTERM cleans up like Ctrl-C; what SIGKILL leaves is removed next time."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from chunktui.cli.discover import remove_stale_state_caches
from chunktui.shared.outputs import plan_output


def test_sigterm_runs_cleanup_and_exits_143(tmp_path):
    script = textwrap.dedent(f"""
        import sys, tempfile, time
        from chunktui.cli.common import friendly_errors
        from chunktui.shared.io import write_temp_beside
        from pathlib import Path

        @friendly_errors
        def work():
            with tempfile.TemporaryDirectory(prefix="chunktui-states.", dir={str(tmp_path)!r}) as folder:
                tmp = write_temp_beside(Path({str(tmp_path)!r}) / "out.html", b"x" * 1000)
                try:
                    print("ready", flush=True)
                    time.sleep(60)
                finally:
                    Path(tmp).unlink(missing_ok=True)

        work()
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert list(tmp_path.glob("chunktui-states.*")) and list(tmp_path.glob(".out.html.*.tmp"))
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # the state cache and the temporary file are gone


def test_state_caches_of_dead_processes_are_removed_at_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / "chunktui-states.dead"
    gone.mkdir()
    (gone / "owner.pid").write_text(str(dead.pid))
    (gone / "shard-0.safetensors").write_bytes(b"x" * 100)
    live = tmp_path / "chunktui-states.live"
    live.mkdir()
    (live / "owner.pid").write_text(str(os.getpid()))
    unknown = tmp_path / "chunktui-states.old"
    unknown.mkdir()
    assert remove_stale_state_caches(tmp_path) == 1
    assert not gone.exists() and live.exists() and unknown.exists()


def test_planning_an_output_removes_temp_files_a_killed_writer_left(tmp_path):
    target = tmp_path / "report.html"
    stale = tmp_path / ".report.html.abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    other = tmp_path / ".other.html.abc123.tmp"
    other.write_bytes(b"y")
    planned = plan_output(target)
    planned.write_text("<html></html>\n")
    assert not stale.exists() and other.exists() and target.read_text() == "<html></html>\n"
