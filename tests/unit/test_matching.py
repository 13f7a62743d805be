"""Packed matching agrees with a plain per-chunk computation."""

import math

import pytest
import torch

from chunktui.engine.dictionary import Chunk
from chunktui.engine.matching import direct_deviation, pack


def random_chunks(width=16, n_states=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    chunks = []
    for i in range(12):
        layer = i % n_states
        m = int(torch.randint(1, width, (1,), generator=g))
        neurons = torch.randperm(width, generator=g)[:m].sort().values
        chunks.append(Chunk(id=f"c{i}", label=f"l{i % 5}", layer=layer, subpopulation=neurons,
                            template=torch.randn(m, generator=g), threshold=float(torch.rand(1, generator=g) * 2 + 0.5)))
    u = torch.randn(width, generator=g)
    chunks.append(Chunk(id="d0", label="dir", layer=2, kind="direction", direction=u / u.norm(), threshold=0.2))
    return chunks


def test_packed_matches_direct_computation():
    width, n_states = 16, 4
    chunks = random_chunks(width, n_states)
    packed = pack(chunks, width, n_states)
    H = torch.randn(50, n_states, width)
    H[:5, 1] = 0  # some exact zeros
    result = packed.match(H, block_elements=300)  # force several token blocks
    for c, chunk in enumerate(packed.chunks):
        for t in range(50):
            state = H[t, chunk.layer]
            if chunk.kind == "pa":
                dev = direct_deviation(chunk, state)
                assert math.isclose(float(result.value[t, c]), dev, rel_tol=1e-5, abs_tol=1e-6)
                assert bool(result.hit[t, c]) == (dev <= chunk.threshold)
            else:
                cos = float(state @ chunk.direction / state.norm().clamp(min=1e-12))
                assert math.isclose(float(result.value[t, c]), cos, rel_tol=1e-5, abs_tol=1e-6)
                assert bool(result.hit[t, c]) == (cos >= chunk.threshold)
    # score >= 0 exactly when hit
    assert torch.equal(result.score >= 0, result.hit)


def test_best_per_layer_and_per_token():
    width, n_states = 16, 4
    chunks = random_chunks(width, n_states, seed=3)
    # make some chunks easy to hit
    for c in chunks[:6]:
        c.threshold = 5.0
    packed = pack(chunks, width, n_states)
    H = torch.randn(30, n_states, width) * 0.5
    r = packed.match(H)
    for t in range(30):
        for s in range(n_states):
            cands = [(float(r.score[t, c]), c) for c, ch in enumerate(packed.chunks) if ch.layer == s and r.hit[t, c]]
            if cands:
                best_score, best = max(cands)
                assert int(r.layer_chunk[t, s]) == best
                assert float(r.layer_score[t, s]) == best_score
            else:
                assert int(r.layer_chunk[t, s]) == -1
        hits = [(float(r.score[t, c]), c) for c in range(len(packed.chunks)) if r.hit[t, c]]
        assert int(r.token_chunk[t]) == (max(hits)[1] if hits else -1)


def test_layer_subset_axis():
    chunks = random_chunks(16, 4)
    packed = pack(chunks, 16, 4, layers=[1, 3])
    assert {c.layer for c in packed.chunks} == {1, 3}
    r = packed.match(torch.randn(7, 2, 16))
    assert r.hit.shape == (7, len(packed.chunks))


# --------------------------------------------------------------------------- precision policy


def _hard_case(T=10_000, n_states=3, width=256, seed=11):
    """Random states with a few large ("massive") activations, a random dictionary whose thresholds sit
    exactly on some token's deviation (as PA fits them: the largest deviation of a training positive), and
    direction chunks whose thresholds sit on some token's cosine: the hardest case for rounding."""
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(T, n_states, width, generator=g)
    H[:, :, :4] *= 40.0  # a few outlier neurons, as in real LLM residual streams
    H[:50, 0] = H[50:100, 0]  # repeated states: exact matches at deviation 0
    H = H.to(torch.bfloat16)  # recorded in the model's dtype on a GPU
    chunks = []
    for i in range(60):
        layer = i % n_states
        m = int(torch.randint(1, width, (1,), generator=g))
        neurons = torch.randperm(width, generator=g)[:m].sort().values
        source = H[int(torch.randint(0, T, (1,), generator=g)), layer].float()
        template = source[neurons] + 0.3 * torch.randn(m, generator=g)
        chunks.append(Chunk(id=f"p{i}", label=f"l{i % 7}", layer=layer, subpopulation=neurons, template=template,
                            threshold=0.0))
    chunks.append(Chunk(id="exact", label="exact", layer=0, subpopulation=torch.arange(width),
                        template=H[60, 0].float(), threshold=0.0))  # only its own copies match, at dev = 0
    for i in range(12):
        u = torch.randn(width, generator=g)
        chunks.append(Chunk(id=f"d{i}", label="dir", layer=i % n_states, kind="direction", direction=u / u.norm(),
                            threshold=0.0))
    reference = pack(chunks, width, n_states, precision="float64")
    values = reference.match(H).value.double()
    for c, chunk in enumerate(reference.chunks):  # thresholds on real deviations / cosines, in float64
        if chunk.id == "exact":
            continue
        column = values[:, c]
        chunk.threshold = float(column.quantile(0.2 if chunk.kind == "pa" else 0.9))
        chunk.threshold = float(column[(column - chunk.threshold).abs().argmin()])  # exactly one token's value
    return chunks, H, width, n_states


def test_float32_matching_decides_exactly_as_float64():
    """10,000 random states x 73 chunks: the float32 path (forced on CPU, as it runs on GPUs) and the float64
    reference agree on every decision, including tokens sitting exactly on a threshold."""
    chunks, H, width, n_states = _hard_case()
    reference = pack(chunks, width, n_states, precision="float64").match(H)
    fast_pack = pack(chunks, width, n_states, precision="float32")
    fast = fast_pack.match(H, block_elements=1 << 22)  # several token blocks
    assert fast_pack.precision == "float32"
    disagreements = int((fast.hit != reference.hit).sum())
    assert disagreements == 0
    assert int(reference.hit.sum()) > 0.1 * reference.hit.numel()  # plenty of matches to get wrong
    exact = [c.id for c in fast_pack.chunks].index("exact")
    assert reference.hit[:, exact].nonzero().flatten().tolist() == [10, 60]  # the state and its copy, dev = 0
    # only tokens near a threshold went to float64, and those on a threshold did
    assert 0 < fast_pack.rechecked < len(H)
    assert torch.equal(fast.score >= 0, fast.hit)
    assert torch.allclose(fast.value, reference.value, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.layer_chunk >= 0, reference.layer_chunk >= 0)


def test_without_the_band_float32_would_disagree(monkeypatch):
    """The band is what makes float32 exact: with it removed, the same data gives wrong decisions."""
    import chunktui.engine.matching as matching

    chunks, H, width, n_states = _hard_case(T=3000)
    reference = pack(chunks, width, n_states, precision="float64").match(H)
    monkeypatch.setattr(matching, "_BAND_SAFETY", 0.0)  # no band: float32 decides everything
    raw = pack(chunks, width, n_states, precision="float32").match(H)
    assert int((raw.hit != reference.hit).sum()) > 0


def test_precision_choice():
    chunks = random_chunks()
    assert pack(chunks, 16, 4).precision == "float64"  # CPU: float64 is fast enough
    assert pack(chunks, 16, 4, precision="float32").precision == "float32"
    with pytest.raises(ValueError, match="precision"):
        pack(chunks, 16, 4, precision="float16")


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_pa_only_dictionary_takes_the_pa_branch_alone_with_the_same_bits(precision):
    """Without direction chunks `_evaluate` computes the PA branch alone: the same values, scores and hits,
    bit for bit, as the general path that selects between the two branches."""
    from chunktui.engine import matching

    chunks, H, width, n_states = _hard_case(T=2_000)
    pa_only = [c for c in chunks if c.kind == "pa"]
    fast = pack(pa_only, width, n_states, precision=precision)
    general = pack(pa_only, width, n_states, precision=precision)
    for tables in (general._exact, general._fast):
        if tables is not None:
            tables.all_pa = False  # as if a direction were present: both branches and the selection
    a, b = fast.match(H), general.match(H)
    assert fast._exact.all_pa is True
    for name in ("value", "score", "hit", "layer_score", "layer_chunk", "token_chunk", "token_score"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.hit.any() and not a.hit.all()
    # with a direction chunk the general path runs
    mixed = pack(chunks, width, n_states, precision=precision)
    assert mixed._exact.all_pa is False and (mixed._fast is None or mixed._fast.all_pa is False)
    assert matching._Tables.to(fast._exact, "cpu", torch.float32).all_pa is True  # kept across devices and dtypes


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_pooled_evidence_is_the_evidence_of_the_match(precision):
    """The colour rule's calibration pools evidence without `match`'s summaries: the same bits."""
    chunks, H, width, n_states = _hard_case(T=1_500)
    packed = pack(chunks, width, n_states, precision=precision)
    want = packed.evidence(packed.match(H).score)
    got = packed.pooled_evidence(H, block_elements=1 << 18)  # several blocks
    assert got.shape == (len(H), len(packed.concepts)) and torch.equal(got, want)
    assert packed.pooled_evidence(H[:0]).shape == (0, len(packed.concepts))
    empty = pack([], width, n_states)
    assert empty.pooled_evidence(H[:3]).shape == (3, 0)
