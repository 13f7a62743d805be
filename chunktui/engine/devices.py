"""Where work runs: the device a (possibly dispatched) module computes on, and the one out-of-memory handler."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from chunktui.shared.errors import DeviceMemoryError, out_of_memory_message


@contextlib.contextmanager
def out_of_memory(what: str, device, message: str | None = None) -> Iterator[None]:
    """The one place a CUDA out-of-memory error becomes a DeviceMemoryError with advice (nothing is lost)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        raise DeviceMemoryError(message or out_of_memory_message(what, str(device))) from err


def _as_device(where) -> torch.device:
    if isinstance(where, int):
        return torch.device("cuda", where)
    return torch.device(where)


def _hook_devices(hook):
    for inner in getattr(hook, "hooks", None) or [hook]:  # accelerate's SequentialHook holds several
        where = getattr(inner, "execution_device", None)
        if where is not None:
            yield _as_device(where)


def module_device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """Where a module computes: accelerate's execution device when dispatched, else its weights' device."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        if hook is not None:
            for where in _hook_devices(hook):
                return where
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return default if default is not None else torch.device("cpu")
