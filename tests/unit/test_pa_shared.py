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
        real = ConceptScreen.decide
        monkeypatch.setattr(ConceptScreen, "decide", lambda self, *a: screens.append(1) or real(self, *a))
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
