"""The console script starts the engine before importing the CLI, and only for commands that open the app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from chunktui.launch import opens_app, threads_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, expected", [
    ([], True), (["tui"], True), (["tui", "--prompt", "hi"], True),
    (["tui", "--help"], False), (["--version"], False), (["scan", "--prompt", "hi"], False),
    (["build", "--procs", "2"], False), (["-h"], False),
])
def test_only_the_app_prestarts(argv, expected):
    assert opens_app(argv) is expected


def test_threads_as_the_tui_command_computes_them():
    cores = os.cpu_count() or 1
    assert threads_of(["tui"]) == cores
    assert threads_of(["tui", "--threads", "3"]) == 3
    assert threads_of(["tui", "--threads=5"]) == 5
    assert threads_of(["tui", "--threads", "0"]) == cores  # 0: all cores, as `chunktui tui`
    assert threads_of(["tui", "--threads", "many"]) == cores  # the CLI refuses it itself
    assert threads_of(["tui", "--threads"]) == cores


def test_the_prestart_path_imports_no_cli_ui_or_torch():
    code = ("import sys, chunktui.launch, chunktui.tui.early; "
            "heavy = [m for m in ('click', 'textual', 'torch', 'chunktui.cli', 'chunktui.shared.protocol') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_refused_command_line_leaves_no_engine_behind(tmp_path):
    """`chunktui tui --threads many`: the engine was started first, the CLI refuses the value (exit 2), and the
    unadopted engine process is ended at exit."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CHUNKTUI_STATE_DIR=str(tmp_path))
    code = ("import sys, atexit; sys.argv = ['chunktui', 'tui', '--threads', 'many']; "
            "import chunktui.tui.early as early; seen = []; real = early.prestart; "
            "early.prestart = lambda *a: (real(*a), seen.append(early._EARLY['engine'][1])); "
            # registered before the launcher's own handler, so it runs after it (atexit is last in, first out)
            "atexit.register(lambda: print('ENGINE', [p.pid for p in seen], [p.poll() is not None for p in seen])); "
            "from chunktui.launch import main; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 2 and "--threads" in out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("ENGINE"))
    assert line.endswith("[True]"), line  # one engine was started before the CLI, and it has exited
