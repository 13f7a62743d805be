"""Property-based tests (hypothesis): the validators, and every loader of user files.

A loader given any input either returns something valid or raises the
project's error type (ChunkError) with a message; it never fails with another
exception (which the CLI would print as a traceback).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunktui.shared import validate
from chunktui.shared.errors import ChunkError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

anything_numeric = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                             st.text(max_size=12), st.sampled_from(["nan", "inf", "-inf", "1e309", " 3 ", "0x10", ""]))
json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
                           | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)


# --------------------------------------------------------------------------- validators


@FAST
@given(anything_numeric)
def test_number_validators_accept_exactly_their_ranges(value):
    checks = [
        (validate.temperature, lambda v: 0 <= v <= validate.TEMPERATURE_MAX),
        (validate.top_p, lambda v: 0 < v <= 1),
        (lambda v, name="x": validate.number_in(v, name, -1.0, 1.0), lambda v: -1 <= v <= 1),
    ]
    for fn, ok in checks:
        try:
            parsed = float(value.strip()) if isinstance(value, str) else float(value)
        except ValueError:
            parsed = None
        try:
            got = fn(value)
        except validate.InvalidValue as err:
            assert str(err)  # a message, and the value really was out of range or not a number
            assert parsed is None or not math.isfinite(parsed) or not ok(parsed)
        else:
            assert math.isfinite(got) and ok(got) and got == parsed


@FAST
@given(anything_numeric)
def test_count_validators_accept_whole_numbers_in_range(value):
    for fn, lo, hi in ((validate.count, 1, None), (validate.samples, 1, 10_000), (validate.top_k, 0, None),
                       (validate.seed, 0, validate.SEED_MAX), (validate.max_new_tokens, 1, validate.MAX_NEW_TOKENS)):
        try:
            got = fn(value)
        except validate.InvalidValue as err:
            assert str(err)
        else:
            assert isinstance(got, int) and got >= lo and (hi is None or got <= hi)
            assert float(got) == float(value.strip() if isinstance(value, str) else value)


@FAST
@given(st.sampled_from(list(validate.STRENGTH_RULES)), st.floats(allow_nan=True, allow_infinity=True))
def test_strength_is_finite_positive_and_bounded_per_mode(mode, value):
    lo, hi, _ = validate.STRENGTH_RULES[mode]
    try:
        got = validate.strength(value, mode)
    except validate.InvalidValue as err:
        assert mode in str(err) or "finite" in str(err)
        assert not (math.isfinite(value) and lo < value <= hi)
    else:
        assert got == value and lo < got <= hi


@FAST
@given(st.text(alphabet="0123456789-,. al", max_size=14), st.integers(1, 40))
def test_layer_specs_parse_to_sorted_layers_in_range_or_say_why(spec, n_states):
    from chunktui.shared.validate import parse_layers

    try:
        layers = parse_layers(spec, n_states)
    except ChunkError as err:
        assert str(err)
        return
    assert layers == sorted(set(layers)) and all(0 <= l < n_states for l in layers) and layers


@FAST
@given(st.integers(0, 30), st.integers(0, 30))
def test_layer_ranges_are_written_low_high(a, b):
    from chunktui.shared.validate import parse_layers

    if a <= b:
        assert parse_layers(f"{a}-{b}", 31) == list(range(a, b + 1))
    else:
        with pytest.raises(ChunkError, match="low-high"):
            validate.layer_spec(f"{a}-{b}")


@SLOW
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=6)))
def test_cli_rejects_bad_numbers_before_any_work(value):
    """Through click: an invalid --temperature is a usage error (exit 2) naming the option; a valid one gets past
    the option check to the next problem (the missing prompts file), never a traceback."""
    from chunktui.cli import main

    r = CliRunner().invoke(main, ["perturb", "--model", "random:llama-tiny", "--chunk", "x", "--prompts",
                                  "/nonexistent/prompts.txt", "--temperature", value])
    assert r.exit_code == 2 and r.exception is None or isinstance(r.exception, SystemExit), r.output
    try:
        validate.temperature(value)
        valid = True
    except validate.InvalidValue:
        valid = False
    if valid:
        assert "does not exist" in r.output, r.output
    else:
        assert "--temperature" in r.output, r.output


# --------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def dict_parts(tiny_dict):
    from safetensors import safe_open

    from chunktui.engine.dictionary import METADATA_KEY

    _, path = tiny_dict
    with safe_open(str(path), framework="pt") as fh:
        header = json.loads(fh.metadata()[METADATA_KEY])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return header, tensors


def _write_dict(path, header, tensors):
    from safetensors.torch import save_file

    from chunktui.engine.dictionary import METADATA_KEY

    text = header if isinstance(header, str) else json.dumps(header)
    save_file(tensors or {"_empty": torch.zeros(1)}, str(path), metadata={METADATA_KEY: text})


def _mutate(doc, path_keys, value):
    """doc with the value at a path (list of keys / indices) replaced."""
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path_keys[:-1]:
        node = node[key]
    node[path_keys[-1]] = value
    return doc


HEADER_PATHS = [["format"], ["version"], ["model"], ["model", "hidden_size"], ["model", "n_layers"], ["chunks"],
                ["chunks", 0], ["chunks", 0, "id"], ["chunks", 0, "layer"], ["chunks", 0, "threshold"],
                ["chunks", 0, "kind"], ["chunks", 0, "tensors"], ["chunks", 0, "tensors", "neurons"],
                ["chunks", 0, "step"], ["chunks", 0, "fit"], ["layer_means"], ["notes"]]


@FAST
@given(st.sampled_from(HEADER_PATHS), json_values)
def test_dictionary_header_damage_gives_a_dictionary_error(tmp_path_factory, dict_parts, where, value):
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.shared.errors import DictionaryError

    header, tensors = dict_parts
    path = tmp_path_factory.mktemp("h") / "x.chunks.safetensors"
    _write_dict(path, _mutate(header, where, value), tensors)
    try:
        d = load_dictionary(path)
    except DictionaryError as err:
        assert str(err)
    else:
        assert all(c.layer <= d.model["n_layers"] for c in d.chunks)


@FAST
@given(st.sampled_from(["00000.neurons", "00000.template", "layer_means"]),
       st.sampled_from([torch.float32, torch.float16, torch.int64, torch.int16, torch.bool, torch.uint8]),
       st.lists(st.integers(0, 5), min_size=0, max_size=3), st.floats(allow_nan=True, allow_infinity=True))
def test_dictionary_tensor_damage_gives_a_dictionary_error(tmp_path_factory, dict_parts, key, dtype, shape, fill):
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.shared.errors import DictionaryError

    header, tensors = dict_parts
    tensors = dict(tensors)
    try:
        tensors[key] = torch.full(tuple(shape), fill).to(dtype)
    except (RuntimeError, OverflowError):
        tensors[key] = torch.zeros(tuple(shape), dtype=dtype)
    path = tmp_path_factory.mktemp("t") / "x.chunks.safetensors"
    _write_dict(path, header, tensors)
    try:
        load_dictionary(path)
    except DictionaryError as err:
        assert str(err)


@FAST
@given(st.binary(max_size=300))
def test_dictionary_bytes_damage_gives_a_dictionary_error(tmp_path_factory, dict_parts, junk):
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.shared.errors import DictionaryError

    path = tmp_path_factory.mktemp("b") / "x.chunks.safetensors"
    path.write_bytes(junk)
    with pytest.raises(DictionaryError):
        load_dictionary(path)


span_lines = st.one_of(
    st.text(max_size=40),
    json_values.map(json.dumps),
    st.builds(lambda text, spans: json.dumps({"text": text, "spans": spans}), st.text(max_size=20),
              st.lists(st.lists(st.one_of(st.integers(-3, 25), st.text(max_size=4), st.none()), max_size=4),
                       max_size=4)),
)


@FAST
@given(st.lists(span_lines, max_size=5))
def test_span_files_load_valid_spans_or_say_which_line(tmp_path_factory, lines):
    from chunktui.shared.errors import CorpusError
    from chunktui.engine.labels import read_spans

    path = tmp_path_factory.mktemp("s") / "s.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        corpus = read_spans(path)
    except CorpusError as err:
        assert str(err)
        return
    for a, b, label in corpus.spans:
        assert 0 <= a < b <= len(corpus.source) and isinstance(label, str)


@FAST
@given(st.one_of(json_values, st.fixed_dictionaries({"format": st.just("chunktui.session"), "traces": json_values,
                                                     "runs": json_values}),
                 st.fixed_dictionaries({"tokens": st.lists(json_values, max_size=3), "generated": json_values}),
                 st.fixed_dictionaries({"pairs": json_values, "concepts": json_values})),
       st.sampled_from(["json", "md", "html", "csv"]))
def test_report_inputs_render_or_raise_a_chunk_error(tmp_path_factory, obj, fmt):
    from chunktui.shared.reports import read_input, render

    path = tmp_path_factory.mktemp("r") / "in.json"
    path.write_text(json.dumps(obj))
    try:
        text = render(read_input(path), fmt)
    except ChunkError as err:
        assert str(err)
    else:
        assert isinstance(text, str)


def test_app_checks_are_covered_by_the_validators():
    """What the app's Stream and Perturb panes check, the engine validators check the same way."""
    s = validate.sampling("40", "0.7", "0.9", "3")
    assert (s.max_new_tokens, s.temperature, s.top_p, s.seed) == (40, 0.7, 0.9, 3)
    for bad in (("0", "0", "1", "0"), ("5", "-1", "1", "0"), ("5", "0", "0", "0"), ("5", "0", "1", "-1"),
                ("x", "0", "1", "0"), ("5", "nan", "1", "0")):
        with pytest.raises(validate.InvalidValue):
            validate.sampling(*bad)
    assert validate.chunk_names(" cheese, ,cake ") == ["cheese", "cake"]
    with pytest.raises(validate.InvalidValue, match="at least one chunk"):
        validate.chunk_names(" , ")
    with pytest.raises(validate.InvalidValue, match="empty"):
        validate.prompt_text("   ")
    assert validate.strength("", "graft") is None and validate.strength("0.5", "freeze") == 0.5
