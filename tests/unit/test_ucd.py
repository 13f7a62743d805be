"""Unsupervised chunk discovery: planted directions, dead chunks, thresholds, NMI/purity, and the CLI."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from chunktui.engine import ucd
from chunktui.engine.dictionary import ChunkDictionary, load_dictionary
from chunktui.engine.corpus import TokenTable
from chunktui.engine.matching import pack


def planted(n_clusters=8, per=150, d=32, spread=0.15, seed=0):
    """Tokens around n planted unit directions, with random norms (cosine ignores them). -> (X, truth, directions)"""
    g = torch.Generator().manual_seed(seed)
    dirs = ucd._normalise(torch.randn(n_clusters, d, generator=g))
    truth = torch.arange(n_clusters).repeat_interleave(per)
    X = dirs[truth] + spread * torch.randn(len(truth), d, generator=g) / math.sqrt(d)
    X = X * (0.5 + 5 * torch.rand(len(truth), 1, generator=g))  # norms vary a lot
    return X, truth, dirs


def test_discovery_recovers_planted_directions():
    X, truth, dirs = planted()
    found = ucd.fit_directions(X, ucd.DiscoveryConfig(k=8, steps=150, batch_size=512, seed=1, init="random"))
    # every planted cluster is won by exactly one chunk, and that chunk points at the planted direction
    for c in range(8):
        winners = found.assign[truth == c].unique()
        assert len(winners) == 1, (c, winners)
        assert float(found.directions[winners[0]] @ dirs[c]) > 0.98
    assert ucd.nmi(found.assign, truth) > 0.99
    assert ucd.purity(found.assign, truth) == 1.0
    assert found.dead_fraction == 0.0
    assert torch.allclose(found.directions.norm(dim=1), torch.ones(8), atol=1e-5)


def test_dead_chunks_are_reseeded_from_poorly_covered_tokens():
    # all data in a narrow cone: most random initial directions never win a token
    X, truth, _ = planted(n_clusters=6, per=100, d=48, spread=0.1, seed=3)
    X = X.abs()
    config = dict(k=24, steps=200, batch_size=600, seed=0, init="random")
    without = ucd.fit_directions(X, ucd.DiscoveryConfig(**config, reseed_until=0.0))
    withr = ucd.fit_directions(X, ucd.DiscoveryConfig(**config))
    assert without.reseeded == 0 and without.dead_fraction > 0.5
    assert withr.reseeded > 0
    assert withr.dead_fraction < 0.05
    # re-seeded chunks cover the data better: the mean best cosine rises
    assert float(withr.best_cos.mean()) > float(without.best_cos.mean())


def test_thresholds_are_calibrated_from_the_tokens_each_chunk_wins():
    X, truth, _ = planted(spread=0.6, seed=2)
    found = ucd.fit_directions(X, ucd.DiscoveryConfig(k=8, steps=100, batch_size=1200, threshold_quantile=0.2))
    assert int((found.wins >= 20).sum()) >= 6
    for k in range(8):
        won = found.best_cos[found.assign == k]
        thr = float(found.threshold[k])
        assert thr == pytest.approx(float(won.sort().values[int(0.2 * (len(won) - 1))]) - ucd.COSINE_SLACK, abs=1e-7)
        if len(won) >= 20:  # the share is exact up to rounding of the quantile index
            assert 0.78 <= float((won >= thr).float().mean()) <= 0.82
        proj = X[found.assign == k] @ found.directions[k]
        assert float(found.typical[k]) == pytest.approx(float(proj.mean()), rel=1e-4)


def test_nmi_and_purity_by_hand():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert ucd.nmi(a, a) == pytest.approx(1.0)
    assert ucd.nmi(a, torch.tensor([5, 5, 9, 9, 7, 7])) == pytest.approx(1.0)  # names do not matter
    assert ucd.purity(a, a) == 1.0
    # clusters {0,0,1,1} vs classes {x,y,x,y}: independent -> NMI 0, purity 1/2
    assert ucd.nmi(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    assert ucd.purity(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])) == 0.5
    # a 3-token case computed by hand: clusters {0, 0, 1} against classes {0, 1, 1}
    u, v = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])
    mi = (1 / 3) * math.log((1 / 3) / (2 / 3 * 1 / 3)) + (1 / 3) * math.log((1 / 3) / (2 / 3 * 2 / 3)) \
        + (1 / 3) * math.log((1 / 3) / (1 / 3 * 2 / 3))
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert ucd.nmi(u, v) == pytest.approx(mi / h)
    assert ucd.purity(u, v) == pytest.approx(2 / 3)
    # tokens without a label (-1) are left out
    assert ucd.nmi(torch.tensor([0, 1, 1]), torch.tensor([0, 1, -1])) == pytest.approx(1.0)


def test_kmeans_and_random_baselines():
    X, truth, _ = planted(spread=0.1)
    X = X / X.norm(dim=1, keepdim=True) * 3  # Euclidean clusters too
    km = ucd.kmeans(X, 8, seed=0)
    assert ucd.nmi(km, truth) > 0.99
    R = ucd.random_directions(32, 8, seed=0)
    assert torch.allclose(R.norm(dim=1), torch.ones(8))
    assert torch.equal(R, ucd.random_directions(32, 8, seed=0))


def test_token_tags_take_one_tag_per_token():
    source = "The dog ran. Cats"
    # tokens: "The", " dog", " ran", ".", " Cats"
    tokens = TokenTable(ids=[1, 2, 3, 4, 5], starts=[0, 3, 7, 11, 12], ends=[3, 7, 11, 12, 17], context=[0] * 5,
                        position=list(range(5)))
    spans = [(0, 3, "DET"), (4, 7, "NOUN"), (8, 11, "VERB"), (11, 12, "PUNCT")]
    tags, names = ucd.token_tags(tokens, source, spans)
    assert [names[t] if t >= 0 else None for t in tags.tolist()] == ["DET", "NOUN", "VERB", "PUNCT", None]
    words, wnames = ucd.word_identity(tokens, source)
    assert [wnames[w] for w in words.tolist()] == ["the", "dog", "ran", ".", "cats"]


def test_discover_on_the_tiny_model_saves_direction_chunks_with_cards(tiny_model, tmp_path):
    from chunktui.engine.corpus import collect

    text = "\n".join(["The cat sat on the mat.", "A dog ran to the park.", "The bird sang a song."] * 20)
    hs = collect(tiny_model, text, layers=[1, 3])
    spans = []
    for m in __import__("re").finditer(r"\w+|[^\w\s]", text):
        w = m.group(0)
        spans.append((m.start(), m.end(), "DET" if w.lower() in ("the", "a") else "PUNCT" if w == "." else "OTHER"))
    config = ucd.DiscoveryConfig(k=12, steps=60, batch_size=512, seed=0)
    chunks, report = ucd.discover(hs, config, spans=spans)
    assert set(report.layers) == {1, 3}
    for record in report.layers.values():
        assert record["dead_fraction"] < 0.05
        assert set(record["evaluation"]) == {"discovered", "kmeans", "random"}
        assert set(record["evaluation"]["discovered"]) == {"word", "pos"}
    assert all(c.kind == "direction" and c.method == "unsupervised-discovery" for c in chunks)
    for layer in (1, 3):
        labels = [c.label for c in chunks if c.layer == layer]
        assert len(labels) == len(set(labels))  # unique within a layer
    # every chunk's card: it matches the tokens it won (>= 90 % of them at quantile 0.1) and names them
    for c in chunks:
        card = c.extra["card"]
        assert card["matches"] >= 0.9 * c.fit["wins"]
        assert c.extra["auto_label"].split("/")[0] == card["top_tokens"][0][0]
    # the dictionary file round-trips and matching applies the stored thresholds unchanged
    d = ChunkDictionary(model=tiny_model.identity(), chunks=chunks)
    back = load_dictionary(d.save(tmp_path / "u.chunks.safetensors"), tiny_model.identity())
    assert [c.id for c in back.chunks] == [c.id for c in chunks]
    packed = pack(back.chunks, tiny_model.hidden_size, tiny_model.layout.n_states, layers=hs.layers)
    hits = packed.match(hs.H).hit.sum(0)
    by_id = {c.id: int(h) for c, h in zip(packed.chunks, hits)}
    assert all(by_id[c.id] == c.extra["card"]["matches"] for c in chunks)


def test_discover_cli_writes_dictionary_and_json(tmp_path):
    from chunktui.cli import main

    spans = tmp_path / "pos.jsonl"
    lines = []
    for text in ["The cat sat on the mat.", "A dog ran to the park.", "The bird sang a song."] * 10:
        sp = []
        for m in __import__("re").finditer(r"\w+|[^\w\s]", text):
            sp.append([m.start(), m.end(), "DET" if m.group(0).lower() in ("the", "a") else "X"])
        lines.append(json.dumps({"text": text, "spans": sp}))
    spans.write_text("\n".join(lines))
    out, js = tmp_path / "d.chunks.safetensors", tmp_path / "r.json"
    r = CliRunner().invoke(main, ["discover", "--model", "random:llama-tiny", "--spans", str(spans), "--layers", "2",
                                  "--k", "8", "--steps", "40", "--out", str(out), "--json", str(js)])
    assert r.exit_code == 0, r.output
    doc = json.loads(js.read_text())
    layer = doc["layers"]["2"]
    assert 0 <= layer["dead_fraction"] < 0.05
    for method in ("discovered", "kmeans", "random"):
        assert 0 <= layer["evaluation"][method]["pos"]["nmi"] <= 1
        assert 0 < layer["evaluation"][method]["pos"]["purity"] <= 1
    d = load_dictionary(out)
    assert len(d) == 8 - layer["dead"] and {c.layer for c in d.chunks} == {2}
    assert "discovery" in d.notes and d.layer_means is not None
    # running again with --append adds to the same file, replacing chunks with the same ids; without it, refused
    r = CliRunner().invoke(main, ["discover", "--model", "random:llama-tiny", "--spans", str(spans), "--layers", "1",
                                  "--k", "4", "--steps", "20", "--no-evaluate", "--out", str(out)])
    assert r.exit_code == 2 and "--append" in r.output, r.output
    r = CliRunner().invoke(main, ["discover", "--model", "random:llama-tiny", "--spans", str(spans), "--layers", "1",
                                  "--k", "4", "--steps", "20", "--no-evaluate", "--out", str(out), "--append"])
    assert r.exit_code == 0, r.output
    assert {c.layer for c in load_dictionary(out).chunks} == {1, 2}
    r = CliRunner().invoke(main, ["discover", "--model", "random:llama-tiny", "--layers", "1", "--out", str(out)])
    assert r.exit_code == 2 and "exactly one of --corpus and --spans" in r.output
