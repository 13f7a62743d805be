"""Pass 2's float32 screen over shared subpopulations gives the dictionaries of the per-tolerance matmul it replaced.

The previous algorithm (one column per tolerance, `_per_tolerance_deviations`
below, kept here as the reference) and the current one (one column per
distinct subpopulation) round differently in float32; every decision within
rounding of a threshold is taken again in float64, so the dictionaries must be
identical to the byte.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from chunktui.engine.build import LabelSource, build_dictionary
from chunktui.engine.pa import PAPER_TOLERANCES, ConceptScreen, ConceptTemplate, StreamingFit

WORDS = ["cheese", "cake", "dog", "rain"]


def _per_tolerance_deviations(self, rows):
    """The previous screen: a (S, t, d) x (S, d, K) matmul over every tolerance's mask."""
    d2 = (rows.float() - self.mu).square_().transpose(0, 1)
    return torch.bmm(d2, self.Mf) * self.inv[:, None, :]


def _per_tolerance_screen(self, states, states_t):
    """The previous pass-2 decision: the per-tolerance means, compared with theta, re-decided near it in float64."""
    dev = self.deviations(states)
    theta = self.theta.to(dev.dtype)
    match = dev <= theta[:, None, :]
    near = ((dev - theta[:, None, :]).abs() <= 1e-4 * theta[:, None, :] + 1e-12).any(-1).any(0)
    if near.any():
        idx = near.nonzero().flatten()
        match[:, idx, :] = self.deviations64(states[idx]) <= self.theta[:, None, :]
    return match


def _dump(dictionary, path):
    dictionary.save(path)
    with safe_open(str(path), "pt") as f:
        return {k: (str(f.get_tensor(k).dtype), f.get_tensor(k).numpy().tobytes()) for k in f.keys()}


def _padded(monkeypatch):
    """The accelerator's layout (one batched matmul over all layers, padded), forced on the CPU."""
    share = ConceptTemplate._share_columns

    def padded(self):
        share(self)
        self.per_layer = False

    monkeypatch.setattr(ConceptTemplate, "_share_columns", padded)


@pytest.mark.parametrize("criterion,n,layout", [("accuracy", 5, "all-concepts"), ("accuracy", 5, "per-layer"),
                                                ("accuracy", 5, "padded"), ("f1", 3, "all-concepts"),
                                                ("f1", 3, "per-layer"), ("fp-budget:0.01", None, "per-layer"),
                                                ("fp-budget:0.01", None, "padded")])
def test_shared_screen_gives_byte_identical_dictionaries(tiny_model, tiny_corpus, tmp_path, monkeypatch, criterion, n,
                                                         layout):
    """all-concepts: `ConceptScreen` (the default for the paper's criteria); per-layer and padded: one concept
    at a time (`ConceptTemplate.screen`, the CPU's and the accelerator's layouts); the reference: one concept at
    a time, one column per tolerance."""
    source = dict(corpus=tiny_corpus, words=WORDS)
    if layout == "padded":
        _padded(monkeypatch)
    if layout != "all-concepts":
        monkeypatch.setattr(StreamingFit, "batched", False)
    screens = []
    if layout == "all-concepts":
        real = ConceptScreen.counts
        monkeypatch.setattr(ConceptScreen, "counts", lambda self, *a: screens.append(1) or real(self, *a))
    new, _ = build_dictionary(tiny_model, LabelSource(**source), n=n, criterion=criterion, batch_size=5)
    assert bool(screens) == (layout == "all-concepts")  # the path under test ran
    monkeypatch.undo()
    monkeypatch.setattr(StreamingFit, "batched", False)
    monkeypatch.setattr(ConceptTemplate, "deviations", _per_tolerance_deviations)
    monkeypatch.setattr(ConceptTemplate, "screen", _per_tolerance_screen)
    old, _ = build_dictionary(tiny_model, LabelSource(**source), n=n, criterion=criterion, batch_size=5)
    assert len(new.chunks) == len(old.chunks) > 10
    new_tensors = _dump(new, tmp_path / "new.chunks.safetensors")
    old_tensors = _dump(old, tmp_path / "old.chunks.safetensors")
    assert new_tensors.keys() == old_tensors.keys()
    for key in new_tensors:
        assert new_tensors[key] == old_tensors[key], key
    for a, b in zip(new.chunks, old.chunks):
        assert (a.id, a.threshold, a.tolerance, a.fit) == (b.id, b.threshold, b.tolerance, b.fit)


def _template(S=3, d=40, n=5, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    scale = scale if scale is not None else torch.logspace(-3, 1, d)  # spreads over four decades: many tolerances
    X = torch.randn(n, S, d, generator=g) * scale
    taus = torch.tensor(PAPER_TOLERANCES, dtype=torch.float32)
    return ConceptTemplate("x", torch.arange(n), X, taus, "cpu"), g


@pytest.mark.parametrize("per_layer", [True, False])
def test_distinct_columns_cover_every_tolerance(per_layer):
    tpl, g = _template()
    tpl.per_layer = per_layer
    S, K = tpl.theta.shape
    assert tpl.Mu.shape[2] < K  # tolerances share subpopulations, so fewer columns than tolerances
    for s in range(S):
        for k in range(K):
            if tpl.count[k, s] > 0:
                assert torch.equal(tpl.Mu[s, :, tpl.column[s, k]], tpl.M[k, s].float()), (s, k)
    rows = torch.randn(50, S, tpl.mu.shape[1], generator=g)
    screen = tpl.deviations(rows).double()
    exact = tpl.deviations64(rows)
    assert torch.equal(screen.isnan(), exact.isnan()) and screen.isnan().any()  # the empty sets never match
    ok = ~exact.isnan()
    assert ((screen[ok] - exact[ok]).abs() <= tpl.band * exact[ok] + 1e-12).all()
    # the screen's decisions are the float64 ones, for tokens far from and on a threshold (a drawn positive)
    rows = torch.cat([rows, tpl.mu[None] + 0.0])
    states = rows
    match = tpl.screen(states, states.transpose(0, 1).contiguous())
    assert torch.equal(match, tpl.deviations64(rows) <= tpl.theta[:, None, :])


def test_band_widens_with_the_width():
    small, _ = _template(d=40)
    wide, _ = _template(S=1, d=4096, scale=torch.ones(4096))
    assert small.band == 1e-4
    assert wide.band > 2 * 4096 * 2.0 ** -24  # float32 sums over 4096 neurons may be off by more than 1e-4


def test_all_concepts_screen_decides_as_each_template_does():
    """`ConceptScreen` against each template's own screen, on tokens far from and on a threshold (a drawn positive)."""
    templates = [_template(seed=seed)[0] for seed in range(3)]
    templates.append(_template(seed=9, scale=torch.full((40,), 1e3))[0])  # spreads above every tolerance: M empty
    g = torch.Generator().manual_seed(4)
    S, d = templates[0].mu.shape
    rows = torch.cat([torch.randn(60, S, d, generator=g) * torch.logspace(-3, 1, d)] + [t.mu[None] + 0.0 for t in templates])
    screen = ConceptScreen(templates)
    assert any(screen.columns[s] is not None for s in range(S))
    match = screen.screen(rows, rows.transpose(0, 1).contiguous())
    for c, tpl in enumerate(templates):
        own = tpl.screen(rows, rows.transpose(0, 1).contiguous())
        assert torch.equal(match[c], own), c
        assert torch.equal(own, tpl.deviations64(rows) <= tpl.theta[:, None, :])
    assert match.any() and not match[-1].any()


def _adversarial_rows(templates, g, S, d):
    """Tokens far from, near and exactly on the thresholds, with large coordinates and overflowing ones."""
    parts = [torch.randn(40, S, d, generator=g) * torch.logspace(-3, 1, d)]
    for tpl in templates:
        X = tpl.mu + 0.0  # the template itself (deviation 0)
        parts.append(X[None])
        # each drawn positive (one of them sits exactly on each theta), and copies of them pushed just inside and
        # just outside it: the deviation scales with the square of the factor
        R = tpl.X
        parts.append(R)
        for eps in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
            for sign in (1, -1):
                parts.append(tpl.mu + (R - tpl.mu) * (1 + sign * eps))
        # and a fine grid through the thresholds, computed in float64 and rounded once
        f = 1 + torch.linspace(-3e-3, 3e-3, 61, dtype=torch.float64)[:, None, None, None]
        parts.append((tpl.mu.double() + (R.double() - tpl.mu.double()) * f).flatten(0, 1).float())
    rows = torch.cat(parts)
    rows[3, 1, 5] = 3e19  # its square overflows float32: decided in float64
    rows[4, 0, :] = float("inf")  # not finite at all: the float64 reference says no match (NaN or inf)
    return rows


def _reference(templates, rows):
    return torch.stack([tpl.deviations64(rows) <= tpl.theta[:, None, :] for tpl in templates])  # (C, S, t, K)


def _offset_templates(offset, S, d, n=5):
    """Four concepts, one without any subpopulation, none at layer 2; `offset` on a third of the neurons."""
    g = torch.Generator().manual_seed(11)
    shift = torch.zeros(S, d)
    shift[:, ::3] = offset  # large coordinates on a third of the neurons, the same in every state
    templates = []
    for seed in range(4):
        scale = torch.logspace(-3, 1, d).repeat(S, 1)
        if seed == 3:
            scale[:] = 1e3  # spreads above every tolerance at every layer: no subpopulation at all
        scale[2] = 1e3  # and at layer 2 no concept has one: the layer is skipped
        X = torch.randn(n, S, d, generator=g) * scale + shift
        taus = torch.tensor(PAPER_TOLERANCES, dtype=torch.float32)
        tpl = ConceptTemplate(f"c{seed}", torch.arange(n), X, taus, "cpu")
        tpl.X = X
        templates.append(tpl)
    return templates, g, shift


def _offset_batch(offset, S, d):
    """`_offset_templates` with a batch of adversarial states around them, and seeded positives and drawn ones."""
    templates, g, shift = _offset_templates(offset, S, d)
    rows = _adversarial_rows(templates, g, S, d) + 0.0
    rows[:40] += shift  # the random tokens around the same large coordinates as the templates
    pos = torch.rand(len(templates), len(rows), generator=g) < 0.2
    own = pos & (torch.rand(len(templates), len(rows), generator=g) < 0.3)
    return templates, rows, pos, own


@pytest.mark.parametrize("offset", [0.0, 300.0, 1e5])
def test_expanded_screen_decides_as_the_float64_reference(offset):
    """`ConceptScreen` (the expansion A - 2B + c in float32, a float64 expansion for rows within its bound, the
    reference row by row for ties) against `deviations64` on tokens on, just inside and just outside every
    threshold; `offset` moves every state far from 0 (a large stable coordinate), where the expansion cancels most."""
    S, d = 4, 48
    templates, g, shift = _offset_templates(offset, S, d)
    screen = ConceptScreen(templates)
    assert screen.columns[2] is None and all(t.layer_columns[0] is None for t in templates[3:])
    widths = {t.layer_columns[1].shape[1] for t in templates[:3]}
    assert len(widths) > 1  # concepts with different numbers of distinct subpopulations side by side
    rows = _adversarial_rows(templates, g, S, d) + 0.0
    rows[:40] += shift  # the random tokens around the same large coordinates as the templates
    match = screen.screen(rows)
    reference = _reference(templates, rows)
    assert torch.equal(match, reference)
    assert reference.any() and not reference[3].any() and not reference[:, 2].any()
    # the float32 expansion alone, without its bound, decides some of these tokens wrongly (ties, cancellation)
    naive = torch.zeros_like(reference)
    for s in range(S):
        if screen.columns[s] is None:
            continue
        h = rows[:, s, :]
        approx = (h * h) @ screen.columns[s] - 2 * (h @ screen.weighted[s]) + screen.const[s]
        limit = torch.stack([tpl.theta[s] / tpl.inv64[s] for tpl in templates]).float()  # (C, K)
        naive[:, s] = (approx[:, screen.index[s]].view(len(rows), len(templates), -1) <= limit).transpose(0, 1)
    assert not torch.equal(naive, reference)
    # every path ran: float32 decisions, the float64 expansion for some rows, the reference for ties
    assert screen.screened == len(templates) * len(rows)
    assert 0 < screen.float64_rows < S * len(rows)
    assert 0 < screen.near_tokens < screen.screened


def test_expanded_screen_counts_equal_the_reference_counts():
    """`ConceptScreen.counts`: TP on the positives not drawn, FP on the negatives, as the float64 matches give."""
    S, d = 3, 40
    templates = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(5, S, d, generator=g) * torch.logspace(-3, 1, d)
        tpl = ConceptTemplate(f"c{seed}", torch.arange(5), X, torch.tensor(PAPER_TOLERANCES), "cpu")
        tpl.X = X
        templates.append(tpl)
    g = torch.Generator().manual_seed(7)
    rows = _adversarial_rows(templates, g, S, d)
    t = len(rows)
    pos = torch.rand(len(templates), t, generator=g) < 0.3
    own = pos & (torch.rand(len(templates), t, generator=g) < 0.3)
    counts = ConceptScreen(templates).counts(rows, pos, own)  # (C, S, K, 2)
    reference = _reference(templates, rows)  # (C, S, t, K)
    tp = (reference & (pos & ~own)[:, None, :, None]).sum(2)
    fp = (reference & ~pos[:, None, :, None]).sum(2)
    assert torch.equal(counts[..., 0], tp) and torch.equal(counts[..., 1], fp)
    assert tp.sum() > 0 and fp.sum() > 0


@pytest.mark.parametrize("offset", [0.0, 300.0, 1e5])
def test_counts_equal_the_reference_counts_on_every_path(offset):
    """`counts` sums the sure float32 matches per distinct column and decides only the positives, the rows
    within the bound and the ties one (concept, tolerance) at a time: its TP and FP equal the float64
    reference's, with every path taken (float32, the float64 sums of undecided cells, the reference row by
    row), a concept
    without subpopulations and a layer without any."""
    S, d = 4, 48
    templates, rows, pos, own = _offset_batch(offset, S, d)
    t = len(rows)
    screen = ConceptScreen(templates)
    counts = screen.counts(rows, pos, own)  # (C, S, K, 2)
    reference = _reference(templates, rows)  # (C, S, t, K)
    tp = (reference & (pos & ~own)[:, None, :, None]).sum(2)
    fp = (reference & ~pos[:, None, :, None]).sum(2)
    assert torch.equal(counts[..., 0], tp) and torch.equal(counts[..., 1], fp)
    assert tp.sum() > 0 and fp.sum() > 0
    assert 0 < screen.float64_rows < S * t and 0 < screen.near_tokens < screen.screened
    # ties: both ways taken (a drawn positive's bits at the tied layers, its devR read; else the reference run)
    assert screen.ties_reused > 0 and screen.ties_computed > 0
    assert screen.ties_reused + screen.ties_computed == screen.near_tokens
    none = screen.counts(rows, torch.zeros_like(pos), torch.zeros_like(own))  # no positive: every match is an FP
    assert torch.equal(none[..., 0], torch.zeros_like(tp)) and torch.equal(none[..., 1], reference.sum(2))


def test_counts_near_the_float32_range_go_to_float64():
    """A state whose sums are finite in float32 but whose bounded sum (1 + rel) P overflows: undecided, not a
    sure no (its exact deviation from the template is 0, and the reference matches it)."""
    S, d = 2, 1
    v = float(torch.tensor((torch.finfo(torch.float32).max / 2) * (1 - 3e-7)).sqrt())
    X = torch.full((5, S, d), v)
    tpl = ConceptTemplate("big", torch.arange(5), X, torch.tensor(PAPER_TOLERANCES), "cpu")
    rows = torch.cat([X[:1], X[:1] * 0.5, torch.randn(3, S, d)])
    pos = torch.zeros(1, len(rows), dtype=torch.bool)
    screen = ConceptScreen([tpl])
    counts = screen.counts(rows, pos, pos)
    reference = _reference([tpl], rows)
    assert reference[0, :, 0].any()  # the template's own state matches
    assert torch.equal(counts[..., 1], reference.sum(2))


def test_counts_keep_their_buffers_across_batches_of_any_size():
    """`counts` reuses its batch-sized buffers: batches of growing, shrinking and single-token sizes, one with a
    state that is not finite (NaN at one layer, infinite at another), each count as the float64 reference does."""
    S, d = 4, 48
    templates, g, shift = _offset_templates(300.0, S, d)
    rows = _adversarial_rows(templates, g, S, d) + 0.0
    rows[:40] += shift
    rows[5, 1, 3] = float("nan")
    rows[6, 0, :] = float("inf")
    pos_all = torch.rand(len(templates), len(rows), generator=g) < 0.2
    own_all = pos_all & (torch.rand(len(templates), len(rows), generator=g) < 0.3)
    screen = ConceptScreen(templates)
    order = torch.randperm(len(rows), generator=g)
    start = 0
    for size in (50, 200, 1, 120, len(rows)):
        idx = order[start:start + size] if start + size <= len(rows) else order[:size]
        start += size
        batch, pos, own = rows[idx], pos_all[:, idx], own_all[:, idx]
        counts = screen.counts(batch, pos, own)
        reference = _reference(templates, batch)  # (C, S, t, K)
        tp = (reference & (pos & ~own)[:, None, :, None]).sum(2)
        fp = (reference & ~pos[:, None, :, None]).sum(2)
        assert torch.equal(counts[..., 0], tp) and torch.equal(counts[..., 1], fp), size
    assert reference.any()


def test_counts_sum_the_undecided_cells_chunk_by_chunk():
    """With chunks of a few cells, on states with large stable coordinates (many cells the float32 bound
    leaves undecided) and a few that are not finite, the counts are still the reference's."""
    S, d = 4, 48
    templates, rows, pos, own = _offset_batch(300.0, S, d)
    whole = ConceptScreen(templates)
    whole.cell_chunk = 1 << 30  # every cell in one piece
    chunked = ConceptScreen(templates)
    chunked.cell_chunk = 3 * d  # three cells a chunk
    reference = _reference(templates, rows)
    tp = (reference & (pos & ~own)[:, None, :, None]).sum(2)
    fp = (reference & ~pos[:, None, :, None]).sum(2)
    for screen in (whole, chunked):
        counts = screen.counts(rows, pos, own)
        assert torch.equal(counts[..., 0], tp) and torch.equal(counts[..., 1], fp)
    assert chunked.float64_rows > 10  # many cells went through float64, in many chunks
    # and each chunk's sums decided its cells: no more ties left to the reference than in one piece
    assert (chunked.near_tokens, chunked.ties_computed) == (whole.near_tokens, whole.ties_computed)
