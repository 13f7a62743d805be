"""`--rule` / `--rules` for the commands that run rules (scan, perturb, monitor), and printing firings."""

from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from chunktui.cli.common import console

RULE_HELP = ("a rule, `when CONDITION -> ACTION` (repeatable), e.g. \"when cheese@10-20>=3 -> suppress cheese for 8\"; "
             "conditions: LABEL[@LAYERS][>=K][ for N], and/or/not; actions: alert, stop, or MODE LABEL[@LAYERS] "
             "[xSTRENGTH] [now] [for N | while] (docs/rules.md)")


def rule_options(func):
    from chunktui.shared.settings import RULES_ON_PROMPT, RULES_ON_PROMPT_CHOICES

    func = click.option("--on-prompt", "on_prompt", default=RULES_ON_PROMPT, show_default=True,
                        type=click.Choice(list(RULES_ON_PROMPT_CHOICES)),
                        help="what interventions do with the prompt's matches: off (rules watch generated tokens "
                             "only), watch (a guard that holds on the prompt is on from the first answer token), "
                             "act (and the prompt is read again with those edits, so the first answer token is "
                             "guarded too); alerts and stops always watch generated tokens only")(func)
    func = click.option("--rules", "rule_files", multiple=True, type=click.Path(dir_okay=False),
                        help="a TOML file of [[rule]] tables with name, when and then (repeatable)")(func)
    func = click.option("--rule", "rule_texts", multiple=True, help=RULE_HELP)(func)
    return func


def early_rules(rule_texts, rule_files, dictionary=None) -> list:
    """Parse the rules and check their labels (and layers, where the dictionary names its model's depth)
    before any model loads. Raises a RuleError (exit 2) naming the rule."""
    from chunktui.shared.rules import Vocabulary, check_rules, gather_rules

    rules = gather_rules(list(rule_texts or ()), list(rule_files or ()))
    if rules and dictionary is not None:
        n_layers = (dictionary.model or {}).get("n_layers")
        layers = [int(c.layer) for c in dictionary.chunks]
        n_states = int(n_layers) + 1 if n_layers else max(layers, default=0) + 1
        name = dictionary.path.name if getattr(dictionary, "path", None) else "the dictionary"
        check_rules(rules, Vocabulary.from_columns([c.label for c in dictionary.chunks], layers, n_states, name))
    return rules


def print_firings(firings: list[dict], title: str = "rule firings", limit: int = 50) -> None:
    if not firings:
        console.print("[dim]no rule fired[/]")
        return
    table = Table(title=f"{title} ({len(firings)})")
    for col in ("rule", "token", "text", "layers", "action"):
        table.add_column(col, justify="right" if col == "token" else "left")
    from chunktui.shared.rules import format_layers

    for f in firings[:limit]:
        table.add_row(escape(str(f["rule"])), str(f["token"]), escape(repr(f.get("text", ""))),
                      format_layers(f["layers"]) or "-", escape(str(f["action"])))
    console.print(table)
    if len(firings) > limit:
        console.print(f"[dim]... and {len(firings) - limit} more (all of them in --json)[/]")
