"""Run every RNN reflection experiment and report the figures and the total wall time.

    PYTHONPATH=. .venv/bin/python benchmarks/rnn_lab.py [--seed 0] [--seeds 20] [--json out.json]

Same as ``chunktui rnn lab``. The goal is under 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

from chunktui.cli.rnn import console, run_lab, write_json_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = run_lab(args.seed, args.seeds)
    wall = time.perf_counter() - t0
    out["benchmark_wall_seconds"] = wall
    if args.json:
        write_json_atomic(args.json, out)
    console.print(f"[bold]rnn lab wall time: {wall:.1f} s[/bold] (target < 120 s on 2 CPU cores)")


if __name__ == "__main__":
    main()
