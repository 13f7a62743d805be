"""Rules in the app: written and checked as you type, a stop ends the stream and the status bar names the rule."""

from __future__ import annotations

import pytest
from textual.widgets import Label, TextArea

from chunktui.shared.journal import step_from_dict, step_to_dict
from chunktui.tui.rules_screen import RuleSettings, RulesScreen
from tests.tui.conftest import generate, ready, settle

pytestmark = pytest.mark.anyio


async def test_rules_screen_checks_as_you_type(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(110, 36)) as pilot:
        await ready(app, pilot)
        await pilot.press("f7")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, RulesScreen)
        area = screen.query_one("#rules-text", TextArea)
        area.text = "when chese -> stop"
        await pilot.pause()
        check = str(screen.query_one("#rules-check", Label).content)
        assert "nearest: cheese" in check and screen.query_one("#rules-check").has_class("error")
        area.text = "when cheese@ -> stop"
        await pilot.pause()
        assert "column 14" in str(screen.query_one("#rules-check", Label).content)
        area.text = "# a guard\nwhen cheese for 2 -> stop\nwhen dog -> alert"
        await pilot.pause()
        assert "2 rules ok, checked against" in str(screen.query_one("#rules-check", Label).content)
        screen.query_one("#rules-on").value = True
        await pilot.click("#rules-use")
        await pilot.pause()
        assert app.rule_settings.on and app.rule_settings.texts == ["when cheese for 2 -> stop", "when dog -> alert"]
        assert "rules on (2)" in str(app.query_one("#status").content)


async def test_a_stop_rule_ends_the_stream_and_is_named(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(110, 36)) as pilot:
        await ready(app, pilot)
        app.rule_settings = RuleSettings(text="guard: when not rain@0 for 3 -> stop\nwhen dog -> alert", on=True)
        await generate(app, pilot, tokens=12)
        trace = app.stream_trace
        assert trace.finished == "rule" and trace.stopped_by == "guard"
        assert trace.n_generated == 3  # three generated tokens without rain at layer 0 (the tiny model never says it)
        stop = [f for f in trace.firings if f["action"] == "stop"]
        assert len(stop) == 1 and stop[0]["token"] == trace.steps[-1].index
        assert "stopped by rule guard" in str(app.query_one("#status").content)
        shown = app.query_one("#stream-firings")
        assert shown.display and "stopped by rule guard" in str(shown.content)
        assert trace.to_record()["firings"] == trace.firings
        # the journal keeps them, so a restored session has them
        step = trace.steps[-1]
        assert step_from_dict(step_to_dict(step)).firings == step.firings


async def test_a_bad_rule_is_a_message_and_the_app_keeps_running(make_test_app):
    app = make_test_app()
    async with app.run_test(size=(110, 36)) as pilot:
        await ready(app, pilot)
        app.rule_settings = RuleSettings(text="when chese -> stop", on=True)
        app.action_generate()
        await settle(app, pilot)
        assert any("nearest: cheese" in str(n.message) for n in app._notifications)
        assert app._busy is None
        app.rule_settings = RuleSettings(text="when chese -> stop", on=False)  # switched off: generation runs
        await generate(app, pilot, tokens=4)
        assert app.stream_trace.finished == "length" and not app.stream_trace.firings
