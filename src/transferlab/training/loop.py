"""The training loop: one loop for heads on cached features and for fine-tuning on images.

A small fastai-like design: the loop fires named events (:data:`EVENTS`) to callbacks sorted by
``order``; a callback raises :class:`StopTraining` to end training early. Epoch events frame each epoch,
batch events each batch, step events the optimizer step (gradients are there between ``before_step``
and ``after_step``: the place for gradient clipping or a distributed all-reduce). While an event runs the
loop exposes its state: ``epoch``, ``batch_index``, ``x``, ``y``, ``logits``, ``loss`` (a ``before_batch`` callback
may replace ``x`` and ``y``: Mixup's soft targets are rows of class probabilities). Randomness per
epoch (shuffling, augmentation) is derived from (seed, epoch), so an epoch's batches do not depend on what
ran before it.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TrainingInterrupted, TransferlabError
from ..progress import bars_enabled, progress_bar
from ..runtime.precision import Policy
from .batches import Batches

log = logging.getLogger("transferlab")

EVENTS = ("before_fit", "before_epoch", "before_batch", "before_step", "after_step", "after_batch",
          "after_epoch", "after_fit")


class StopTraining(Exception):
    """Raised by a callback to end training after the current epoch."""


class Callback:
    """Override the events you need; ``after_epoch`` also receives the epoch's history row."""

    order = 0

    def before_fit(self, loop: TrainLoop) -> None: ...

    def before_epoch(self, loop: TrainLoop) -> None: ...

    def before_batch(self, loop: TrainLoop) -> None: ...

    def before_step(self, loop: TrainLoop) -> None: ...

    def after_step(self, loop: TrainLoop) -> None: ...

    def after_batch(self, loop: TrainLoop) -> None: ...

    def after_epoch(self, loop: TrainLoop, row: dict) -> None: ...

    def after_fit(self, loop: TrainLoop) -> None: ...

    def state(self) -> tuple[dict, dict]:
        """(tensors, JSON-able scalars) to store in a checkpoint."""
        return {}, {}

    def load_state(self, tensors: dict, meta: dict) -> None: ...


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(name: str, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


@dataclass
class LoopSpec:
    """What one stage trains, on what, for how long. ``validate`` returns (loss, accuracy) on held-out
    data; ``set_train_mode`` decides which parts are in train mode (default ``module.train``)."""

    module: nn.Module
    batches: Batches
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    policy: Policy
    stage: str
    warmup_epochs: float = 1.0
    validate: Callable[[], tuple[float, float]] | None = None
    set_train_mode: Callable[[], None] | None = None
    seed: int = 0
    forward: nn.Module | None = None  # what computes training logits: a DDP wrapper of ``module`` (default module)
    agree: Callable[[bool], bool] | None = None  # with several processes: rank 0's stop decision in all of them
    rank: int = 0  # the process's rank (dropout draws differ between processes)


class _Totals:
    def __init__(self) -> None:
        self.loss, self.correct, self.seen = 0.0, 0, 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        labels = y.argmax(1) if y.ndim > 1 else y  # soft targets (Mixup/CutMix): their largest class
        self.loss += loss.item() * len(y)
        self.correct += int((logits.argmax(1) == labels).sum())
        self.seen += len(y)


class TrainLoop:
    """Trains ``spec.module`` for ``spec.epochs`` epochs, firing :data:`EVENTS` to ``callbacks``."""

    def __init__(self, spec: LoopSpec, callbacks: Iterable[Callback] = ()):
        self.spec = spec
        self.module, self.batches, self.optimizer = spec.module, spec.batches, spec.optimizer
        self.loss_fn = spec.loss_fn
        self.epochs, self.policy, self.stage, self.seed = spec.epochs, spec.policy, spec.stage, spec.seed
        self.set_train_mode = spec.set_train_mode or spec.module.train
        self.forward = spec.forward if spec.forward is not None else spec.module
        self.agree = spec.agree or (lambda stop: stop)
        total = max(1, spec.epochs * spec.batches.count)
        warmup = min(total // 2, round(spec.warmup_epochs * spec.batches.count))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(spec.optimizer, cosine_with_warmup(total, warmup))
        self.callbacks = sorted(callbacks, key=lambda cb: cb.order)
        # per event, the callbacks that override it: an empty event costs nothing per batch
        self._listeners = {name: [cb for cb in self.callbacks if getattr(type(cb), name) is not getattr(Callback, name)]
                           for name in EVENTS}
        self.history: list[dict] = []
        self.epoch, self.batch_index = 0, 0
        self.x = self.y = self.logits = self.loss = None

    def _event(self, name: str, *args) -> None:
        for cb in self._listeners[name]:
            try:
                getattr(cb, name)(self, *args)
            except (StopTraining, TransferlabError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise RuntimeError(f"callback {type(cb).__name__} failed in {name}: {exc}") from exc

    def resume_from(self, checkpoint) -> int:
        """Restore module, optimizer, scheduler, history and callbacks; returns the next epoch."""
        from ..io.checkpoint import restore_optimizer

        self.module.load_state_dict(checkpoint.part("module."))
        restore_optimizer(self.optimizer, checkpoint)
        self.scheduler.load_state_dict(checkpoint.meta["scheduler"] | {"lr_lambdas": [None] * len(
            self.optimizer.param_groups)})
        self.history = [row for row in checkpoint.meta["history"] if row["stage"] == self.stage]
        for cb in self.callbacks:
            prefix = f"cb.{type(cb).__name__}."
            cb.load_state(checkpoint.part(prefix), checkpoint.meta["callbacks"].get(type(cb).__name__, {}))
        log.info("%s: resuming after epoch %d (checkpoint)", self.stage, checkpoint.epoch)
        return checkpoint.epoch + 1

    def fit(self, resume=None) -> list[dict]:
        """Train; ``resume`` (a :class:`~transferlab.io.checkpoint.Checkpoint` of this stage) continues it."""
        first = self.resume_from(resume) if resume is not None else 1
        self._event("before_fit")
        epoch = first
        try:
            for epoch in range(first, self.epochs + 1):
                row = self._one_epoch(epoch)
                self.history.append(row)
                stop = False
                try:
                    self._event("after_epoch", row)
                except StopTraining:
                    stop = True
                if self.agree(stop):
                    break
        except StopTraining:  # raised by a callback in another event
            pass
        except KeyboardInterrupt:
            raise TrainingInterrupted(f"interrupted in {self.stage} epoch {epoch}; the last finished epoch is "
                                      "checkpointed: run the same command again to resume") from None
        self._event("after_fit")
        return self.history

    def _one_epoch(self, epoch: int) -> dict:
        start = time.perf_counter()
        rank = f"/{self.spec.rank}" if self.spec.rank else ""
        torch.manual_seed(zlib.crc32(f"global/{self.seed}/{epoch}/{self.stage}{rank}".encode()))  # dropout, mixing
        self.set_train_mode()
        lr = self.optimizer.param_groups[0]["lr"]
        self.epoch = epoch
        self._event("before_epoch")
        totals = _Totals()
        bar = progress_bar(self.batches.make(epoch), total=self.batches.count,
                           desc=f"{self.stage} {epoch}/{self.epochs}")
        for self.batch_index, (x, y) in enumerate(bar):
            self._one_batch(x, y)
            totals.add(self.loss, self.logits, self.y)
            self._event("after_batch")
            if bars_enabled() and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{totals.loss / totals.seen:.4f}", acc=f"{totals.correct / totals.seen:.3f}")
        row = {"stage": self.stage, "epoch": epoch, "train_loss": totals.loss / max(1, totals.seen),
               "train_acc": totals.correct / max(1, totals.seen), "val_loss": None, "val_acc": None, "lr": lr}
        if self.spec.validate is not None:
            row["val_loss"], row["val_acc"] = self.spec.validate()
            if not math.isfinite(row["val_loss"]):
                raise TransferlabError(f"{self.stage} epoch {epoch}: the validation loss became {row['val_loss']} "
                                       "(diverged); the last finished epoch is checkpointed; lower --lr")
        row["seconds"] = time.perf_counter() - start
        return row

    def _one_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = self.policy.prepare_input(x), y.to(self.policy.device)
        self._event("before_batch")
        with self.policy.autocast():
            self.logits = self.forward(self.x)
        self.loss = self.loss_fn(self.logits.float(), self.y)
        if not torch.isfinite(self.loss):
            raise TransferlabError(f"{self.stage} epoch {self.epoch}: the loss became {self.loss.item()} "
                                   "(diverged); the last finished epoch is checkpointed; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.loss.backward()
        self._event("before_step")
        self.optimizer.step()
        self.scheduler.step()
        self._event("after_step")
