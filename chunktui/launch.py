"""The `chunktui` console script: when the command opens the app, start the engine process first.

Importing the click CLI takes about 0.15 s; the engine's torch import about
1 s. Starting the engine before the CLI is imported (stdlib only until then)
lets both run at once. Everything else, including every check of the
arguments, is the CLI's own: an engine started for a command the CLI then
refuses is ended at exit, unadopted.
"""

from __future__ import annotations

import os
import sys


def opens_app(argv: list[str]) -> bool:
    """`chunktui` alone or `chunktui tui ...` (not asking for help or the version)."""
    if any(a in ("--help", "-h", "--version") for a in argv):
        return False
    return not argv or argv[0] == "tui"


def threads_of(argv: list[str]) -> int:
    """The engine's thread count as `chunktui tui` will compute it: --threads N, 0 or absent -> all cores."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--threads="):
            value = arg.partition("=")[2]
    try:
        threads = int(value) if value is not None else 0
    except ValueError:
        threads = 0  # the CLI will refuse it with its own message
    return threads if threads > 0 else (os.cpu_count() or 1)


def main() -> None:
    argv = sys.argv[1:]
    if opens_app(argv):
        from chunktui.tui.early import engine_log_path, prestart

        prestart(threads_of(argv), engine_log_path())
    from chunktui.cli import main as cli
    from chunktui.shared.settings import launched_by_torchrun

    if not launched_by_torchrun():
        cli()
        return
    # one rank of a torchrun group: once the command is done (outputs written, process group closed), skip the
    # interpreter's teardown, as the engine process does: torch's thread pools can abort it ("terminate called
    # without an active exception"), which torchrun then reports as a failed rank after a finished build
    try:
        cli()
        code = 0
    except SystemExit as done:
        code = done.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
