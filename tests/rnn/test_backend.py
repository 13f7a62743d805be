"""The RNN as a model of the app: load, stream and scan like a language model (engine side)."""

import threading

import numpy as np
import pytest
import torch

from chunktui.shared.errors import CorpusError, ModelLoadError
from chunktui.engine.steps import step_from_event, steps_from_scan
from chunktui.shared.settings import Sampling
from chunktui.rnn.runtime import is_rnn_spec, load_rnn, rnn_scan, rnn_stream
from chunktui.rnn.sequences import flat_sequence
from chunktui.rnn.train import record


@pytest.fixture(scope="module")
def rnn():
    return load_rnn("rnn:flat:0:80")


def test_spec_parsing_and_refusals():
    assert is_rnn_spec("rnn:flat") and is_rnn_spec(" RNN:context:2") and not is_rnn_spec("random:llama-tiny")
    with pytest.raises(ModelLoadError, match="Unknown RNN spec 'rnn:hier'"):
        load_rnn("rnn:hier")
    with pytest.raises(ModelLoadError, match="at least 1 training step"):
        load_rnn("rnn:flat:0:0")


def test_card_and_columns(rnn):
    card = rnn.card()
    assert card["layers"] == 1 and card["width"] == 12 and card["alphabet"] == "ABCDEGHIJKLMN"
    labels = [c.label for c in rnn.dictionary.chunks]
    assert labels and len(set(labels)) == len(labels)
    assert all(set(label) <= set("ABCDEGHIJKLMN") for label in labels)
    assert rnn.layout.n_states == 1


def test_stream_feeds_the_prompt_then_samples_and_states_equal_a_full_run(rnn):
    events = list(rnn_stream(rnn, "ABCD EEGHI", Sampling(max_new_tokens=12, temperature=1.0, seed=3)))
    assert "".join(e.text for e in events[:9]) == "ABCDEEGHI"
    assert [e.generated for e in events] == [False] * 9 + [True] * 12
    assert events[-1].finished == "length" and all(e.finished is None for e in events[:-1])
    text = "".join(e.text for e in events)
    traj = record(rnn.net, rnn.alphabet.encode(text))
    assert np.allclose(torch.cat([e.hidden for e in events]).numpy(), traj.states, atol=1e-5)
    # log p of each fed symbol is what the previous step predicted
    for t in range(1, len(events)):
        assert events[t].logprob == pytest.approx(np.log(traj.probs[t - 1, events[t].token_id]), abs=1e-4)
    again = list(rnn_stream(rnn, "ABCDEEGHI", Sampling(max_new_tokens=12, temperature=1.0, seed=3)))
    assert "".join(e.text for e in again) == text
    steps = [step_from_event(e) for e in events]
    assert all(len(s.layer_chunk) == 1 for s in steps)


def test_greedy_follows_the_argmax_and_cancel_stops(rnn):
    events = list(rnn_stream(rnn, "ABC", Sampling(max_new_tokens=3)))
    assert events[3].text == "D"  # inside a planted word the continuation is fixed
    cancel = threading.Event()
    got = []
    for e in rnn_stream(rnn, "ABC", Sampling(max_new_tokens=50), cancel=cancel):
        got.append(e)
        if len(got) == 5:
            cancel.set()
    assert len(got) == 5


def test_scan_of_the_reference_run_reads_its_own_parse(rnn):
    """Scanning the very run DSC was fitted on gives every step the chunk of the reference parse."""
    ref = flat_sequence(600, seed=1000)
    result = rnn_scan(rnn, ref.symbols)
    steps = steps_from_scan(result)
    labels = [rnn.dictionary.chunks[s.strongest].label if s.strongest >= 0 else None for s in steps]
    columns = {c.label for c in rnn.dictionary.chunks}
    checked = 0
    for piece in rnn.dsc.chunks.parse:
        spelled = rnn.chunk_labels[piece.chunk]
        for t in range(piece.start, piece.end):
            assert labels[t] == (spelled if spelled in columns else None)
            checked += 1
    assert checked == len(ref.symbols)
    assert sum(label is not None for label in labels) > 0.9 * len(labels)


def test_symbols_outside_the_alphabet_are_refused(rnn):
    with pytest.raises(CorpusError, match=r"'xyz' not in this RNN's alphabet"):
        rnn_scan(rnn, "ABxyz")
    with pytest.raises(CorpusError, match="No symbols"):
        list(rnn_stream(rnn, "   ", Sampling()))


def test_language_model_commands_point_rnn_specs_to_the_app():
    from chunktui.shared.specs import resolve_spec

    with pytest.raises(ModelLoadError, match=r"opens in the app \(`chunktui tui --model rnn:flat`\)"):
        resolve_spec("rnn:flat")


def test_relabel_gives_streamed_steps_the_full_parse(rnn):
    from chunktui.rnn.runtime import relabel

    events = list(rnn_stream(rnn, "ABCDEEEGHIJKLMNEE", Sampling(max_new_tokens=20, temperature=1.0, seed=1)))
    steps = [step_from_event(e) for e in events]
    relabel(rnn, steps)
    scanned = steps_from_scan(rnn_scan(rnn, "".join(e.text for e in events)))
    assert [s.strongest for s in steps] == [s.strongest for s in scanned]
    assert all(a.hits == b.hits for a, b in zip(steps, scanned))
