"""Training with several processes: PyTorch DistributedDataParallel, launched by torchrun.

``torchrun --nproc-per-node N -m transferlab train ...`` starts N processes with RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE set; :func:`start` joins them into one process group (gloo on CPU, nccl
on CUDA). Rules, owned here and used by the trainer:

- every process reads the same data and draws the same epoch order from the run's seed; each takes a
  disjoint slice of every global batch (:class:`~transferlab.training.batches.BatchOrder`), so
  ``--batch-size`` is the global batch and a run's hyper-parameters mean what they mean in one process;
- only rank 0 writes files, logs and shows progress; decisions that depend on time or on one process's
  view (early stopping, keep-best, the time limit) are rank 0's, broadcast to the others;
- work that is not training (decoding, feature extraction, validation, testing) is sharded over the
  ranks without padding and gathered, so every image is counted exactly once;
- the head on cached features trains in every process on all features (it costs milliseconds; a
  gradient all-reduce would cost more), and its weights are then broadcast from rank 0.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..data.decode import available_cpus
from ..errors import TransferlabError

log = logging.getLogger("transferlab")

# How long a process waits for the others at a collective before failing (a crashed peer must not hang
# the run for torch's default of 30 minutes); TRANSFERLAB_DIST_TIMEOUT seconds.
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the processes of one training."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """This process's share of ``items``: every ``world``-th from ``rank`` (disjoint, no padding)."""
        return list(items[self.rank::self.world])

    def positions(self, n: int) -> range:
        return range(self.rank, n, self.world)


SINGLE = Processes()


class IndexedView(Sequence):
    """The items of ``items`` at ``indices``, read on access (a process's share of a split of stored images
    is never copied into memory at once)."""

    def __init__(self, items: Sequence, indices: Sequence[int]):
        self.items, self.indices = items, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self.items[i] for i in self.indices[key]]
        return self.items[self.indices[key]]


def from_environment() -> Processes:
    """The torchrun variables of this process (one process without them)."""
    env = os.environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as exc:
        raise TransferlabError(f"torchrun environment: {exc}") from None
    return Processes(rank, world, local_rank, local_world) if world > 1 else SINGLE


def _timeout() -> datetime.timedelta:
    value = os.environ.get("TRANSFERLAB_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        return datetime.timedelta(seconds=float(value))
    except ValueError:
        raise TransferlabError(f"TRANSFERLAB_DIST_TIMEOUT={value!r}: a number of seconds") from None


class Session:
    """The process group of one training: joined by :meth:`start`, left by :meth:`close` (only if this
    session created it: a script that set up its own group keeps it)."""

    def __init__(self, procs: Processes, device: str, owns_group: bool):
        self.procs, self.device, self.owns_group = procs, device, owns_group

    @classmethod
    def start(cls, device: str) -> Session:
        """Join the torchrun processes (``device``: the resolved device type). One process: nothing to do."""
        procs = from_environment()
        if not procs.enabled:
            return cls(SINGLE, device, owns_group=False)
        import torch.distributed as dist

        if not dist.is_available():
            raise TransferlabError("torchrun: this torch build has no torch.distributed")
        owns = not dist.is_initialized()
        if device == "cuda":
            torch.cuda.set_device(procs.local_rank)
        if owns:
            backend = "nccl" if device == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=_timeout())
        if device == "cpu":  # processes on one machine share its cores
            torch.set_num_threads(max(1, available_cpus() // procs.local_world))
        return cls(procs, device, owns)

    @property
    def device_name(self) -> str:
        """The device this process computes on (its own GPU under CUDA)."""
        return f"cuda:{self.procs.local_rank}" if self.procs.enabled and self.device == "cuda" else self.device

    def close(self) -> None:
        if self.procs.enabled and self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # --------------------------------------------------------------------------------------- collectives

    def barrier(self) -> None:
        if self.procs.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_object(self, value=None):
        """Rank 0's ``value`` in every process (internal objects between our own processes only)."""
        if not self.procs.enabled:
            return value
        import torch.distributed as dist

        box = [value if self.procs.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, value) -> list:
        if not self.procs.enabled:
            return [value]
        import torch.distributed as dist

        out: list = [None] * self.procs.world
        dist.all_gather_object(out, value)
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every process's parameters and buffers rank 0's."""
        if not self.procs.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision (stop training, ...) in every process."""
        return bool(self.broadcast_object(flag)) if self.procs.enabled else flag

    def sharded_map(self, n: int, compute: Callable[[list[int]], Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        """``compute(indices)`` -> tensors with one row per index, run on this process's share of range(n);
        the rows of every process gathered back into index order, in every process. Each index is computed
        exactly once (no padding)."""
        if not self.procs.enabled:
            return [t.cpu() for t in compute(list(range(n)))]
        mine = list(self.procs.positions(n))
        parts = self.all_gather_object((mine, [t.cpu() for t in compute(mine)]))
        outputs = None
        for indices, tensors in parts:
            if outputs is None:
                outputs = [torch.empty((n, *t.shape[1:]), dtype=t.dtype) for t in tensors]
            for out, t in zip(outputs, tensors, strict=True):
                if len(indices):
                    out[torch.tensor(indices)] = t
        return outputs

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """The DDP wrapper that trains ``module`` (registered now: the parameters that require gradients at
        this moment, so each stage wraps anew). One process: ``module`` itself."""
        if not self.procs.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.procs.local_rank] if self.device == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)  # buffers (BatchNorm statistics) follow rank 0


@contextlib.contextmanager
def quiet_unless_main(procs: Processes):
    """Ranks other than 0 log warnings only and show no progress bars (rank 0 speaks for the run)."""
    if procs.is_main:
        yield
        return
    from .. import progress

    level, quiet = log.level, progress.bars_quiet()
    log.setLevel(logging.WARNING)
    progress.set_quiet(True)
    try:
        yield
    finally:
        log.setLevel(level)
        progress.set_quiet(quiet)


def check_supported(cfg) -> None:
    """What has no distributed form (yet): a clear error instead of a wrong result."""
    procs = from_environment()
    if not procs.enabled:
        return
    if cfg.strategy == "auto":
        raise TransferlabError("--strategy auto under torchrun: the search runs in one process; run it without "
                               "torchrun, then train its choice with torchrun")
    if cfg.batch_size % procs.world:
        raise TransferlabError(f"--batch-size {cfg.batch_size} is the global batch: under torchrun it must be "
                               f"divisible by the {procs.world} processes")
