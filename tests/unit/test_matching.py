"""Packed matching agrees with a plain per-chunk computation."""

import math

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
        chunks.append(Chunk(id=f"c{i}", label=f"l{i % 5}", layer=layer, neurons=neurons,
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
