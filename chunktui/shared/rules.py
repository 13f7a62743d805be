"""Rules that act on what the model is thinking: the one rule language, parsed and checked without torch.

A rule is `when CONDITION -> ACTION`:

    when cheese -> stop
    when cheese@10-20>=3 -> suppress cheese for 8
    when (coffee or tea) for 2 and not cake -> alert
    guard: when cheese -> suppress cheese@2-9 x0.5          (an inline rule may start with its name)

A condition is a chunk label (quote it, "ice cream", when it is not a plain word), optionally

- `@LAYERS`: only these layers count (`@10-20`, `@4`, `@2,5,8-9`, `@all`); by default every layer where
  the label has a chunk;
- `>=K`: at least K of those layers match the token (default 1);
- `for N`: held on N consecutive tokens (also after a parenthesised condition).

Conditions combine with `and`, `or`, `not` and parentheses (`not` binds tightest, then `for`, then `and`,
then `or`: `not cheese for 3` is three tokens in a row without cheese; `not (cheese for 3)` says otherwise).
"A layer matches" means that a chunk of the label at that layer hits the token's state at that layer
(the per-layer chunk hits every view shows), whatever a token-level summary of them may say.

An action is `alert` (mark the token), `stop` (end the generation, recording the rule), or an
intervention with the same modes, strengths, layers and defaults as `chunktui perturb`:
`MODE LABEL[,LABEL][@LAYERS] [xSTRENGTH] [now] [for N | while]` (`suppress cheese`, `graft coffee@2-9 x0.1`).
An intervention fired at token t edits the states from token t+1 on (the token t was already read):
for N tokens (`for N`), or, by default (`while`), on each token that follows one where the condition held.
With `now` it also edits token t itself, in the forward pass that computed the condition, so the token
sampled next already comes from the edited states: every layer the condition reads must then lie below the
first layer the action edits (`when cheese@10-19 -> suppress cheese@20-29 now`), and `for N` adds the N
tokens after t (without it, only t is edited).

Rules come inline or from a TOML file of `[[rule]]` tables with `name`, `when` and `then`.
Every mistake is a `RuleError` (a `ChunkError`) that names the rule and, for syntax, the column.
`check_rules` checks the labels and layers against a dictionary once it is known.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

from chunktui.shared.errors import ChunkError
from chunktui.shared.settings import DEFAULT_LAYERS, DEFAULT_STRENGTH, MODES

MAX_RUN = 100_000  # `for N`: longer than any context
MAX_LAYER = 100_000
KEYWORDS = ("when", "and", "or", "not", "for", "while", "now", "all", "alert", "stop")


class RuleError(ChunkError):
    """A rule that cannot be used; the message names the rule and says what to change."""


class RuleSyntaxError(RuleError):
    """A rule that does not parse; `column` is 1-based in the text that was parsed."""

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.column = column


# --------------------------------------------------------------------------- the parsed form


@dataclass(frozen=True)
class Term:
    """`label@layers>=at_least`: true when at least `at_least` of the layers have a hitting chunk of `label`."""

    label: str
    layers: tuple[int, ...] | None = None  # None: every layer where the label has a chunk
    at_least: int = 1

    def __str__(self) -> str:
        label = self.label if _PLAIN.fullmatch(self.label) and self.label not in KEYWORDS else _quote(self.label)
        out = label + (f"@{format_layers(self.layers)}" if self.layers is not None else "")
        return out + (f">={self.at_least}" if self.at_least != 1 else "")


@dataclass(frozen=True)
class Not:
    node: "Condition"

    def __str__(self) -> str:
        return f"not {_wrap(self.node, (And, Or, Run))}"


@dataclass(frozen=True)
class And:
    nodes: tuple["Condition", ...]

    def __str__(self) -> str:
        return " and ".join(_wrap(n, (Or,)) for n in self.nodes)


@dataclass(frozen=True)
class Or:
    nodes: tuple["Condition", ...]

    def __str__(self) -> str:
        return " or ".join(str(n) for n in self.nodes)


@dataclass(frozen=True)
class Run:
    """`node for n`: the node held on each of the last n tokens (this one included)."""

    node: "Condition"
    n: int

    def __str__(self) -> str:
        return f"{_wrap(self.node, (And, Or, Not, Run))} for {self.n}"


Condition = Union[Term, Not, And, Or, Run]


def _wrap(node, kinds) -> str:
    return f"({node})" if isinstance(node, kinds) else str(node)


def _quote(label: str) -> str:
    return '"' + label.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class Action:
    """alert, stop, or an intervention (`mode` on `labels` at `layers`, for `duration` tokens or while)."""

    kind: str  # "alert" | "stop" | "intervene"
    mode: str | None = None
    labels: tuple[str, ...] = ()
    layers: str = DEFAULT_LAYERS  # a layer spec, as `perturb --layers` takes it
    strength: float | None = None  # None: the mode's default
    duration: int | None = None  # tokens; None: while the condition holds (with `now`: no token after)
    now: bool = False  # also the token where the condition held, within the same forward pass

    @property
    def effective_strength(self) -> float | None:
        if self.kind != "intervene":
            return None
        return self.strength if self.strength is not None else DEFAULT_STRENGTH[self.mode]

    def __str__(self) -> str:
        if self.kind != "intervene":
            return self.kind
        names = ",".join(x if _PLAIN.fullmatch(x) and x not in KEYWORDS else _quote(x) for x in self.labels)
        out = f"{self.mode} {names}@{self.layers} x{self.effective_strength:g}"
        if self.now:
            return out + " now" + (f" for {self.duration}" if self.duration is not None else "")
        return out + (f" for {self.duration}" if self.duration is not None else " while")


@dataclass(frozen=True)
class Rule:
    name: str
    condition: Condition
    action: Action
    source: str = ""  # the text it was parsed from

    @property
    def when(self) -> str:
        return str(self.condition)

    @property
    def then(self) -> str:
        return str(self.action)

    def __str__(self) -> str:
        return f"when {self.condition} -> {self.action}"

    def terms(self) -> list[Term]:
        return list(iter_terms(self.condition))

    def positive_labels(self) -> list[str]:
        """Labels the condition asks to be present (outside any `not`): what an alert is scored against."""
        out: list[str] = []

        def walk(node, negated: bool) -> None:
            if isinstance(node, Term):
                if not negated and node.label not in out:
                    out.append(node.label)
            elif isinstance(node, Not):
                walk(node.node, not negated)
            elif isinstance(node, Run):
                walk(node.node, negated)
            else:
                for n in node.nodes:
                    walk(n, negated)

        walk(self.condition, False)
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "when": self.when, "then": self.then}


def iter_terms(node: Condition) -> Iterable[Term]:
    if isinstance(node, Term):
        yield node
    elif isinstance(node, (Not, Run)):
        yield from iter_terms(node.node)
    else:
        for n in node.nodes:
            yield from iter_terms(n)


def format_layers(layers: Sequence[int]) -> str:
    """(2, 3, 4, 9) -> '2-4,9'."""
    layers = sorted(set(layers))
    parts, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts)


# --------------------------------------------------------------------------- the scanner

_PLAIN = re.compile(r"[^\W\d][\w'.]*(?:-(?!>)[\w'.]+)*")
_NUMBER = re.compile(r"\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?")
_STRENGTH_WORD = re.compile(r"[xX](\d+(?:\.\d*)?|\.\d+)")


@dataclass
class _Tok:
    kind: str  # word | quoted | number | op | end
    text: str
    col: int  # 1-based
    value: object = None


def _scan(text: str, offset: int = 0) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        col = offset + i + 1
        if ch.isspace():
            i += 1
            continue
        if text.startswith("->", i) or ch == "→":
            toks.append(_Tok("op", "->", col))
            i += 1 if ch == "→" else 2
            continue
        if text.startswith(">=", i) or ch == "≥":
            toks.append(_Tok("op", ">=", col))
            i += 1 if ch == "≥" else 2
            continue
        if ch in "@(),-*×":
            toks.append(_Tok("op", "x" if ch in "*×" else ch, col))
            i += 1
            continue
        if ch in "\"'":
            j, out = i + 1, []
            while j < n and text[j] != ch:
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                out.append(text[j])
                j += 1
            if j >= n:
                raise RuleSyntaxError(f"column {col}: the quoted label is not closed (add {ch}).", col)
            label = "".join(out)
            if not label.strip():
                raise RuleSyntaxError(f"column {col}: an empty quoted label.", col)
            toks.append(_Tok("quoted", text[i:j + 1], col, label))
            i = j + 1
            continue
        m = _NUMBER.match(text, i)
        if m:
            toks.append(_Tok("number", m.group(), col, m.group()))
            i = m.end()
            continue
        m = _PLAIN.match(text, i)
        if m:
            toks.append(_Tok("word", m.group(), col, m.group()))
            i = m.end()
            continue
        if text.startswith(">", i) or text.startswith("=", i) or text.startswith("<", i):
            raise RuleSyntaxError(f"column {col}: only '>=' compares (a minimum count of layers, as in cheese>=3).",
                                  col)
        raise RuleSyntaxError(f"column {col}: unexpected character {ch!r}.", col)
    toks.append(_Tok("end", "", offset + n + 1))
    return toks


def _describe(tok: _Tok) -> str:
    return "the end of the rule" if tok.kind == "end" else f"'{tok.text}'"


class _Parser:
    def __init__(self, text: str, offset: int = 0) -> None:
        self.toks = _scan(text, offset)
        self.i = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, what: str, tok: _Tok | None = None) -> RuleSyntaxError:
        tok = tok or self.tok
        return RuleSyntaxError(f"column {tok.col}: {what}, found {_describe(tok)}.", tok.col)

    def is_word(self, *words: str) -> bool:
        return self.tok.kind == "word" and self.tok.text.lower() in words

    def is_op(self, op: str) -> bool:
        return self.tok.kind == "op" and self.tok.text == op

    def expect_end(self, what: str) -> None:
        if self.tok.kind != "end":
            raise self.fail(what)

    # condition := and ('or' and)*
    def condition(self) -> Condition:
        nodes = [self.conjunction()]
        while self.is_word("or"):
            self.take()
            nodes.append(self.conjunction())
        return nodes[0] if len(nodes) == 1 else Or(tuple(nodes))

    def conjunction(self) -> Condition:
        nodes = [self.unary()]
        while self.is_word("and"):
            self.take()
            nodes.append(self.unary())
        return nodes[0] if len(nodes) == 1 else And(tuple(nodes))

    def unary(self) -> Condition:
        node = self.negation()
        if self.is_word("for"):
            self.take()
            node = Run(node, self.integer("a number of tokens after 'for'", 1, MAX_RUN))
        return node

    def negation(self) -> Condition:
        if self.is_word("not"):
            self.take()
            return Not(self.negation())
        return self.primary()

    def primary(self) -> Condition:
        if self.is_op("("):
            opening = self.take()
            node = self.condition()
            if not self.is_op(")"):
                raise self.fail(f"expected ')' to close the '(' at column {opening.col}")
            self.take()
            return node
        label = self.label("a chunk label (or 'not', or '(')")
        layers = None
        if self.is_op("@"):
            self.take()
            layers = self.layers()
        at_least = 1
        if self.is_op(">="):
            self.take()
            at_least = self.integer("a number of layers after '>='", 1, MAX_LAYER)
        return Term(label, layers, at_least)

    def label(self, what: str) -> str:
        tok = self.tok
        if tok.kind == "quoted":
            self.take()
            return str(tok.value)
        if tok.kind == "word" and tok.text.lower() not in KEYWORDS:
            self.take()
            return tok.text
        if tok.kind == "word":
            raise self.fail(f"expected {what}; '{tok.text}' is a keyword (quote a label of that name)")
        raise self.fail(f"expected {what}")

    def integer(self, what: str, lo: int, hi: int) -> int:
        tok = self.tok
        if tok.kind != "number" or not tok.text.isdigit():
            raise self.fail(f"expected {what} (a whole number)")
        value = int(tok.text)
        if not lo <= value <= hi:
            raise RuleSyntaxError(f"column {tok.col}: {what} must be from {lo} to {hi}, not {value}.", tok.col)
        self.take()
        return value

    def layers(self) -> tuple[int, ...]:
        if self.is_word("all"):
            self.take()
            return None  # type: ignore[return-value]  (every layer: the same as no @)
        out: list[int] = []
        while True:
            start = self.tok
            lo = self.integer("a layer (as in @10, @10-20 or @2,5)", 0, MAX_LAYER)
            hi = lo
            if self.is_op("-"):
                self.take()
                hi = self.integer("the last layer of the range", 0, MAX_LAYER)
                if hi < lo:
                    raise RuleSyntaxError(f"column {start.col}: the layer range {lo}-{hi} runs backwards; "
                                          f"write {hi}-{lo}.", start.col)
            out.extend(range(lo, hi + 1))
            if self.is_op(",") and self.toks[self.i + 1].kind == "number":
                self.take()
                continue
            return tuple(sorted(set(out)))

    # action := alert | stop | MODE labels [@layers] [x strength] [now] [for N | while]
    def action(self) -> Action:
        tok = self.tok
        if tok.kind != "word":
            raise self.fail(f"expected an action: alert, stop or an intervention ({', '.join(MODES)})")
        word = tok.text.lower()
        if word in ("alert", "stop"):
            self.take()
            self.expect_end(f"expected nothing after '{word}'")
            return Action(word)
        if word not in MODES:
            near = difflib.get_close_matches(word, ("alert", "stop") + MODES, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise RuleSyntaxError(f"column {tok.col}: unknown action '{tok.text}'{hint}: use alert, stop or one "
                                  f"of the modes {', '.join(MODES)}.", tok.col)
        self.take()
        labels = [self.label(f"the chunk label to {word} (as in {word} cheese)")]
        while self.is_op(","):
            self.take()
            labels.append(self.label("another chunk label after ','"))
        layers = DEFAULT_LAYERS
        if self.is_op("@"):
            self.take()
            if self.is_word("all"):
                self.take()
                layers = "all"
            else:
                layers = format_layers(self.layers())
        strength = None
        if self.tok.kind == "word" and _STRENGTH_WORD.fullmatch(self.tok.text):
            strength = self.strength(self.tok, _STRENGTH_WORD.fullmatch(self.tok.text).group(1), word)
            self.take()
        elif (self.is_op("x") or self.is_word("x")) and self.toks[self.i + 1].kind == "number":
            at = self.take()
            strength = self.strength(at, self.take().text, word)
        now = False
        if self.is_word("now"):
            self.take()
            now = True
        duration = None
        if self.is_word("for"):
            self.take()
            duration = self.integer("a number of tokens after 'for'", 1, MAX_RUN)
        elif self.is_word("while"):
            if now:
                raise RuleSyntaxError(f"column {self.tok.col}: 'now' edits the token where the condition holds; "
                                      "'while' cannot follow it (add 'for N' to edit the N tokens after it too).",
                                      self.tok.col)
            self.take()
        self.expect_end("expected the end of the rule (an intervention takes @LAYERS, xSTRENGTH, 'now', "
                        "then 'for N' or 'while')")
        return Action("intervene", word, tuple(labels), layers, strength, duration, now)

    def strength(self, tok: _Tok, text: str, mode: str) -> float:
        from chunktui.shared.validate import strength as check

        try:
            return check(text, mode, "the strength")
        except ChunkError as err:
            raise RuleSyntaxError(f"column {tok.col}: {err}", tok.col) from None


# --------------------------------------------------------------------------- parsing


_NAMED = re.compile(r"\s*([^:\s][^:]*?)\s*:\s*(?=when\b)", re.IGNORECASE)


def _context(rule: str, err: RuleSyntaxError, prefix: str) -> RuleSyntaxError:
    out = RuleSyntaxError(f"{prefix}: {err}", err.column)
    return out


def parse_condition(text: str, name: str = "rule") -> Condition:
    """A condition alone (TOML `when`); the 'when' keyword is optional."""
    if not isinstance(text, str) or not text.strip():
        raise RuleError(f"Rule {name!r}: the condition is empty (as in `when = \"cheese@10-20>=3\"`).")
    try:
        p = _Parser(text)
        if p.is_word("when"):
            p.take()
        node = p.condition()
        if p.is_op("->"):
            raise p.fail("the condition ends here; put the action in `then`")
        p.expect_end("expected 'and', 'or', 'for N' or the end of the condition")
        return node
    except RuleSyntaxError as err:
        raise _context(text, err, f"Rule {name!r}, `when = {text!r}`") from None


def parse_action(text: str, name: str = "rule") -> Action:
    """An action alone (TOML `then`)."""
    if not isinstance(text, str) or not text.strip():
        raise RuleError(f"Rule {name!r}: the action is empty: use alert, stop or an intervention "
                        "(as in `then = \"suppress cheese for 8\"`).")
    try:
        return _Parser(text).action()
    except RuleSyntaxError as err:
        raise _context(text, err, f"Rule {name!r}, `then = {text!r}`") from None


def parse_rule(text: str, name: str | None = None) -> Rule:
    """One inline rule, `[NAME:] when CONDITION -> ACTION`. Columns in errors count from 1 in `text`."""
    if not isinstance(text, str) or not text.strip():
        raise RuleError("The rule is empty: write `when LABEL -> ACTION`, as in `when cheese -> stop`.")
    offset = 0
    m = _NAMED.match(text)
    if m and name is None:
        name, offset = m.group(1), m.end()
    name = name or text.strip()
    try:
        p = _Parser(text[offset:], offset)
        if not p.is_word("when"):
            raise p.fail("a rule starts with 'when' (as in `when cheese -> stop`)")
        p.take()
        condition = p.condition()
        if not p.is_op("->"):
            raise p.fail("expected 'and', 'or', 'for N' or '->' before the action")
        p.take()
        action = p.action()
    except RuleSyntaxError as err:
        raise _context(text, err, f"Rule {text.strip()!r}") from None
    return Rule(name=name, condition=condition, action=action, source=text.strip())


def load_rules_toml(text: str, source: str = "the rules file") -> list[Rule]:
    """`[[rule]]` tables with `name`, `when` and `then`."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RuleError(f"{source} is not valid TOML: {err}.") from None
    tables = data.get("rule")
    unknown = sorted(set(data) - {"rule"})
    if unknown:
        raise RuleError(f"{source}: unknown top-level key {unknown[0]!r}; write each rule as a [[rule]] table "
                        "with name, when and then.")
    if tables is None:
        raise RuleError(f"{source} has no rules: write [[rule]] tables with name, when and then.")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RuleError(f"{source}: 'rule' must be an array of tables ([[rule]]), each with name, when and then.")
    rules = []
    for i, table in enumerate(tables, 1):
        extra = sorted(set(table) - {"name", "when", "then"})
        if extra:
            raise RuleError(f"{source}, rule {i}: unknown key {extra[0]!r} (a rule has name, when and then).")
        name = table.get("name", f"rule {i}")
        if not isinstance(name, str) or not name.strip():
            raise RuleError(f"{source}, rule {i}: 'name' must be a non-empty string.")
        for key in ("when", "then"):
            if key not in table:
                raise RuleError(f"{source}, rule {name!r}: missing '{key}'.")
            if not isinstance(table[key], str):
                raise RuleError(f"{source}, rule {name!r}: '{key}' must be a string.")
        condition = parse_condition(table["when"], name)
        action = parse_action(table["then"], name)
        rules.append(Rule(name=name.strip(), condition=condition, action=action,
                          source=f"when {table['when'].strip()} -> {table['then'].strip()}"))
    return check_names(rules)


def read_rules_file(path: str | Path) -> list[Rule]:
    """A TOML file of [[rule]] tables (or, for a .txt / other file, one inline rule per line; # comments)."""
    path = Path(path)
    if not path.is_file():
        raise RuleError(f"Rules file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RuleError(f"{path} is not UTF-8 text.") from None
    if path.suffix.lower() == ".toml":
        return load_rules_toml(text, str(path))
    return parse_rules([line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")])


def parse_rules(texts: Sequence[str]) -> list[Rule]:
    return check_names([parse_rule(t) for t in texts])


def check_names(rules: list[Rule]) -> list[Rule]:
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise RuleError(f"Two rules are named {rule.name!r}; give each rule its own name.")
        seen.add(rule.name)
    return rules


def gather_rules(inline: Sequence[str] = (), files: Sequence[str | Path] = ()) -> list[Rule]:
    """Inline rules (`--rule`, repeatable) and rule files (`--rules`), in that order, names unique."""
    rules = [parse_rule(t) for t in inline]
    for f in files:
        rules.extend(read_rules_file(f))
    return check_names(rules)


# --------------------------------------------------------------------------- against a dictionary


@dataclass
class Vocabulary:
    """What a dictionary offers rules: each label's layers, and the number of states (L + 1)."""

    label_layers: dict[str, set[int]]
    n_states: int
    name: str = "the dictionary"

    @staticmethod
    def from_columns(labels: Sequence[str], layers: Sequence[int], n_states: int, name: str = "the dictionary"):
        out: dict[str, set[int]] = {}
        for label, layer in zip(labels, layers):
            out.setdefault(label, set()).add(int(layer))
        return Vocabulary(out, int(n_states), name)


def _unknown(label: str, vocab: Vocabulary, rule: Rule) -> RuleError:
    near = difflib.get_close_matches(label, sorted(vocab.label_layers), n=3, cutoff=0.5)
    hint = f"; nearest: {', '.join(near)}" if near else \
        f"; labels include {', '.join(sorted(vocab.label_layers)[:8])}" if vocab.label_layers else \
        "; it has no chunks at all"
    return RuleError(f"Rule {rule.name!r}: no chunk labelled {label!r} in {vocab.name}{hint}.")


def check_rule(rule: Rule, vocab: Vocabulary) -> None:
    """Labels exist, layers are in range and the label has chunks there, >=K is reachable."""
    top = vocab.n_states - 1
    for term in rule.terms():
        if term.label not in vocab.label_layers:
            raise _unknown(term.label, vocab, rule)
        have = vocab.label_layers[term.label]
        if term.layers is not None:
            out = [x for x in term.layers if x > top]
            if out:
                raise RuleError(f"Rule {rule.name!r}: layer {out[0]} is out of range: the model has layers "
                                f"0-{top}.")
            have = have & set(term.layers)
            if not have:
                raise RuleError(f"Rule {rule.name!r}: {term.label!r} has no chunk at layers "
                                f"{format_layers(term.layers)} (it has chunks at {format_layers(vocab.label_layers[term.label])}).")
        if term.at_least > len(have):
            raise RuleError(f"Rule {rule.name!r}: '{term}' can never hold: {term.label!r} has chunks at only "
                            f"{len(have)} of those layers.")
    action = rule.action
    if action.kind == "intervene":
        blocks = vocab.n_states - 1  # edits go into the stream entering blocks 0..L-1
        if action.layers == "all":
            layers = set(range(blocks))
        else:
            layers = set(_expand(action.layers))
            out = sorted(x for x in layers if x >= blocks)
            if out:
                raise RuleError(f"Rule {rule.name!r}: {action.mode} at layer {out[0]} is out of range: "
                                f"interventions edit the stream entering blocks 0-{blocks - 1}.")
        for label in action.labels:
            if label not in vocab.label_layers:
                raise _unknown(label, vocab, rule)
            if not vocab.label_layers[label] & layers:
                raise RuleError(f"Rule {rule.name!r}: {label!r} has no chunk at layers {action.layers} to "
                                f"{action.mode}.")
        if action.now:  # the layers it really edits: where its labels have chunks
            check_now(rule, vocab, {x for label in action.labels for x in vocab.label_layers[label] & layers})


def condition_layers(rule: Rule, vocab: Vocabulary) -> dict[Term, list[int]]:
    """Each term of the condition -> the layers it reads (its @LAYERS where the label has chunks, or all of them)."""
    out = {}
    for term in rule.terms():
        have = vocab.label_layers.get(term.label, set())
        out[term] = sorted(have if term.layers is None else have & set(term.layers))
    return out


def check_now(rule: Rule, vocab: Vocabulary, edited: set[int]) -> None:
    """`now` acts inside the forward pass that computes the condition: every condition layer below every edit."""

    def runs(node) -> bool:
        if isinstance(node, Run):
            return True
        if isinstance(node, Not):
            return runs(node.node)
        if isinstance(node, (And, Or)):
            return any(runs(n) for n in node.nodes)
        return False

    if runs(rule.condition):
        raise RuleError(f"Rule {rule.name!r}: a 'now' rule decides within one forward pass, so its condition cannot "
                        "count tokens ('for N' in the condition); drop 'now', or the run length.")
    first = min(edited)
    for term, layers in condition_layers(rule, vocab).items():
        above = [x for x in layers if x >= first]
        if above:
            below = [x for x in layers if x < first]
            fix = (f"restrict the condition (e.g. {Term(term.label, tuple(below), term.at_least)})"
                   if len(below) >= term.at_least else
                   f"edit only above layer {layers[-1] if term.layers is None else max(term.layers)}")
            raise RuleError(f"Rule {rule.name!r}: 'now' edits the token in the forward pass that computes the "
                            f"condition, so every layer the condition reads must lie below the first layer the "
                            f"action edits ({first}); '{term}' reads layer {above[0]}. To act now, {fix}; or drop "
                            "'now'.")


def _expand(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def action_layers(action: Action, n_states: int) -> list[int]:
    """The block layers an intervention edits (its spec resolved; 'all' = blocks 0..L-1)."""
    return list(range(n_states - 1)) if action.layers == "all" else _expand(action.layers)


def check_rules(rules: Sequence[Rule], vocab: Vocabulary) -> list[Rule]:
    for rule in rules:
        check_rule(rule, vocab)
    return list(rules)


# --------------------------------------------------------------------------- firings (plain values)


@dataclass
class Firing:
    """One rule firing: the rule, the token (its index in the sequence), the layers that matched, the action."""

    rule: str
    token: int
    layers: list[int]
    action: str  # "alert", "stop", or the intervention as written ("suppress cheese@2-9 x0.5 for 8")
    text: str = ""  # the token's text
    extra: dict = field(default_factory=dict)  # bulk runs: which prompt / text, its seed

    def to_json(self) -> dict:
        out = {"rule": self.rule, "token": self.token, "layers": list(self.layers), "action": self.action,
               "text": self.text}
        out.update(self.extra)
        return out

    @staticmethod
    def from_json(data: dict) -> "Firing":
        known = {"rule", "token", "layers", "action", "text"}
        return Firing(rule=str(data["rule"]), token=int(data["token"]), layers=[int(x) for x in data["layers"]],
                      action=str(data["action"]), text=str(data.get("text", "")),
                      extra={k: v for k, v in data.items() if k not in known})


def rule_lines(text: str) -> list[str]:
    """The rules in a block of text: one per line; blank lines and lines starting with # are skipped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip() and not line.lstrip().startswith("#")]


def check_rule_texts(texts: Sequence[str], vocab: Vocabulary | None = None) -> list[Rule]:
    """Parse rule texts and, when the dictionary is known, check them against it (what the app does as you type)."""
    rules = parse_rules(list(texts))
    return check_rules(rules, vocab) if vocab is not None else rules
