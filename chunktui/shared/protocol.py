"""The typed protocol between the app (UI process) and its engine process.

The app never imports torch: the model, the dictionary and every tensor live
in a spawned child (`chunktui.server`). The two talk over one
`multiprocessing` pipe with the small dataclasses below (plain Python values
only: ints, floats, strings, lists, so each message pickles in microseconds).

Requests go UI -> engine; events come back. Long requests (load, generate,
scan, compare) run one at a time in the engine's work thread and answer with
progress/token events and a final event; short ones (token detail, chunk
scores, cancel) are answered at once, even while a generation runs.

Per token the engine sends only what the UI draws (`session.TokenStep`): id
and text, log p, top candidates, per layer the strongest chunk and its score,
the hit columns (sparse) and the norm profile. Full hidden states and the
(T, C) deviation/score matrices stay in the engine; the UI asks for a token's
detail, or one chunk's scores, when it needs them.

No torch and no UI imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chunktui.shared.settings import DEFAULT_SAMPLES, Sampling  # noqa: F401 (part of the protocol)
from chunktui.shared.session import ChunkColumns, TokenStep


# --------------------------------------------------------------------------- requests (UI -> engine)


@dataclass
class Load:
    spec: str
    device: str = "auto"
    dtype: str = "auto"
    # placement (engine.models.load_model): accelerate's device map, per-device caps "0=70GiB,cpu=200GiB",
    # a folder for weights that fit nowhere else, and never downloading
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: str | None = None
    offline: bool = False
    dict_path: str | None = None  # select this dictionary when it fits
    candidates: list[str] = field(default_factory=list)  # dictionary files to offer in the picker


@dataclass
class ListDictionaries:
    candidates: list[str]
    select: str | None = None


@dataclass
class UseDictionary:
    path: str


@dataclass
class Generate:
    trace_id: int
    prompt: str
    sampling: Sampling
    chat: bool = True
    rules: list[str] = field(default_factory=list)  # rule texts (shared.rules), checked again by the engine


@dataclass
class Scan:
    trace_id: int
    title: str
    text: str


@dataclass
class Compare:
    names: list[str]
    mode: str
    strength: float | None  # None: the mode's default (shared.settings)
    layers: str
    positions: str
    prompt: str
    sampling: Sampling
    chat: bool = True
    samples: int = DEFAULT_SAMPLES  # continuations per arm (seeds seed..seed+samples-1)
    sweep: list[float] | None = None  # several strengths in one run (replaces strength); None: one strength
    control: str | None = None  # a random control intervention: "subpopulation" or "direction" (shared.settings)
    control_seed: int = 0
    site: str = "residual"  # residual | attention


@dataclass
class TokenDetail:
    trace_id: int
    index: int
    layer: int | None
    max_rows: int = 12  # at one layer; the all-layers view lists every layer
    label: str | None = None  # the concept the token shows (all-layers view: its chunk at every layer is listed)


@dataclass
class ChunkScores:
    trace_id: int
    column: int


@dataclass
class TopContexts:
    """Where a chunk fires: the best contexts of a corpus for a chunk id (label@layer) or a label (all its layers).

    Answered by TopProgress events, then TopFound (or Failed with task "top"). The engine keeps the tables of
    every chunk and label of the dictionary for the last corpus, so a second chunk is answered at once."""

    request_id: int
    name: str
    corpus: str | None = None  # a UTF-8 text file; None: the sample held-out text (sample_data/heldout.txt)
    k: int = 10
    chars: int = 60  # characters of context either side of the token


@dataclass
class Cancel:
    """Stop the running generation or comparison (takes effect within one token)."""


@dataclass
class BenchStream:
    """Engine-alone streaming speed: generate with recording and matching, send nothing per token."""

    prompt: str
    sampling: Sampling
    chat: bool = True


@dataclass
class Shutdown:
    pass


# --------------------------------------------------------------------------- events (engine -> UI)


@dataclass
class Ready:
    """The engine process is up and torch is imported."""

    pid: int
    threads: int
    catalog: list[str]  # model specs to suggest


@dataclass
class Progress:
    stage: str
    fraction: float | None
    text: str
    task: str | None = None  # None: loading (the Model pane); "perturb": a comparison's arms (the Perturb pane)


@dataclass
class Loaded:
    card: dict
    kind: str  # "lm" or "rnn"
    n_states: int
    can_perturb: bool
    suggested_prompt: str | None = None
    suggested_temperature: float | None = None


@dataclass
class ChunkInfo:
    """One chunk as the Chunks pane lists it (no tensors)."""

    id: str
    label: str
    layer: int
    kind: str
    size: int
    threshold: float
    tp_rate: float | None
    fp_rate: float | None
    card: str | None = None  # a one-line summary of a discovered chunk's card
    # held-out figures, when the dictionary stores them (`chunktui evaluate --store`: chunk.evaluation["heldout"])
    heldout_tp: float | None = None
    heldout_fp: float | None = None
    heldout_corpus: str | None = None


@dataclass
class DictionaryEntry:
    path: str
    problem: str | None  # why it cannot be used with this model, None if it can
    chunks: int = 0
    concepts: int = 0


@dataclass
class DictionariesListed:
    entries: list[DictionaryEntry]
    select: str | None


@dataclass
class DictionaryInUse:
    path: str | None
    name: str
    labels: list[str]
    chunks: list[ChunkInfo]
    columns: ChunkColumns  # the pack's chunk order: what TokenStep columns index


@dataclass
class TraceStarted:
    trace_id: int
    columns: ChunkColumns


@dataclass
class Tokens:
    trace_id: int
    steps: list[TokenStep]


@dataclass
class TraceDone:
    trace_id: int
    reason: str  # length, eos, stop, cancelled, failed, scanned
    elapsed: float
    steps: list[TokenStep] | None = None  # a scan's steps, or every step relabelled (the RNN's full parse)
    columns: ChunkColumns | None = None


@dataclass
class RunDone:
    # ComparisonReport.to_json() plus prompt and model: a plain dict, because the session journal stores it as
    # is; runs journalled before intervals, fluency, the control arm and sweeps lack those keys, and every
    # reader (the Perturb pane, reports) treats them as absent
    run: dict


@dataclass
class DetailRow:
    column: int
    value: float  # deviation (PA) or cosine (direction)
    score: float  # >= 0 iff hit
    hit: bool


@dataclass
class Detail:
    trace_id: int
    index: int
    layer: int | None
    rows: list[DetailRow]
    total_hits: int
    available: bool = True  # False when the engine no longer holds this trace (restarted)


@dataclass
class Scores:
    trace_id: int
    column: int
    scores: list[float]
    available: bool = True


@dataclass
class Memory:
    """Device memory per device: weights, KV cache so far, what the engine keeps per token (engine.memory rows)."""

    rows: list[dict]  # device, weights, kv_cache, states, free, total, peak, used (bytes)
    kv_tokens: int = 0


@dataclass
class JobDone:
    """A long request finished (after its final event), whatever happened."""

    request: str


@dataclass
class BenchDone:
    tokens: int
    seconds: float


@dataclass
class TopExample:
    """One context where a chunk (or a label's chunks) fires: `before` + [token] + `after`, from the corpus."""

    chunk_id: str  # the chunk that scored best at this token
    label: str
    layer: int
    score: float  # its matching score: ln(threshold/deviation) for PA, ln(cosine/threshold) for directions; >= 0 match
    value: float  # deviation (PA) or cosine (direction)
    agree: int  # chunks of the name asked for (layers) that match this token
    layers: int  # chunks of that name searched
    in_context: int  # tokens of the context where it fires
    token: str
    before: str
    after: str
    token_index: int  # in the corpus' token table
    start: int  # character offsets of the token in the corpus
    end: int

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class TopProgress:
    request_id: int
    fraction: float | None
    text: str


@dataclass
class TopFound:
    request_id: int
    name: str
    corpus: str  # the file searched
    tokens: int  # tokens in the corpus
    contexts: int  # contexts (model passes) in the corpus
    matches: int  # tokens where the name fires
    layers: list[int]
    examples: list[TopExample]
    seconds: float  # the search (0 when answered from the engine's tables)
    cached: bool = False


@dataclass
class Failed:
    """Any failure in the engine: the message is for the user; the traceback goes to the log file."""

    title: str
    text: str
    severity: str = "error"
    task: str | None = None  # load, generate, scan, perturb, dictionary
    traceback: str | None = None


# Every message on the wire, by direction; the rest of this module's classes are payloads inside them.
# tests/unit/test_dispatch_tables.py checks that each has exactly one handler on the other side.
REQUESTS = (Load, ListDictionaries, UseDictionary, Generate, Scan, Compare, TokenDetail, ChunkScores, Cancel,
            BenchStream, Shutdown, TopContexts)
EVENTS = (Ready, Progress, Loaded, DictionariesListed, DictionaryInUse, TraceStarted, Tokens, TraceDone, RunDone,
          Detail, Scores, Memory, JobDone, BenchDone, Failed, TopProgress, TopFound)
PAYLOADS = (ChunkInfo, DictionaryEntry, DetailRow, TopExample)
