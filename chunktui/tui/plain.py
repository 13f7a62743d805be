"""User and model text shown as plain text in the app: never parsed as markup, no control sequence raw.

Every string the app shows that came from a user, a file or a model (file
names, labels, prompts, model output, error messages) goes through `plain`
(a rich Text, which Textual never parses as markup) or `safe` (the string,
for places that take one). Control characters become visible symbols
(chunktui.shared.safe.visible), so an ESC in a label cannot clear the screen
or write the clipboard.
"""

from __future__ import annotations

from rich.text import Text

from chunktui.shared.safe import one_line, visible


def safe(text, one: bool = False) -> str:
    """The string as it may be shown: control characters visible; `one` also turns newlines into ␊."""
    return one_line(text) if one else visible(text)


def plain(text, style: str = "", one: bool = False) -> Text:
    """A Text that shows `text` literally ('[/bad]' stays '[/bad]')."""
    return Text(safe(text, one), style=style)
