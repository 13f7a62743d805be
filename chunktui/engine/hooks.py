"""The one ordered hook context: every hook chunktui puts on a model goes through `block_hooks`.

At each decoder block, edits (interventions, rules) run before records: edit
pre-hooks are registered with ``prepend=True`` and record pre-hooks after
them, so a recorder sees the stream as the block sees it, whatever order the
contexts were entered in. Every handle is removed in ``finally``.

`ResidualRecorder` records H[l] (the stream entering block l, l < L) with a
pre-hook on each block and H[L] with a forward hook on the final norm.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from chunktui.engine.layout import ModelLayout

# (module, args, kwargs) -> None or (args, kwargs): torch's forward pre-hook with kwargs
PreHook = Callable[..., object]
# (module, args, output) -> None: torch's forward hook
PostHook = Callable[..., object]


@contextlib.contextmanager
def block_hooks(layout: "ModelLayout", *, edits: Mapping[int, PreHook] | None = None,
                records: Mapping[int, PreHook] | None = None, final: PostHook | None = None,
                site: str = "residual") -> Iterator[None]:
    """Install edit pre-hooks (first), record pre-hooks (after them) and a final-norm hook; always removed.

    `edits` and `records` map a block index to its hook; `final` records the final norm's output. `site` says
    where the edits go: `residual` on the block (the stream entering it), `attention` on the block's
    attention-side norm (`layout.attention_norm`: what attention reads; the residual stream is untouched, so
    the recorders, which read the residual stream, see it unedited).
    """
    handles = []
    try:
        for index, fn in (edits or {}).items():
            module = layout.edit_module(index, site)
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True, prepend=True))
        for index, fn in (records or {}).items():
            handles.append(layout.blocks[index].register_forward_pre_hook(fn, with_kwargs=True))
        if final is not None:
            handles.append(layout.final_norm.register_forward_hook(final))
        yield
    finally:
        for handle in handles:
            handle.remove()


class ResidualRecorder:
    """Records H[0..L] during a forward pass, without copying.

    Use as a context manager around a forward call; `states()` then returns a
    tensor (batch, seq, n_states, d) in the model's dtype (or the chosen
    subset of layers). On a model dispatched across devices each block's state
    arrives on the device of the block before it; `states()` gathers them onto
    `device` (default: where the first recorded layer arrived, which is the
    model's input device), so matching sees one tensor on one device.
    """

    def __init__(self, layout: "ModelLayout", layers: Sequence[int] | None = None,
                 device: torch.device | str | None = None):
        self.layout = layout
        self.layers = list(range(layout.n_states)) if layers is None else list(layers)
        self.device = torch.device(device) if device is not None else None
        self._captured: dict[int, torch.Tensor] = {}
        self._context = None

    def __enter__(self) -> "ResidualRecorder":
        wanted = set(self.layers)
        n = self.layout.n_layers
        self._context = block_hooks(
            self.layout, records={l: self._pre_hook(l) for l in range(n) if l in wanted},
            final=self._post_hook(n) if n in wanted else None)
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        context, self._context = self._context, None
        if context is not None:
            context.__exit__(*exc)

    def _pre_hook(self, index: int):
        def hook(module, args, kwargs):
            self._captured[index] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _post_hook(self, index: int):
        def hook(module, args, output):
            self._captured[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def states(self) -> torch.Tensor:
        missing = [l for l in self.layers if l not in self._captured]
        if missing:
            raise RuntimeError(f"layers {missing} were not reached in the forward pass")
        device = self.device or self._captured[self.layers[0]].device
        out = torch.stack([self._captured[l].to(device) for l in self.layers], dim=2)
        self._captured.clear()
        return out
