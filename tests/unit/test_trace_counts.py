"""A trace's generated-token count is kept as tokens arrive (the app and the bench ask for it per key), and stays
right when the steps are replaced."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from chunktui.shared.session import ChunkColumns, TokenStep, Trace

COLUMNS = ChunkColumns(ids=["cheese@0"], labels=["cheese"], layers=[0], thresholds=[0.5], kinds=["pa"])


def _step(i: int, generated: bool) -> TokenStep:
    return TokenStep(index=i, token_id=i, text=f"w{i}", generated=generated, logprob=None, top=[], strongest=-1,
                     strongest_score=float("-inf"), layer_chunk=[-1], layer_score=[float("-inf")], norms=[1.0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["extend", "replace", "ask"]), st.lists(st.booleans(), max_size=6)),
                max_size=12))
def test_n_generated_follows_every_change(ops):
    trace = Trace("stream", "t", COLUMNS)
    for op, flags in ops:
        steps = [_step(len(trace) + k, g) for k, g in enumerate(flags)]
        if op == "extend":
            trace.extend(steps)
        elif op == "replace":
            trace.replace_steps(steps)
        assert trace.n_generated == sum(s.generated for s in trace.steps)
