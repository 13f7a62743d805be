"""Layering, checked in fresh interpreters: the app never imports torch; the engine never imports the UI or the CLI."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import chunktui

ROOT = Path(chunktui.__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_app_and_the_cli_import_without_torch():
    loaded = _modules_after("import chunktui.tui.app, chunktui.tui.bench, chunktui.cli, chunktui.server")
    assert "chunktui.tui.app" in loaded and "textual" in loaded  # the import did happen
    assert "torch" not in loaded
    assert "transformers" not in loaded


def test_no_engine_or_rnn_module_imports_the_cli_the_tui_or_textual():
    names = [f"chunktui.{pkg}.{m.name}" for pkg in ("engine", "rnn", "shared")
             for m in pkgutil.iter_modules([str(ROOT / "chunktui" / pkg)])] + ["chunktui.api", "chunktui.backends",
                                                                             "chunktui.server"]
    assert "chunktui.engine.streaming" in names and len(names) > 20
    loaded = _modules_after("import " + ", ".join(names))
    assert set(names) <= loaded
    offenders = sorted(m for m in loaded if m.startswith(("chunktui.cli", "chunktui.tui", "textual")))
    assert offenders == []


def test_every_shared_module_imports_without_torch_or_textual():
    """`chunktui.shared` is the floor the UI process stands on: each of its modules, imported alone."""
    names = [f"chunktui.shared.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "chunktui" / "shared")])]
    assert {"chunktui.shared.protocol", "chunktui.shared.settings", "chunktui.shared.specs"} <= set(names)
    for name in names:
        loaded = _modules_after(f"import {name}")
        assert name in loaded
        heavy = sorted(m for m in loaded if m.split(".")[0] in ("torch", "transformers", "accelerate", "textual"))
        assert heavy == [], f"{name} pulls in {heavy[:3]}"
