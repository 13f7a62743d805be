"""Helpers for the app's line-API scroll views (TokenView, TokenDetail): no layout pass when a text grows."""

from __future__ import annotations

from textual.geometry import Size
from textual.scroll_view import ScrollView


def set_virtual_size(view: ScrollView, size: Size) -> None:
    """Give `view` a new virtual size without a layout pass of the screen.

    Textual's own way (assigning `virtual_size`) lays the whole screen out again;
    here the scrollbar is updated in place, and only when the scrollbar appears or
    goes (the view's content width changes) is the screen laid out again.
    """
    if size == view.virtual_size:
        return
    update = getattr(view, "_scroll_update", None)
    if update is None or not view.is_mounted or not view.size:
        view.virtual_size = size  # not on screen yet: Textual's own way
        return
    shown = (view.show_vertical_scrollbar, view.show_horizontal_scrollbar)
    view.set_reactive(type(view).virtual_size, size)
    update(size)
    if (view.show_vertical_scrollbar, view.show_horizontal_scrollbar) != shown:
        view.refresh(layout=True)


def paint_now(widget) -> None:
    """Paint the screen's pending changes at once, not at Textual's next frame tick.

    Textual paints a changed screen on a timer of TEXTUAL_FPS ticks a second, so a key's repaint waited up to a
    tick (8.3 ms at the app's 120) for nothing; a key is a user waiting. Textual has no public call for this:
    where its screen update (`Screen._on_timer_update`, Textual 1.x-8.x) is missing or fails, the next tick
    paints as before and this is not tried again.
    """
    global _PAINT_NOW
    screen = getattr(widget, "screen", None) if widget.is_attached else None
    if not _PAINT_NOW or screen is None or not screen.is_current:
        return
    try:
        _screen_update(screen)
    except Exception as err:  # noqa: BLE001 - a private call that changed: fall back to the timer, keep running
        _PAINT_NOW = False
        widget.log.warning(f"immediate repaint unavailable ({type(err).__name__}: {err}); painting on the timer")


_PAINT_NOW = True


def _screen_update(screen) -> None:
    screen._on_timer_update()  # what Textual's frame timer calls: layout if asked, then paint what is dirty
