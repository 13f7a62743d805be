"""The host allocator: a corpus job keeps the memory it frees (glibc), rather than fault it in again.

No imports from the rest of the engine: the corpus jobs (builds, evaluate, calibrate, collect, the state cache,
monitor, the `top` command) call `keep_freed_memory`, and `corpus.BatchStates` `release_freed_memory`.
"""

from __future__ import annotations

import functools

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_BYTES = 256 << 20  # the heap gives its top back to the system past this much free
_ALLOCATOR_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_allocator_state: str | None = None


@functools.cache
def _glibc():
    """The C library, where it is glibc (looked up once)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory() -> str:
    """Let this process reuse the memory it frees rather than hand it back and fault it in again (glibc only).

    glibc's defaults serve blocks above a moving threshold (128 KiB, rising to at most 32 MiB) with their own
    mappings, unmapped when freed, and give the heap's top back to the system as soon as it frees 128 KiB or
    more there. A forward pass over a batch frees and takes again the same hundred-odd MB every batch (the
    recorded states of a batch alone are about 40 MB), so each batch takes fresh pages from the kernel, and
    each page costs a fault and its zeroing; in a virtual machine far more (measured on this project's 2-core
    VM, a fresh process, 25 batches of 16 sentences with every layer recorded: 0.17-1.2 million faults, 0.5-2 s
    of system time and 21-23 s; with this, 1-16 thousand faults, under 0.4 s and 17-18.6 s). Here every block
    comes from the heap (no mappings of its own), and the heap keeps up to `TRIM_BYTES` free at its top for
    the next batch. `release_freed_memory` gives the rest back after a large job.

    Called by the jobs that run the model over a corpus batch after batch (`build.build_dictionary`,
    `evaluate_dictionary`, `calibrate.evidence_on_corpus`, `corpus.collect`, `corpus.cache_states`,
    `meandiff.build_mean_difference`, `monitor.monitor_texts`, the `top` command), not by `load_model`: the
    app's engine, which generates token by token, keeps glibc's defaults. Measured (`chunktui bench app
    --tokens 1000 --threads 1`, 2026-12-03): with this setting in the app's engine process the app streamed
    12.5-12.6 tok/s with key latency p95 16-17 ms rising along the stream (3.3-3.5 ms per 1,000 tokens); with
    glibc's defaults 16.7 tok/s, p95 8.1 ms, flat. The setting stays for the rest of the process. Left alone
    where the user tuned the allocator (MALLOC_* variables, glibc.malloc tunables), with CHUNKTUI_MALLOC=default,
    and off glibc (macOS, musl: their allocators differ). Returns what was done: "tuned", "already", or why not."""
    import os

    global _allocator_state
    if _allocator_state is not None:
        return "already" if _allocator_state == "tuned" else _allocator_state
    if os.environ.get("CHUNKTUI_MALLOC", "").strip().lower() == "default":
        _allocator_state = "left alone (CHUNKTUI_MALLOC=default)"
    elif any(os.environ.get(name) for name in _ALLOCATOR_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        _allocator_state = "left alone (the allocator is tuned in the environment)"
    else:
        libc = _glibc()
        if libc is None:
            _allocator_state = "left alone (not glibc)"
        elif libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES):
            _allocator_state = "tuned"
        else:
            _allocator_state = "left alone (mallopt refused)"
    return _allocator_state


def release_freed_memory() -> bool:
    """Give the system back the free memory the heap holds (after a job that held a lot, e.g. a build's kept
    states), where `keep_freed_memory` tuned the allocator. True when some was given back."""
    if _allocator_state != "tuned":
        return False
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
