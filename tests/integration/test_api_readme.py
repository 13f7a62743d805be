"""The README's "Use from Python" example runs as written, on the built-in model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_the_readme_python_example_runs(capsys):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    engine, trace, report = namespace["engine"], namespace["trace"], namespace["report"]
    assert engine.loaded.name == "smollm2-135m" and engine.dictionary is not None
    assert trace.n_generated == 16 or trace.finished == "eos"
    assert trace.text.startswith("<|im_start|>")  # the chat template, as the app uses it
    ids = [s.token_id for s in trace.steps]  # incremental detokenisation adds up to decoding the whole text
    assert trace.text == engine.loaded.tokenizer.decode(ids, skip_special_tokens=False)
    assert "cheese" in report.concepts and len(report.pairs) == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) >= 4 and "576" in out[-2]  # (T, 31, 576) states of the scan
