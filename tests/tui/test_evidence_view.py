"""The selected token's evidence: the concept it shows, agreement and training precision, every layer's match.

Readable at 80x24 (snapshot) and growing with the terminal (140x45); the list scrolls.
"""

from __future__ import annotations

import pytest

from chunktui.tui.widgets.token_detail import TokenDetail
from chunktui.tui.widgets.trace_view import TraceView
from tests.tui.conftest import generate, ready, settle, still_blinkless

pytestmark = pytest.mark.anyio


async def _select(app, pilot, label: str = "dog") -> int:
    view = app.query_one("#stream-trace", TraceView)
    target = app.stream_trace.labels().index(label)
    view.focus()
    await pilot.press("home")
    await pilot.press(*["right"] * target)
    await settle(app, pilot)
    assert view.cursor == target
    return target


def _inside(inner, outer) -> bool:
    return (inner.x >= outer.x and inner.y >= outer.y and inner.right <= outer.right
            and inner.bottom <= outer.bottom)


@pytest.mark.parametrize("size", [(80, 24), (140, 45)])
async def test_per_layer_list_fits_its_panel_and_lists_every_layer(make_test_app, size):
    app = make_test_app()
    async with app.run_test(size=size) as pilot:
        await ready(app, pilot)
        await generate(app, pilot)
        target = await _select(app, pilot)
        view = app.query_one("#stream-trace", TraceView)
        panel = view.query_one(TokenDetail)
        text = str(panel.content)
        assert text.startswith(f"token {target}")
        assert "dog" in text and "1/1 layers" in text and "right in training" in text  # agreement, precision
        for layer in range(5):  # the tiny model's 5 states: every layer listed, with deviation against θ
            assert f"\nL{layer:<3}" in text
        assert "≤ θ" in text or "> θ" in text
        assert "ln(threshold / deviation)" in text  # the score, explained once
        column = view.query_one(".trace-right").region
        assert _inside(panel.region, column)  # it fits its panel: nothing spills past the column
        assert panel.region.height >= (5 if size == (80, 24) else 14)  # it grows with the terminal
        if panel.virtual_size.height > panel.size.height:  # longer than the panel: it scrolls
            await pilot.press("shift+down")
            await pilot.pause()
            assert panel.scroll_y > 0


async def _a_token_selected(pilot) -> None:
    """The snapshots' set-up: a generated trace with a token selected, the cursor still."""
    app = pilot.app
    await settle(app, pilot)
    await generate(app, pilot)
    await _select(app, pilot)
    await settle(app, pilot, rounds=2)
    still_blinkless(app)
    await pilot.pause()


def test_token_detail_80x24(snap_compare, make_test_app):
    assert snap_compare(make_test_app(), terminal_size=(80, 24), run_before=_a_token_selected)


def test_token_detail_140x45(snap_compare, make_test_app):
    assert snap_compare(make_test_app(), terminal_size=(140, 45), run_before=_a_token_selected)
