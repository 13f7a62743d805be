"""chunktui from Python: one facade over the engine, used by the CLI, the app's engine process and notebooks.

    from chunktui import Engine

    engine = Engine.load("smollm2-135m", dictionary="sample")
    trace = engine.generate("What do you like to eat?", max_new_tokens=20)
    print(trace.text)
    print(trace.labels())                      # the label each token is coloured by (the colour rule; None: none)
    scan = engine.scan_trace("The cheese was on the table.")
    print([s.text for s in scan.steps if s.strongest >= 0])
    report = engine.compare("cheese", "What should I cook tonight?", samples=4, control="subpopulation")
    print(report.concepts["cheese"]["delta_logprob"])

Tensors stay on the model's device inside; traces hold plain values (the
same `TokenStep`s the app draws).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Iterator, Sequence

from chunktui.shared.errors import ChunkError
from chunktui.shared.settings import DEFAULT_SAMPLES, ProgressFn, Sampling
from chunktui.shared.session import ChunkColumns, Trace
from chunktui.shared.specs import DEFAULT_MODEL

class Engine:
    """A loaded model (language model or reflection RNN), its dictionary, and what you can do with them."""

    def __init__(self, backend, threads: int | None = None) -> None:
        self.backend = backend
        self.dictionary = None
        self.packed = None
        self.threads = threads

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, *, dictionary: str | Path | None = None, device: str = "auto",
             dtype: str = "auto", threads: int | None = None, progress: ProgressFn | None = None,
             device_map: str | dict | None = None, max_memory: str | dict | None = None,
             offload_folder: str | None = None, offline: bool = False) -> "Engine":
        """Load a model spec (alias, .gguf, folder, Hub id, random:NAME, rnn:TASK) and optionally a dictionary
        (a path, or "sample" for the built-in model's sample dictionary). device_map / max_memory /
        offload_folder / offline: as in `chunktui.engine.models.load_model` (a Hub id is downloaded unless
        offline)."""
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        from chunktui.backends import load_backend

        placement = dict(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder, offline=offline)
        engine = cls(load_backend(model, device, dtype, progress=progress, placement=placement), threads=threads)
        own = engine.backend.own_dictionary()
        if own is not None:
            engine.use_dictionary(own)
        elif dictionary is not None:
            engine.use_dictionary(dictionary)
        return engine

    @classmethod
    def from_loaded(cls, loaded, dictionary=None) -> "Engine":
        """The facade over a model already loaded (the CLI loads with its own progress bar)."""
        from chunktui.backends import LanguageModelBackend

        engine = cls(LanguageModelBackend(loaded))
        if dictionary is not None:
            engine.use_dictionary(dictionary)
        return engine

    @property
    def loaded(self):
        return self.backend.loaded

    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def n_states(self) -> int:
        return self.loaded.layout.n_states

    def card(self) -> dict:
        return self.loaded.card()

    def memory(self, kv_tokens: int = 0, state_tokens: int = 0) -> list[dict]:
        """Per device: weights, KV cache of `kv_tokens`, `state_tokens` recorded states, free / total / peak bytes
        (for the model card and the status bar). Empty for the RNN, which has no device memory to speak of."""
        from chunktui.engine.memory import memory_report
        from chunktui.engine.models import LoadedModel

        if not isinstance(self.loaded, LoadedModel):
            return []
        return [row.to_json() for row in memory_report(self.loaded, kv_tokens=kv_tokens, state_tokens=state_tokens)]

    def check_dictionary(self, path: str | Path, header_only: bool = False) -> tuple[object | None, str | None]:
        """(dictionary, None) when the file fits this model, else (None or the dictionary, the reason).

        `header_only`: only the JSON header is read and checked (for listing): the first item is then a
        `DictionaryHeader` (model, labels, chunk count), and the tensors are validated when it is used."""
        from chunktui.engine.dictionary import ChunkDictionary, DictionaryHeader, load_dictionary, peek_dictionary
        from chunktui.shared.errors import DictionaryError

        if not Path(path).is_file():
            return None, "file not found"
        if header_only:
            try:
                model, labels, n = peek_dictionary(path)
            except DictionaryError as err:
                return None, str(err)
            except Exception as err:  # a file we cannot read at all: say what, keep going
                return None, f"unreadable ({type(err).__name__}: {err})"
            header = DictionaryHeader(path=Path(path), model=model, label_list=labels, n_chunks=n)
            return header, ChunkDictionary(model=model, chunks=[]).compatibility_problem(self.loaded.identity())
        try:
            dictionary = load_dictionary(path)
        except DictionaryError as err:
            return None, str(err)
        except Exception as err:  # a file we cannot read at all: say what, keep going
            return None, f"unreadable ({type(err).__name__}: {err})"
        return dictionary, dictionary.compatibility_problem(self.loaded.identity())

    def use_dictionary(self, dictionary) -> object:
        """Use a dictionary (a ChunkDictionary, a path, or "sample"): checked against this model, then packed."""
        if isinstance(dictionary, (str, Path)):
            path = dictionary
            if str(dictionary) == "sample":
                from chunktui.paths import DEFAULT_DICT_NAME, sample_path

                path = sample_path(DEFAULT_DICT_NAME)
            found, problem = self.check_dictionary(path)
            if problem is not None:
                from chunktui.shared.errors import DictionaryError

                raise DictionaryError(f"{Path(path).name}: {problem}")
            dictionary = found
        self.dictionary = dictionary
        if self.kind == "rnn":  # DSC chunks are matched by the RNN backend; the dictionary stands as the pack
            self.packed = dictionary
        else:
            from chunktui.engine.matching import pack

            self.packed = pack(dictionary.chunks, self.loaded.hidden_size, self.n_states, self.loaded.device,
                               rule=dictionary.token_rule())
        return dictionary

    @property
    def colour_rule(self):
        """The dictionary's token-level colour rule (`shared.evidence.TokenRule`), None without a dictionary."""
        return getattr(self.packed, "rule", None)

    def columns(self) -> ChunkColumns:
        """The order of chunk columns in every step (the pack's order)."""
        return ChunkColumns.from_pack(self.packed)

    # ------------------------------------------------------------------ streaming and scanning

    def stream(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int = 0, chat: bool = True, sampling: Sampling | None = None,
               cancel: threading.Event | None = None, rules=None) -> Iterator:
        """Token events (prompt tokens first, then generated ones), each with every layer's state and matches.

        `rules`: rule texts ("when cheese -> stop"), parsed `shared.rules.Rule`s or a program from
        `engine.rules(...)`; each generated token's event carries the firings (`event.firings`), a `stop`
        ends the stream with finished "rule", and an intervention fired at token t edits from token t+1."""
        sampling = sampling or Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        top_k=top_k, seed=seed)
        program = self.rules(rules) if rules is not None else None
        kwargs = {"rules": program} if program is not None else {}
        if self.kind == "lm" and isinstance(prompt, str):  # refused up front when prompt + answer exceed the context
            from chunktui.engine.context import check_fits
            from chunktui.engine.tokens import encode_prompt

            ids = encode_prompt(self.loaded, prompt, chat)
            check_fits(self.loaded, len(ids), sampling.max_new_tokens)
            return self.backend.stream(ids, sampling, self.packed, cancel, chat, **kwargs)
        return self.backend.stream(prompt, sampling, self.packed, cancel, chat, **kwargs)

    def rules(self, rules, on_prompt: str | None = None, site: str | None = None):
        """Rules compiled against this model and dictionary (an `engine.rules.RuleProgram`), or None for none.

        Accepts rule texts, parsed rules, or a program already compiled (returned as is). Unknown labels,
        layers out of range and the like raise a `shared.rules.RuleError` naming the rule. `on_prompt` (off,
        watch, act; default `settings.RULES_ON_PROMPT`) says what interventions do with the prompt's matches and
        `site` (residual, attention) where they edit (docs/rules.md)."""
        from chunktui.engine.rules import RuleProgram, compile_rules

        if rules is None or isinstance(rules, RuleProgram):
            return rules
        if isinstance(rules, str):
            rules = [rules]
        if self.kind != "lm":
            raise ChunkError("Rules act on a language model's chunk matches; the reflection RNN has no rules yet.")
        if self.packed is None or self.dictionary is None:
            raise ChunkError("Rules need a dictionary: load one first.")
        name = Path(self.dictionary.path).name if getattr(self.dictionary, "path", None) else "the dictionary"
        return compile_rules(rules, self.packed, self.loaded, self.dictionary, name=name, on_prompt=on_prompt,
                             site=site)

    def generate(self, prompt: str, **kwargs) -> Trace:
        """Stream to the end and return the trace (plain values: text, chunk per token and layer, norms)."""
        from chunktui.engine.steps import step_from_event

        chat = kwargs.get("chat", True)
        settings = {"chat": chat}
        if kwargs.get("rules") is not None:
            kwargs["rules"] = self.rules(kwargs["rules"])
            if kwargs["rules"] is not None:
                settings["rules"] = kwargs["rules"].describe()
        trace = Trace("stream", prompt, self.columns(), settings=settings)
        reason = None
        for event in self.stream(prompt, **kwargs):
            trace.extend([step_from_event(event)])
            reason = event.finished or reason
        revised = self.backend.revise(trace.steps)
        if revised is not None:
            trace.replace_steps(revised)
        trace.finished = reason or "length"
        return trace

    def scan(self, text: str):
        """A teacher-forced pass: every token's states (T, L+1, d) and matches."""
        return self.backend.scan(text, self.packed)

    def scan_trace(self, text: str, title: str = "text") -> Trace:
        from chunktui.engine.steps import steps_from_scan

        trace = Trace("scan", title, self.columns())
        trace.extend(steps_from_scan(self.scan(text)))
        trace.finished = "scanned"
        return trace

    # ------------------------------------------------------------------ perturbation

    def intervention(self, chunks: str | Sequence[str], mode: str = "graft", strength: float | None = None,
                     layers: str = "2-9", positions: str = "prompt", site: str = "residual",
                     chunk_layer_shift: int = 0):
        """An Intervention from names: labels or chunk ids, each layer of `layers` using its own chunk.

        `site`: residual (the stream entering each block) or attention (the input of its attention-side norm).
        `chunk_layer_shift` 1 writes the chunk of layer l-1 at block l (the paper code's off-by-one)."""
        from chunktui.shared.validate import parse_layers
        from chunktui.engine.perturb import Intervention, Positions, select_chunks

        if not self.backend.can_perturb:
            raise ChunkError("Perturbation steers language models. For the RNN, graft a chunk's state with "
                             "`chunktui rnn graft` (and `chunktui rnn transfer`).")
        if self.dictionary is None:
            raise ChunkError("Perturbing needs a dictionary: load one first.")
        from chunktui.shared.validate import editable_layers

        names = [chunks] if isinstance(chunks, str) else list(chunks)
        names = [n.strip() for name in names for n in name.split(",") if n.strip()]
        n_blocks = self.n_states - 1  # edits go into the stream entering blocks 0..L-1 ('all' means those)
        layer_list = list(range(n_blocks)) if str(layers).strip().lower() == "all" else \
            editable_layers(parse_layers(layers, self.n_states), n_blocks)
        chunk_layers = [l - chunk_layer_shift for l in layer_list if l - chunk_layer_shift >= 0]
        return Intervention(chunks=select_chunks(self.dictionary, names, chunk_layers), mode=mode, strength=strength,
                            positions=Positions.parse(positions), layer_means=self.dictionary.layer_means,
                            site=site, chunk_layer_shift=chunk_layer_shift)

    def compare(self, chunks, prompts: str | Sequence[str], *, mode: str = "graft", strength: float | None = None,
                layers: str | None = None, positions: str | None = None, samples: int = DEFAULT_SAMPLES,
                sampling: Sampling | None = None, chat: bool | None = None, batch_size: int = 16,
                cancel: threading.Event | None = None, progress: ProgressFn | None = None, intervention=None,
                control: str | None = None, control_seed: int = 0, sweep: Sequence[float] | None = None,
                site: str | None = None, protocol: str | None = None, paper_confounds: bool = False,
                layer_diff: bool = False):
        """Control and perturbed arms with identical prompts, sampling and seeds (a ComparisonReport).

        `intervention` (from `engine.intervention(...)`) replaces chunks/mode/strength/layers/positions/site.
        samples: continuations per prompt in each arm (rates come with Wilson 95% intervals).
        control: "subpopulation" or "direction" adds a random control intervention of the same size (seeded by
        control_seed). sweep: several strengths in one report (`report.sweep`; the top level is the first).
        progress(stage, fraction, message): optional; hears of every batch, decoding step and finished prompt.
        `protocol="paper"` takes the paper's question-experiment settings (`shared.settings.PAPER_PROTOCOL`) for
        whatever is left unset (None); `paper_confounds=True` adds the paper code's three deviations. Without
        `sampling`, the protocol's temperature, top-p and length are used. The resolved settings are in the
        report's `protocol` field. `layer_diff=True` adds to each pair the chunks matched at each generated token
        and layer in both runs and their difference (`engine.perturb.layer_match_diff`)."""
        from chunktui.engine.perturb import compare
        from chunktui.shared import validate
        from chunktui.shared.settings import overridden, resolve_protocol

        given = {"layers": layers, "positions": positions, "strength": strength, "site": site, "chat": chat}
        if sampling is not None:
            given.update(top_p=sampling.top_p, temperature=sampling.temperature,
                         max_new_tokens=sampling.max_new_tokens)
        settings = resolve_protocol(protocol, paper_confounds, intervention.mode if intervention else mode, given)
        intervention = intervention or self.intervention(chunks, mode, settings["strength"], settings["layers"],
                                                         settings["positions"], settings["site"],
                                                         settings["chunk_layer_shift"])
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        sampling = sampling or Sampling(max_new_tokens=settings["max_new_tokens"],
                                        temperature=settings["temperature"], top_p=settings["top_p"])
        control_sampling = (dataclasses.replace(sampling, top_p=settings["control_top_p"])
                            if settings["control_top_p"] is not None else None)
        samples = validate.samples(samples)
        strengths = validate.strengths(list(sweep), intervention.mode) if sweep is not None else None
        report = compare(self.loaded, intervention, prompts, samples=samples, sampling=sampling,
                         chat=settings["chat"], batch_size=batch_size, cancel=cancel, progress=progress,
                         control_kind=control, control_seed=validate.seed(control_seed, "control seed"),
                         strengths=strengths, control_sampling=control_sampling,
                         score_prompt=settings["score_prompt"],
                         match_dictionary=self.dictionary if layer_diff else None)
        settings.update(site=intervention.site, positions=str(intervention.positions),
                        strength=intervention.strength, chunk_layer_shift=intervention.chunk_layer_shift,
                        layers=_span(intervention.layers), chat=report.settings["chat"],
                        positions_meaning=intervention.positions.meaning())
        settings["overridden"] = overridden(settings)
        report.protocol = settings
        return report

    # ------------------------------------------------------------------ dictionaries

    def build(self, corpus: str | None = None, words: Sequence[str] | None = None, **kwargs):
        """Build a dictionary by population averaging (see `engine.build.build_dictionary` for the options)."""
        from chunktui.engine.build import LabelSource, build_dictionary

        source = LabelSource(corpus=corpus, words=list(words or []), **{k: kwargs.pop(k) for k in list(kwargs)
                                                                       if k in ("spans_path", "step", "min_count")})
        return build_dictionary(self.loaded, source, **kwargs)

    def top(self, chunk: str, corpus: str | Path | None = None, k: int = 10, layers: str | None = None,
            progress=None) -> list:
        """Where a chunk fires: the k contexts of `corpus` (a text file; default the sample held-out text) where
        `chunk` (an id such as cheese@5, or a label: its chunks at every layer, or at `layers`) matches most, one
        per context, best first (`shared.protocol.TopExample`s; see `engine.top`)."""
        from chunktui.engine.top import resolve_units, top_tables
        from chunktui.paths import sample_path
        from chunktui.shared.texts import read_text
        from chunktui.shared.validate import parse_layers

        if self.dictionary is None or self.kind != "lm":
            raise ChunkError("Where a chunk fires needs a language model and a dictionary: load one first.")
        text = read_text(corpus if corpus is not None else sample_path("heldout.txt"))
        layer_list = parse_layers(layers, self.n_states) if layers else None
        units = {chunk: resolve_units(self.dictionary, chunk, layer_list)}
        report = (lambda fraction, message: progress("search", fraction, message)) if progress else None
        return top_tables(self.loaded, self.dictionary, text, units, progress=report).examples(chunk, k)

    def evaluate(self, corpus: str, dictionary=None, **kwargs):
        """Held-out TP rate, FP rate and accuracy per chunk and layer (records, summary by label)."""
        from chunktui.engine.build import LabelSource, evaluate_dictionary, summarise_by_label

        dictionary = dictionary or self.dictionary
        if dictionary is None:
            raise ChunkError("Evaluating needs a dictionary: pass one or load one first.")
        result = evaluate_dictionary(self.loaded, dictionary, LabelSource(corpus=corpus), **kwargs)
        records = result[0] if isinstance(result, tuple) else result
        return records, summarise_by_label(records)


def _span(layers: Sequence[int]) -> str:
    """2-9 for a run of blocks, else 1,3,5."""
    layers = list(layers)
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))
