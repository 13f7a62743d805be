"""`chunktui rnn ...`: the RNN reflection lab (train, reflect, graft, transfer, lab)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from chunktui.shared.io import write_json
from rich.table import Table

from chunktui.cli.common import SafeConsole, checked, friendly_errors, overwrite_option, plan_outputs
from chunktui.shared import validate

# Off a terminal rich assumes 80 columns, which truncates the tables; allow a wider page.
console = SafeConsole(width=None if sys.stdout.isatty() else 120)


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON to a temp file next to ``path`` and rename it over ``path`` (`shared.io.write_json`)."""
    write_json(path, data)


def _plan_json(out: str | None, overwrite: bool):
    """Check and lock --json before any training (see chunktui.shared.outputs)."""
    return plan_outputs(("--json", out, None), overwrite=overwrite)


def _maybe_json(target, data: dict) -> None:
    if target is not None:
        target.write_json(data)
        console.print(f"wrote {target.path}", style="dim", markup=False, emoji=False)


def _config(seed: int, steps: int, cell: str):
    from chunktui.rnn.train import TrainConfig

    return TrainConfig(seed=seed, steps=steps, cell=cell, window=120)


seed_opt = click.option("--seed", default=0, show_default=True, callback=checked(validate.seed),
                        help="Seed for data, weights and windows.")


def json_opt(func):
    func = overwrite_option(func)
    return click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
                        help="Also write the results as JSON to this file.")(func)


steps_opt = click.option("--steps", default=200, show_default=True, callback=checked(validate.count, hi=100_000),
                         help="Training steps (Adam, lr 0.005).")
cell_opt = click.option("--cell", type=click.Choice(["linear", "tanh", "gru"]), default="linear",
                        show_default=True, help="linear is the paper's h_t = W[x_t; h_{t-1}] + b.")
k_opt = click.option("--k", default=4, show_default=True, callback=checked(validate.count, lo=2, hi=16),
                     help="k-means clusters per neuron (3-5; 2..16 accepted).")


@click.group()
def rnn() -> None:
    """The RNN reflection lab: planted chunks, DSC, grafting."""


def show_train(out: dict) -> None:
    from chunktui.rnn.plot import line_plot

    t = Table(title="Training on ABCD / GHI / JKLMN + fillers")
    for col in ("cell", "steps", "loss first→last", "accuracy first→last", "chance (majority)", "seconds"):
        t.add_column(col)
    t.add_row(out["config"]["cell"], str(out["config"]["steps"]),
              f"{out['loss_first']:.3f} → {out['loss_last']:.3f}",
              f"{out['accuracy_first']:.3f} → {out['accuracy_last']:.3f}",
              f"{out['chance_majority']:.3f}", f"{out['seconds']:.1f}")
    console.print(t)
    console.print(line_plot({"next-symbol accuracy": out["accuracy"]}, lo=0.0, hi=1.0))


@rnn.command("train")
@seed_opt
@steps_opt
@cell_opt
@click.option("--words", default=600, show_default=True, callback=checked(validate.count, lo=50, hi=1_000_000),
              help="Planted words in the training sequence (>= 50).")
@json_opt
@friendly_errors
def train_cmd(seed: int, steps: int, cell: str, words: int, json_out: str | None, overwrite: bool) -> None:
    """Train the RNN on next-symbol prediction and plot its learning curve."""
    from chunktui.rnn.experiments import train_experiment

    target = _plan_json(json_out, overwrite)
    out = train_experiment(words, seed, _config(seed, steps, cell))
    show_train(out)
    _maybe_json(target, out)


def show_reflect(out: dict) -> None:
    init, cp = out["init"], out["chunk_params"]
    t = Table(title=f"Reflection on ABCD / GHI / JKLMN (k={out['k']} per neuron; DSC: pairs seen ≥ "
                    f"{cp['min_count']}×, {cp['per_round']} a round, ≤ {cp['rounds']} rounds)")
    for col in ("seed", "network", "decode", "unseen", "states", "recur.", "learned", "parse", "planted",
                "÷planted", "÷truth", "next"):
        t.add_column(col, justify="right", no_wrap=True)
    for p in out["per_seed"]:
        for name in ("trained", "untrained"):
            r = p[name]
            ok = abs(r["parse_to_planted"] - 1) <= 0.1
            t.add_row(str(p["seed"]), name, f"{r['decoding_accuracy']:.3f}",
                      f"{r['decoding']['unseen_fraction']:.3f}", str(r["unique_states"]),
                      str(r["recurring_states"]), str(r["learned_chunks"]), str(r["parse_length"]),
                      str(p["planted_words"]),
                      f"[{'green' if ok else 'default'}]{r['parse_to_planted']:.2f}[/]",
                      f"{r['parse_ratio']:.2f}", f"{r['next_symbol_accuracy']:.3f}")
    console.print(t)
    n = len(out["per_seed"])
    s = Table(title=f"Over {n} seed{'s' if n > 1 else ''}")
    for col in ("init", "network", "decode mean", "decode min", "÷planted mean", "within 10%"):
        s.add_column(col, justify="right")
    rows = [(f"orth×{init['recurrent_gain']:g}", out)]
    if "default_init" in out:
        rows.append(("default (extra)", out["default_init"]))
    for scheme, block in rows:
        for name in ("trained", "untrained"):
            a = block[name]
            s.add_row(scheme, name, f"{a['decoding_accuracy']:.3f}", f"{a['decoding_accuracy_min']:.3f}",
                      f"{a['parse_to_planted_mean']:.2f}", f"{a['seeds_parse_within_10pct_of_planted']}/{n}")
    console.print(s)
    tc = out["train_config"]
    console.print("[dim]decode: current symbol from the discretised state (state→symbol table fit on the "
                  "first half of the run, tested on the second; unseen states count as wrong); states: unique "
                  "states; recur.: those seen at least twice; learned: chunks DSC added; ÷planted: DSC parse "
                  "length / planted words (the paper: 1580 / 1501); ÷truth: / ground-truth parse length "
                  "(words plus one token per filler); next: next-symbol accuracy.[/dim]")
    console.print(f"[dim]Like for like: both networks start from the same seeded init (recurrent block "
                  f"orthogonal × {init['recurrent_gain']:g}); untrained = that starting point. Training: "
                  f"{tc['steps']} Adam{'W' if tc['weight_decay'] else ''} steps, lr {tc['lr']:g}"
                  f"{', weight decay %g' % tc['weight_decay'] if tc['weight_decay'] else ''}, "
                  f"{tc['batch']} windows of {tc['window']}. (extra): the same pairs at PyTorch's default "
                  "init, whose small recurrent weights make an untrained state nearly a copy of the input.[/dim]")


@rnn.command("reflect")
@seed_opt
@click.option("--seeds", default=5, show_default=True, callback=checked(validate.count, hi=1000),
              help="Seeds (seed, seed+1, ...), trained as one batch.")
@click.option("--steps", default=250, show_default=True, callback=checked(validate.count, hi=100_000),
              help="Training steps.")
@cell_opt
@click.option("--k", default=3, show_default=True, callback=checked(validate.count, lo=2, hi=16),
              help="k-means clusters per neuron (3-5; 2..16 accepted).")
@click.option("--gain", default=0.9, show_default=True,
              callback=checked(validate.number_in, lo=0.0, hi=10.0, lo_open=True),
              help="Init of both networks: recurrent block orthogonal × gain (0 < gain <= 10).")
@click.option("--weight-decay", default=0.5, show_default=True, callback=checked(validate.number_in, lo=0.0, hi=10.0),
              help="AdamW decoupled weight decay, 0..10 (0: plain Adam, as in the paper).")
@click.option("--rounds", default=1000, show_default=True, callback=checked(validate.count),
              help="DSC chunk-learning rounds at most.")
@click.option("--min-count", default=2, show_default=True, callback=checked(validate.count),
              help="DSC: a pair must occur this often.")
@click.option("--per-round", default=8, show_default=True, callback=checked(validate.count),
              help="DSC: new chunks per round at most.")
@click.option("--kmeans", type=click.Choice(["exact", "robust"]), default="exact", show_default=True,
              help="Per-neuron clustering: exact 1-D k-means, or seeded robust k-medians.")
@click.option("--default-init/--no-default-init", default=False, show_default=True,
              help="Also report the pairs at PyTorch's default init (one more training run).")
@json_opt
@friendly_errors
def reflect_cmd(seed: int, seeds: int, steps: int, cell: str, k: int, gain: float, weight_decay: float,
                rounds: int, min_count: int, per_round: int, kmeans: str, default_init: bool,
                json_out: str | None, overwrite: bool) -> None:
    """Decode the input from discretised states; DSC chunks; trained vs untrained (same init)."""
    from chunktui.rnn.dsc import ChunkParams
    from chunktui.rnn.experiments import reflect_experiment
    from chunktui.rnn.train import TrainConfig

    target = _plan_json(json_out, overwrite)
    cfg = TrainConfig(seed=seed, steps=steps, cell=cell, weight_decay=weight_decay)
    out = reflect_experiment(seed, k=k, params=ChunkParams(rounds, min_count, per_round), config=cfg,
                             recurrent_gain=gain, compare_default_init=default_init, seeds=seeds, kmeans=kmeans)
    show_reflect(out)
    _maybe_json(target, out)


def show_graft(out: dict) -> None:
    t = Table(title=f"Grafting ({out['task']} task): prefix state + next input → continuation")
    for col in ("word", "grafted state of", "fed", "target", "P(target)", "top"):
        t.add_column(col)
    for r in out["readouts"]:
        ok = "green" if r["top"] == r["target"] else "red"
        t.add_row(r["word"], r["prefix"], r["fed"], r["target"], f"{r['prob']:.3f}", f"[{ok}]{r['top']}[/{ok}]")
    console.print(t)
    console.print(f"min P(target) = {out['min_prob']:.3f}, mean = {out['mean_prob']:.3f}")


@rnn.command("graft")
@seed_opt
@steps_opt
@cell_opt
@k_opt
@click.option("--task", type=click.Choice(["flat", "context"]), default="flat", show_default=True,
              help="context: words share 'BC', so the continuation depends on the grafted state.")
@json_opt
@friendly_errors
def graft_cmd(seed: int, steps: int, cell: str, k: int, task: str, json_out: str | None, overwrite: bool) -> None:
    """Write a chunk prefix's state into the RNN, feed the next symbol, read the prediction."""
    from chunktui.rnn.experiments import graft_experiment

    target = _plan_json(json_out, overwrite)
    out = graft_experiment(seed, task, k=k, config=_config(seed, steps, cell))
    show_graft(out)
    _maybe_json(target, out)


def show_transfer(out: dict) -> None:
    from chunktui.rnn.plot import line_plot

    cfg = out["config"]
    t = Table(title=f"Transfer: learning {cfg['first']}+{cfg['second']} over {out['n_seeds']} seeds "
                    f"(steps to accuracy ≥ {cfg['threshold']})")
    for col in ("arm", "mean steps", "sd", "reached"):
        t.add_column(col, justify="right")
    for arm in ("control", "graft"):
        a = out[arm]
        t.add_row(arm, f"{a['mean_steps']:.1f}", f"{a['sd_steps']:.1f}", f"{a['reached']}/{out['n_seeds']}")
    console.print(t)
    d = out["paired_difference"]
    console.print(f"paired (control − graft): {d['mean']:.2f} steps, sd {d['sd']:.2f}, se {d['se']:.2f}; graft "
                  f"faster on {d['graft_faster']}, tied {d['ties']}, slower {d['graft_slower']} "
                  f"(sign test p = {d['sign_test_p']:.3f})")
    console.print(line_plot({"control": out["control"]["mean_curve"], "graft": out["graft"]["mean_curve"]},
                            xs=out["curve_steps"], hi=1.0))


@rnn.command("transfer")
@seed_opt
@click.option("--seeds", default=20, show_default=True, callback=checked(validate.count, lo=2, hi=1000),
              help="Independent seeds (each: pretrain + both arms; >= 2 for a spread).")
@click.option("--steps", default=60, show_default=True, callback=checked(validate.count, hi=100_000),
              help="Steps on the new composition.")
@click.option("--threshold", default=0.95, show_default=True,
              callback=checked(validate.number_in, lo=0.0, hi=1.0, lo_open=True),
              help="Accuracy to reach (within-word transitions), 0 < t <= 1.")
@json_opt
@friendly_errors
def transfer_cmd(seed: int, seeds: int, steps: int, threshold: float, json_out: str | None, overwrite: bool) -> None:
    """Learn a new composition of known words, with and without grafting at the junction."""
    from chunktui.rnn.experiments import TransferConfig, transfer_experiment

    target = _plan_json(json_out, overwrite)
    out = transfer_experiment(TransferConfig(seeds=seeds, steps=steps, threshold=threshold, seed=seed))
    show_transfer(out)
    _maybe_json(target, out)


@rnn.command("lab")
@seed_opt
@click.option("--seeds", default=20, show_default=True, callback=checked(validate.count, lo=2, hi=1000),
              help="Seeds for the transfer experiment (>= 2).")
@json_opt
@friendly_errors
def lab_cmd(seed: int, seeds: int, json_out: str | None, overwrite: bool) -> None:
    """Run every experiment at default sizes and print the figures and total wall time."""
    target = _plan_json(json_out, overwrite)
    out = run_lab(seed, seeds)
    _maybe_json(target, out)


def run_lab(seed: int = 0, seeds: int = 20) -> dict:
    from chunktui.rnn.experiments import (TransferConfig, graft_experiment, reflect_experiment,
                                          train_experiment, transfer_experiment)

    t0 = time.perf_counter()
    out: dict = {}
    timings: dict = {}
    for name, fn in (
        ("train", lambda: train_experiment(600, seed, _config(seed, 200, "linear"))),
        ("reflect", lambda: reflect_experiment(seed, seeds=5, compare_default_init=False)),
        ("graft_flat", lambda: graft_experiment(seed, "flat", config=_config(seed, 200, "linear"))),
        ("graft_context", lambda: graft_experiment(seed, "context", config=_config(seed, 200, "linear"))),
        ("transfer", lambda: transfer_experiment(TransferConfig(seeds=seeds, seed=seed))),
    ):
        t = time.perf_counter()
        out[name] = fn()
        timings[name] = time.perf_counter() - t
        {"train": show_train, "reflect": show_reflect, "graft_flat": show_graft,
         "graft_context": show_graft, "transfer": show_transfer}[name](out[name])
    out["seconds"] = timings
    out["total_seconds"] = time.perf_counter() - t0
    t = Table(title="Lab wall time")
    t.add_column("experiment")
    t.add_column("seconds", justify="right")
    for name, s in timings.items():
        t.add_row(name, f"{s:.1f}")
    t.add_row("[bold]total[/bold]", f"[bold]{out['total_seconds']:.1f}[/bold]")
    console.print(t)
    return out
