"""`chunktui bench app`'s latency trend: slope and p95 gap with bootstrap intervals (no timing asserted)."""

import random

from chunktui.tui.bench import _pct, latency_trend, p95_by_tenth


def test_a_known_slope_is_recovered_exactly_without_noise():
    pairs = [(0.010 + 0.002 * c / 1000, c) for c in range(0, 1000, 7)]  # 10 ms, +2 ms per 1,000 tokens
    trend = latency_trend(pairs, 1000, resamples=200)
    assert trend["slope_ms_per_1000_tokens"] == 2.0
    assert trend["slope_ci95"] == [2.0, 2.0]
    assert trend["p95_last_minus_first"] > 1.5  # the last 10% sits ~1.8 ms above the first


def test_flat_noise_gives_an_interval_around_zero_and_the_gap_of_the_two_p95s():
    rng = random.Random(1)
    pairs = [(rng.uniform(0.005, 0.025), c) for c in range(0, 1000, 1)]
    trend = latency_trend(pairs, 1000, resamples=300)
    lo, hi = trend["slope_ci95"]
    # 1,000 presses, uniform over 20 ms (sd 5.8 ms): the slope's standard error is 0.63 ms per 1,000 tokens,
    # so a 95% interval about 2.5 wide around the estimate
    assert lo <= trend["slope_ms_per_1000_tokens"] <= hi and 1.5 < hi - lo < 4
    steep = latency_trend([(x + 0.010 * c / 1000, c) for x, c in pairs], 1000, resamples=300)
    assert steep["slope_ci95"][0] > 5  # +10 ms per 1,000 tokens under the same noise: clearly above zero
    early = [x for x, c in pairs if c <= 100]
    late = [x for x, c in pairs if c >= 900]
    assert trend["p95_last_minus_first"] == round(1000 * (_pct(late, 0.95) - _pct(early, 0.95)), 1)
    lo, hi = trend["p95_last_minus_first_ci95"]
    assert lo <= trend["p95_last_minus_first"] <= hi


def test_seeded_and_empty():
    pairs = [(0.01 * (1 + (c % 5)), c) for c in range(300)]
    assert latency_trend(pairs, 300) == latency_trend(pairs, 300)
    empty = latency_trend([], 1000)
    assert empty["slope_ms_per_1000_tokens"] is None and empty["slope_ci95"] is None
    one_end = latency_trend([(0.01, 5), (0.02, 6), (0.03, 7)], 1000, resamples=50)
    assert one_end["p95_last_minus_first"] is None  # no press in the last 10%
    few = latency_trend([(0.01, 950)], 1000, resamples=1)  # no statistic in any resample: no interval
    assert few["slope_ci95"] is None and few["p95_last_minus_first_ci95"] is None


def test_p95_by_tenth_splits_the_stream_and_matches_the_two_ends():
    rng = random.Random(2)
    pairs = [(rng.uniform(0.005, 0.025) + 0.001 * (c // 100), c) for c in range(0, 1001)]  # +1 ms per tenth
    tenths = p95_by_tenth(pairs, 1000)
    assert len(tenths) == 10
    assert tenths[0] == round(1000 * _pct([x for x, c in pairs if c <= 100], 0.95), 1)  # as p95_first_10pct
    assert tenths[9] == round(1000 * _pct([x for x, c in pairs if c >= 900], 0.95), 1)  # as p95_last_10pct
    assert tenths[4] == round(1000 * _pct([x for x, c in pairs if 400 < c <= 500], 0.95), 1)
    assert tenths[8] == round(1000 * _pct([x for x, c in pairs if 800 < c < 900], 0.95), 1)
    assert tenths[9] - tenths[0] > 5  # the +9 ms climb shows at the two ends
    # a press on a boundary falls in one tenth only
    assert p95_by_tenth([(0.01, 950)], 1000) == [None] * 9 + [10.0]
    assert p95_by_tenth([(0.01, 100)], 1000) == [10.0] + [None] * 9
    assert p95_by_tenth([], 1000) == [None] * 10
