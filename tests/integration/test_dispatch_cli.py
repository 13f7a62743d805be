"""The built-in model dispatched by accelerate with a memory cap (everything offloaded to disk on a
CPU-only machine) gives exactly the plain load's tokens and matches through `chunktui scan`."""

import json

import pytest
from click.testing import CliRunner

from chunktui.cli import main

pytestmark = pytest.mark.integration


def test_scan_with_device_map_equals_plain_load(tmp_path):
    runner = CliRunner()
    common = ["scan", "--model", "smollm2-135m", "--device", "cpu", "--prompt", "What is cheese made of?",
              "--generate", "12"]
    plain, dispatched = tmp_path / "plain.json", tmp_path / "dispatched.json"
    r = runner.invoke(main, common + ["--json", str(plain)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, common + ["--device-map", "auto", "--max-memory", "cpu=120MiB", "--offload-folder",
                                      str(tmp_path / "offload"), "--json", str(dispatched)])
    assert r.exit_code == 0, r.output
    a, b = json.loads(plain.read_text()), json.loads(dispatched.read_text())
    assert sum(b["generated"]) == 12
    assert a["tokens"] == b["tokens"]  # ids, texts, and every match value, threshold and score
