"""The floors, checked statically: import-linter's contracts hold, and the import graph has no circle.

Floors, top to bottom: __main__ > cli > tui > server > api > backends > rnn > engine > shared > (paths, palette).
Every import counts here, including the lazy ones inside functions and those under TYPE_CHECKING.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
FLOORS = ["chunktui.__main__", "chunktui.launch", "chunktui.cli", "chunktui.tui", "chunktui.server", "chunktui.api", "chunktui.backends",
          "chunktui.rnn", "chunktui.engine", "chunktui.shared", "chunktui.paths|chunktui.palette"]
# the one deliberate exception, also listed in pyproject.toml: the app's test mode runs the server in a thread
ALLOWED_UP = {("chunktui.tui.engine_client", "chunktui.server")}


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("chunktui", include_external_packages=True)


def _floor(module: str) -> int | None:
    for index, floor in enumerate(FLOORS):
        for name in floor.split("|"):
            if module == name or module.startswith(name + "."):
                return index
    return None


def test_lint_imports_keeps_every_contract():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_the_import_graph_has_no_circle(graph):
    modules = sorted(m for m in graph.modules if m.startswith("chunktui"))
    edges = {m: {n for n in graph.find_modules_directly_imported_by(m) if n.startswith("chunktui")} for m in modules}
    # Tarjan's strongly connected components: a component of more than one module is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    assert len(modules) > 60
    assert circles == []


def test_no_import_runs_up_a_floor(graph):
    up = []
    for module in graph.modules:
        below = _floor(module)
        if below is None:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            above = _floor(imported)
            if above is not None and above < below and (module, imported) not in ALLOWED_UP:
                up.append(f"{module} -> {imported}")
    assert _floor("chunktui.shared.protocol") > _floor("chunktui.engine.models") > _floor("chunktui.api")
    assert up == []


def test_the_shared_floor_imports_nothing_heavy(graph):
    heavy = ("torch", "transformers", "accelerate", "safetensors", "textual")
    bad = [f"{m} -> {n}" for m in graph.modules if m.startswith("chunktui.shared")
           for n in graph.find_modules_directly_imported_by(m) if n.split(".")[0] in heavy]
    assert any(m.startswith("chunktui.shared.") for m in graph.modules)
    assert bad == []
