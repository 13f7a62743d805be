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
