"""Work across processes with torch.distributed: one rank per GPU on CUDA (nccl), processes on CPU (gloo).

A build started by `torchrun --nproc-per-node K -m chunktui build ...` (or
`chunktui build --procs K`, which calls torchrun's own launcher) finds the
usual torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...);
`process_group()` joins it. Without that environment everything runs in one
process through the same interface, so the engine has one code path.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from chunktui.shared.settings import launched_by_torchrun  # noqa: F401 - the CLI asks it here


class SingleProcess:
    """The one-process group: every collective is the identity."""

    rank = 0
    world_size = 1
    backend = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_cat(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return tensor

    def all_max(self, value: float) -> float:
        return value

    def all_gather_json(self, obj) -> list:
        """Every rank's `obj` (anything JSON can hold), in rank order, on every rank."""
        return [obj]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class TorchGroup(SingleProcess):
    """The default torch.distributed process group. Tensors travel on the backend's device."""

    def __init__(self, backend: str):
        import torch.distributed as dist

        self.dist = dist
        self.backend = backend
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.to(self.comm_device).clone()
        self.dist.all_reduce(out, op=self.dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def all_cat(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        local = tensor.to(self.comm_device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        self.dist.all_gather(parts, local)
        return torch.cat(parts, dim=dim).to(tensor.device)

    def all_max(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return float(t.item())

    def all_gather_json(self, obj) -> list:
        """As JSON in uint8 tensors (no pickle, unlike all_gather_object): lengths first, then the padded bytes."""
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        local = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        sizes = self.all_cat(torch.tensor([len(data)], dtype=torch.int64)).tolist()
        padded = torch.zeros(max(sizes), dtype=torch.uint8)
        padded[:len(data)] = local
        parts = self.all_cat(padded[None])
        return [json.loads(row[:n].numpy().tobytes().decode("utf-8")) for row, n in zip(parts, sizes)]

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()




def process_group(device: str = "auto") -> SingleProcess:
    """Join the torchrun group when launched by it (gloo on CPU, nccl on CUDA); else one process."""
    if not launched_by_torchrun():
        return SingleProcess()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device not in ("cpu",) and not str(device).startswith("mps")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return TorchGroup(backend)


def check_procs(procs: int, device: str = "auto") -> None:
    """`--procs K` before anything launches: at least 1, and on CUDA one GPU per process (rank_device)."""
    from chunktui.shared.errors import CorpusError

    if isinstance(procs, bool) or not isinstance(procs, int) or procs < 1:
        raise CorpusError(f"--procs must be at least 1, got {procs}.")
    if procs > 1 and torch.cuda.is_available() and device in ("auto", "cuda"):
        gpus = torch.cuda.device_count()
        if procs > gpus:
            raise CorpusError(f"--procs {procs} on CUDA runs one process per GPU, and this machine has {gpus}; "
                              f"use --procs {gpus} or fewer, or --device cpu.")


def rank_device(device: str) -> str:
    """One GPU per rank: 'auto' or 'cuda' becomes cuda:LOCAL_RANK under torchrun."""
    if launched_by_torchrun() and torch.cuda.is_available() and device in ("auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def launch(procs: int, argv: list[str]) -> int:
    """Run `python -m chunktui ARGV` in `procs` processes with torchrun's launcher (torch.distributed.run)."""
    from torch.distributed.run import get_args_parser, run

    # torchrun would set 1 thread per worker (with a warning); share the cores out instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(procs), "--module", "chunktui", *argv])
    # the launcher's own log lines ("Sending process ... closing signal", "failed (exitcode: 2)") are kept back
    # and shown only when a worker failed without saying why itself (a user error, exit 2, is one line already)
    held = _HeldLogs("torch.distributed.elastic")
    code = 0
    try:
        with held:
            run(args)
    except Exception as err:  # torchrun's ChildFailedError carries the failing rank's exit code
        sigval = getattr(err, "sigval", None)  # SignalException: the launcher was sent SIGTERM / SIGINT and
        if sigval is not None:                 # has passed it on to the workers, which said so themselves
            return 128 + int(sigval)
        failures = getattr(err, "failures", None) or {}
        codes = [getattr(f, "exitcode", 1) for f in failures.values()]
        code = max([c for c in codes if isinstance(c, int) and c > 0] or [1])
    if code not in (0, 2, 130, 143):
        held.replay()
    return code


class _HeldLogs:
    """Records of a logger tree held back in memory while in the block (not propagated), for `replay`."""

    def __init__(self, name: str):
        import logging

        self.logger = logging.getLogger(name)
        self.records: list = []
        self.handler = logging.Handler()
        self.handler.emit = self.records.append

    def __enter__(self):
        self.propagate = self.logger.propagate
        self.logger.propagate = False
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.propagate = self.propagate
        return False

    def replay(self) -> None:
        import logging

        for record in self.records:
            logging.getLogger(record.name).handle(record)


def peak_memory_bytes(device: torch.device | str | None = None) -> dict[str, int]:
    """Peak resident memory of this process (and peak CUDA memory when on a GPU)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss": int(rss if sys.platform == "darwin" else rss * 1024)}
    if device is not None and torch.device(device).type == "cuda":
        out["cuda"] = int(torch.cuda.max_memory_allocated(torch.device(device)))
    return out
