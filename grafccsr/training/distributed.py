"""Several processes training one model: ``torchrun`` + ``torch.distributed``.

The same ``python -m grafccsr.train`` entry point reads torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``); one process per device (``cuda:LOCAL_RANK``, or the CPU with
gloo). Gradients are averaged by hand after each D and G step (StyleGAN2-ADA's way: the
gradients of all parameters flattened into one tensor and all-reduced), not by the DDP
wrapper: R1's double backward, a discriminator called several times per step and the
generator's frozen D are all outside what DDP supports or checks, and one collective per step
can carry the step's losses and a status flag as well, so that every rank takes the same
decision (skip a NaN step, stop on an out-of-memory error on any rank).

``train.batch_size`` is the GLOBAL batch: each of the ``world_size`` ranks processes
``batch_size / world_size`` images per step.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import torch
import torch.distributed as dist

from grafccsr.config import ConfigError
from grafccsr.training.outcome import is_out_of_memory

OK, BUDGET, STOP, NONFINITE, OOM, ERROR = 0, 1, 2, 3, 4, 5
"""Status codes agreed by all ranks (the maximum wins): BUDGET ends the run normally (its time
budget is spent on some rank's clock), the others end it as a failure or interruption."""
STATUS_NAMES = {BUDGET: "budget", STOP: "interrupted", NONFINITE: "nonfinite", OOM: "oom", ERROR: "error"}


class RankFailure(RuntimeError):
    """Another rank (or this one) reported a failure through a collective."""

    def __init__(self, status: int, where: str) -> None:
        super().__init__(f"{STATUS_NAMES.get(status, status)} on a rank ({where})")
        self.status, self.where = status, where


class RankLost(RankFailure):
    """A collective failed: another rank died (connection reset) or stopped answering (timeout)."""

    def __init__(self, err: RuntimeError) -> None:
        lines = str(err).strip().splitlines()
        # gloo's text: "[file.cc:545] Read error [addr]: Connection reset by peer. This is typically..."
        cause = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", lines[0]).split(". ")[0] if lines else type(err).__name__
        RuntimeError.__init__(self, f"another rank stopped answering ({cause})")
        self.status, self.where = ERROR, "collective"


def _collective(call, *args, **kwargs):
    """A torch.distributed call; a lost peer becomes :class:`RankLost` (not a bug: no traceback)."""
    try:
        return call(*args, **kwargs)
    except RuntimeError as err:  # gloo and nccl raise plain RuntimeError (or subclasses) here
        if is_out_of_memory(err):  # this rank's own allocation failed: an OOM, not a lost peer
            raise
        raise RankLost(err) from err


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (a single process when ``world_size`` is 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    simulated: bool = False
    """Rank 0 of a job that does not exist: every collective allocates what it would but
    communicates nothing (the memory estimator prices a rank this way)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, batch_size: int, grad_accum_steps: int = 1) -> int:
        """Each rank's share of the global batch; it must split into ``grad_accum_steps`` micro-batches."""
        if batch_size % self.world_size:
            raise ConfigError(f"train.batch_size={batch_size} (the global batch) must be divisible by the "
                              f"{self.world_size} ranks")
        local = batch_size // self.world_size
        if local % grad_accum_steps:
            raise ConfigError(f"train.batch_size={batch_size} over {self.world_size} ranks gives {local} per rank, "
                              f"not divisible by train.grad_accum_steps={grad_accum_steps}")
        return local

    def shard(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global-batch tensor."""
        b = tensor.shape[0] // self.world_size
        return tensor[self.rank * b:(self.rank + 1) * b]

    # ------------------------------------------------------------------ collectives

    def agree(self, status: int) -> int:
        """All ranks' worst status (the maximum, one tiny all-reduce)."""
        if self.enabled and not self.simulated:
            flag = torch.tensor([float(status)], device=_device())
            _collective(dist.all_reduce, flag, op=dist.ReduceOp.MAX)
            status = int(flag.item())
        return status

    def average_gradients(self, params: Sequence[torch.nn.Parameter], values: Dict[str, torch.Tensor],
                          status: int = OK) -> Dict[str, torch.Tensor]:
        """Average the gradients of ``params`` and the scalars ``values`` over the ranks, in one
        all-reduce that also carries ``status`` (the maximum over ranks). A rank that failed
        before its backward joins with zero gradients. Returns the averaged values; raises
        :class:`RankFailure` when any rank's status is not OK."""
        if not self.enabled:
            if status != OK:
                raise RankFailure(status, "step")
            return values
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        keys = sorted(values)
        scalars = torch.stack([values[k].detach().float().reshape(()) for k in keys]) if keys else torch.zeros(0)
        device = grads[0].device if grads else _device()
        flags = torch.zeros(len(STATUS_NAMES) + 1, device=device)
        flags[status] = 1.0  # one slot per status: after the sum, the highest set slot is the worst
        flat = torch.cat([g.detach().flatten().float() for g in grads] + [scalars.to(device), flags])
        if not self.simulated:
            _collective(dist.all_reduce, flat)
            worst = int(flat[-flags.numel():].nonzero().max().item())
            if worst != OK:
                raise RankFailure(worst, "step")
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            if p.grad is None:
                p.grad = g
            p.grad.copy_(flat[offset:offset + n].view_as(g).to(g.dtype))
            offset += n
        return {k: flat[offset + i] for i, k in enumerate(keys)}

    def max_over_ranks(self, values: Dict[str, float]) -> Dict[str, float]:
        """Each key's maximum over the ranks (memory peaks); keys missing on a rank count as 0."""
        gathered = self.gather(values)
        keys = sorted({k for d in gathered for k in d})
        return {k: max(d.get(k, 0.0) for d in gathered) for k in keys}

    def gather(self, value: Any) -> List[Any]:
        """Every rank's ``value`` (rank order), on every rank."""
        if not self.enabled or self.simulated:
            return [value] * self.world_size
        gathered: List[Any] = [None] * self.world_size
        _collective(dist.all_gather_object, gathered, value)
        return gathered

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (identical start, spectral-norm vectors too)."""
        if not self.enabled or self.simulated:
            return
        for tensor in list(module.parameters()) + list(module.buffers()):
            _collective(dist.broadcast, tensor.data, src=0)


def _device() -> torch.device:
    """The device collectives run on: the backend's (gloo: CPU, nccl: this rank's GPU)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def from_env() -> Dist:
    """torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; a single process without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(info: Dist, device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on the CPU); returns this rank's device.
    A rank that does not reach a collective within ``timeout_s`` fails the others."""
    if not info.enabled:
        return device
    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {info.local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                              "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        from torch.distributed.rendezvous import rendezvous

        timeout = datetime.timedelta(seconds=timeout_s)
        store, _, _ = next(rendezvous("env://", info.rank, info.world_size, timeout=timeout))
        # torchrun keeps one store across restarts: without a prefix per attempt, a restarted
        # rank can read a dead peer's address from the last attempt and fail to connect
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore(
            f"grafccsr/attempt{attempt}/", store), rank=info.rank, world_size=info.world_size, timeout=timeout)
    return device


def shutdown(together: bool) -> None:
    """Leave the process group. ``together``: every rank is alive and gets here, so wait for
    all of them first; a rank that tears gloo down while a peer still holds its connections
    can abort at exit ("terminate called without an active exception", about 1 run in 8)."""
    if dist.is_initialized():
        if together:
            try:
                dist.barrier()
            except RuntimeError:  # a peer left after all agreed to finish: nothing to wait for
                pass
        dist.destroy_process_group()
