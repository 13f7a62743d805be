"""The status bar: one line (model, dictionary, what is running, speed, memory), redrawn without a layout pass."""

from __future__ import annotations

import os

from textual.widgets import Static

from chunktui.tui.plain import plain


def _gib(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_summary(rows: list[dict]) -> str:
    """The status bar's memory: per accelerator weights + KV cache + kept values and what is free; else the host."""
    gpus = [r for r in rows if r["device"] not in ("cpu", "disk")]
    shown = gpus or [r for r in rows if r["device"] == "cpu"]
    parts = []
    for r in shown:
        text = f"{r['device']} {_gib(r['used'])} (w {_gib(r['weights'])}, kv {_gib(r['kv_cache'])})"
        if r.get("free") is not None and r["device"] != "cpu":
            text += f", {_gib(r['free'])} free"
        parts.append(text)
    return " · ".join(parts)


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class StatusBar(Static):
    """The app's bottom line. `show` takes the app's state; the widget never asks the engine anything."""

    def show(self, app) -> None:
        parts = []
        if app.model is None:
            parts.append("loading model…" if app._busy == "load" else "no model")
        else:
            parts.append(f"{app.model.card['name']} on {app.model.card['device']}")
        parts.append(f"dict {app.dictionary.name} ({len(app.dictionary.chunks)} chunks)" if app.dictionary
                     else "no dictionary")
        rules = getattr(app, "rule_settings", None)
        if rules is not None and rules.on and rules.texts:
            parts.append(f"rules on ({len(rules.texts)})")
        if getattr(app, "rule_stop", None):
            parts.append(f"stopped by rule {app.rule_stop}")
        if app._busy == "load":
            parts.append(getattr(app, "_progress", "starting the engine"))
        elif app._busy == "perturb" and getattr(app, "_perturb_progress", None):
            parts.append(f"{app._perturb_progress} (Esc stops)")  # which arm, batch or prompt
        elif app._busy:
            parts.append(f"{app._busy}… (Esc stops)")
        if app.show_timing:
            if app.tokens_per_second is not None:
                parts.append(f"{app.tokens_per_second:.1f} tok/s")
            if app.memory is not None and app.model is not None:
                parts.append(memory_summary(app.memory.rows))
            rss = _rss_mb()
            if rss is not None:
                parts.append(f"ui {rss:.0f} MB")
        else:
            parts.append("tok/s —")
        text = " · ".join(parts)
        if text != getattr(self, "_shown", None):  # repainted only when it says something new
            self._shown = text
            self.update(plain(text, one=True), layout=False)  # one line: no layout pass
