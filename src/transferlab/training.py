"""The training loop: one loop for heads on cached features and for fine-tuning on images.

A small fastai-like design: the loop fires named events (``before_fit``, ``after_epoch``,
``after_fit``) to callbacks sorted by ``order``; a callback raises :class:`StopTraining` to end
training early. Randomness per epoch (shuffling, augmentation) is derived from (seed, epoch), so an
epoch's batches do not depend on what ran before it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import TransferlabError
from .precision import Policy
from .preprocessing import PreprocessConfig, TrainAugment, eval_batch
from .progress import bars_enabled, progress_bar

log = logging.getLogger("transferlab")


class StopTraining(Exception):
    """Raised by a callback to end training after the current epoch."""


class Callback:
    order = 0

    def before_fit(self, loop: TrainLoop) -> None: ...

    def after_epoch(self, loop: TrainLoop, row: dict) -> None: ...

    def after_fit(self, loop: TrainLoop) -> None: ...

    def state(self) -> tuple[dict, dict]:
        """(tensors, JSON-able scalars) to store in a checkpoint."""
        return {}, {}

    def load_state(self, tensors: dict, meta: dict) -> None: ...


class TrainingInterrupted(TransferlabError):
    """Ctrl-C during training; the checkpoint of the last finished epoch is on disk."""


class SaveCheckpoint(Callback):
    """A checkpoint in RUN_DIR/checkpoint (see :mod:`transferlab.checkpoint`) after the first and the last
    epoch of a stage, and after every other epoch that ends ``min_interval`` seconds or more after the last
    checkpoint: a head epoch on cached features takes milliseconds, less than writing its checkpoint, so a
    killed run loses at most ``min_interval`` seconds of work instead of doubling the cost of every epoch.
    Resuming from an earlier epoch gives the same result (each epoch's randomness depends only on its
    number)."""

    order = 40

    def __init__(self, run_dir, config: dict, earlier_history: list[dict], min_interval: float = 1.0) -> None:
        self.run_dir, self.config = run_dir, config
        self.earlier_history = earlier_history  # rows of finished stages (the caller's list, kept current)
        self.min_interval = min_interval
        self.last_saved: float | None = None

    def before_fit(self, loop: TrainLoop) -> None:
        self.last_saved = None

    def after_epoch(self, loop: TrainLoop, row: dict) -> None:
        now = time.perf_counter()
        due = self.last_saved is None or now - self.last_saved >= self.min_interval or row["epoch"] >= loop.epochs
        if due:
            self._save(loop)
            self.last_saved = time.perf_counter()

    def _save(self, loop: TrainLoop) -> None:
        from .checkpoint import save_checkpoint

        tensors, meta = {}, {}
        for cb in loop.callbacks:
            cb_tensors, cb_meta = cb.state()
            tensors |= {f"cb.{type(cb).__name__}.{k}": v for k, v in cb_tensors.items()}
            meta[type(cb).__name__] = cb_meta
        save_checkpoint(self.run_dir, loop.stage, loop.history[-1]["epoch"], loop.module, loop.optimizer,
                        loop.scheduler, self.earlier_history + loop.history, meta, tensors, self.config)


class KeepBestOnValidation(Callback):
    """Remembers the weights of the epoch with the best validation accuracy (lower loss breaks ties)
    and puts them back at the end. Without validation data the last epoch is kept."""

    order = 10

    def __init__(self) -> None:
        self.best_key: tuple[float, float] | None = None
        self.best_state: dict | None = None
        self.best_epoch: int | None = None

    def after_epoch(self, loop: TrainLoop, row: dict) -> None:
        if row.get("val_acc") is None:
            return
        key = (row["val_acc"], -row["val_loss"])
        if self.best_key is None or key > self.best_key:
            self.best_key, self.best_epoch = key, row["epoch"]
            self.best_state = copy.deepcopy(loop.module.state_dict())

    def state(self) -> tuple[dict, dict]:
        tensors = {f"best.{k}": v for k, v in (self.best_state or {}).items()}
        return tensors, {"best_key": self.best_key, "best_epoch": self.best_epoch}

    def load_state(self, tensors: dict, meta: dict) -> None:
        self.best_key = tuple(meta["best_key"]) if meta.get("best_key") else None
        self.best_epoch = meta.get("best_epoch")
        best = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")}
        self.best_state = best or None

    def after_fit(self, loop: TrainLoop) -> None:
        if self.best_state is not None:
            loop.module.load_state_dict(self.best_state)
            log.info("%s: kept epoch %d (best validation accuracy %.4f)", loop.stage, self.best_epoch,
                     self.best_key[0])


class EarlyStopping(Callback):
    order = 20

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best: tuple[float, float] | None = None
        self.waited = 0

    def state(self) -> tuple[dict, dict]:
        return {}, {"best": self.best, "waited": self.waited}

    def load_state(self, tensors: dict, meta: dict) -> None:
        self.best = tuple(meta["best"]) if meta.get("best") else None
        self.waited = int(meta.get("waited", 0))

    def after_epoch(self, loop: TrainLoop, row: dict) -> None:
        if row.get("val_acc") is None:
            return
        key = (row["val_acc"], -row["val_loss"])
        if self.best is None or key > self.best:
            self.best, self.waited = key, 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            log.info("%s: early stop after epoch %d (no validation improvement for %d epochs)",
                     loop.stage, row["epoch"], self.patience)
            raise StopTraining


class EpochLogger(Callback):
    """One log line per epoch (the progress bar shows the rest on a terminal)."""

    order = 30

    def after_epoch(self, loop: TrainLoop, row: dict) -> None:
        val = "" if row.get("val_acc") is None else f" val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}"
        log.info("%s epoch %d/%d: loss %.4f acc %.4f%s lr %.2e (%.1fs)", loop.stage, row["epoch"],
                 loop.epochs, row["train_loss"], row["train_acc"], val, row["lr"], row["seconds"])


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


def epoch_generator(seed: int, epoch: int, stage: str) -> torch.Generator:
    """A generator that depends only on (seed, epoch, stage), never on what ran before."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{epoch}/{stage}".encode()))


@dataclass
class Batches:
    """How one epoch of training batches is produced: ``make(epoch)`` -> iterator of (x, y)."""

    make: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    count: int


def _batch_indices(n: int, batch_size: int, generator: torch.Generator,
                   sample_weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One epoch of shuffled index batches; with ``sample_weights``, ``n`` indices drawn with
    replacement in proportion to them (the balanced sampler)."""
    if sample_weights is None:
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.multinomial(sample_weights, n, replacement=True, generator=generator)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:  # a batch of one breaks BatchNorm in train mode
        chunks = chunks[:-1]
    return chunks


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-sample weights 1 / (images in its class): every class is drawn equally often."""
    counts = torch.bincount(labels).float()
    return 1.0 / counts[labels]


def feature_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                    stage: str, sample_weights: torch.Tensor | None = None) -> Batches:
    def make(epoch: int):
        for idx in _batch_indices(len(labels), batch_size, epoch_generator(seed, epoch, stage), sample_weights):
            yield features[idx], labels[idx]
    count = len(_batch_indices(len(labels), batch_size, torch.Generator().manual_seed(0)))
    return Batches(make, count)


def image_batches(images: list[torch.Tensor], labels: torch.Tensor, batch_size: int, seed: int, stage: str,
                  preprocess: PreprocessConfig, augment: bool, sample_weights: torch.Tensor | None = None) -> Batches:
    """Augmentation draws from the global torch RNG, which TrainLoop seeds per epoch."""
    transform = TrainAugment(preprocess) if augment else (lambda ims: eval_batch(ims, preprocess))

    def make(epoch: int):
        for idx in _batch_indices(len(labels), batch_size, epoch_generator(seed, epoch, stage), sample_weights):
            yield transform([images[i] for i in idx.tolist()]), labels[idx]
    count = len(_batch_indices(len(labels), batch_size, torch.Generator().manual_seed(0)))
    return Batches(make, count)


class TrainLoop:
    """Trains ``module`` for ``epochs`` epochs; ``set_train_mode`` decides which parts are in train mode."""

    def __init__(self, module: nn.Module, batches: Batches, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 epochs: int, policy: Policy, stage: str, warmup_epochs: float = 1.0,
                 validate: Callable[[], tuple[float, float]] | None = None,
                 set_train_mode: Callable[[], None] | None = None, callbacks: Iterable[Callback] = (),
                 seed: int = 0):
        self.module, self.batches, self.loss_fn, self.optimizer = module, batches, loss_fn, optimizer
        self.seed = seed
        self.epochs, self.policy, self.stage, self.validate = epochs, policy, stage, validate
        self.set_train_mode = set_train_mode or module.train
        total = max(1, epochs * batches.count)
        warmup = min(total // 2, round(warmup_epochs * batches.count))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, warmup))
        self.callbacks = sorted(callbacks, key=lambda cb: cb.order)
        self.history: list[dict] = []

    def _event(self, name: str, *args) -> None:
        for cb in self.callbacks:
            try:
                getattr(cb, name)(self, *args)
            except (StopTraining, TransferlabError, KeyboardInterrupt):
                raise
            except Exception as exc:
                raise RuntimeError(f"callback {type(cb).__name__} failed in {name}: {exc}") from exc

    def resume_from(self, checkpoint) -> int:
        """Restore module, optimizer, scheduler, history and callbacks; returns the next epoch."""
        from .checkpoint import restore_optimizer

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
        """Train; ``resume`` (a :class:`~transferlab.checkpoint.Checkpoint` of this stage) continues it."""
        first = self.resume_from(resume) if resume is not None else 1
        self._event("before_fit")
        epoch = first
        try:
            for epoch in range(first, self.epochs + 1):
                row = self._one_epoch(epoch)
                self.history.append(row)
                self._event("after_epoch", row)
        except StopTraining:
            pass
        except KeyboardInterrupt:
            raise TrainingInterrupted(f"interrupted in {self.stage} epoch {epoch}; the last finished epoch is "
                                      "checkpointed: run the same command again to resume") from None
        self._event("after_fit")
        return self.history

    def _one_epoch(self, epoch: int) -> dict:
        start = time.perf_counter()
        torch.manual_seed(zlib.crc32(f"global/{self.seed}/{epoch}/{self.stage}".encode()))  # dropout, augmentation
        self.set_train_mode()
        lr = self.optimizer.param_groups[0]["lr"]
        total_loss, correct, seen = 0.0, 0, 0
        bar = progress_bar(self.batches.make(epoch), total=self.batches.count,
                           desc=f"{self.stage} {epoch}/{self.epochs}")
        for x, y in bar:
            x = self.policy.prepare_input(x)
            y = y.to(self.policy.device)
            with self.policy.autocast():
                logits = self.module(x)
            loss = self.loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                raise TransferlabError(f"{self.stage} epoch {epoch}: the loss became {loss.item()} (diverged); "
                                       "the last finished epoch is checkpointed; lower --lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if bars_enabled() and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        row = {"stage": self.stage, "epoch": epoch, "train_loss": total_loss / max(1, seen),
               "train_acc": correct / max(1, seen), "val_loss": None, "val_acc": None, "lr": lr}
        if self.validate is not None:
            row["val_loss"], row["val_acc"] = self.validate()
            if not math.isfinite(row["val_loss"]):
                raise TransferlabError(f"{self.stage} epoch {epoch}: the validation loss became {row['val_loss']} "
                                       "(diverged); the last finished epoch is checkpointed; lower --lr")
        row["seconds"] = time.perf_counter() - start
        return row


@torch.no_grad()
def predict_in_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: list[torch.Tensor],
                       preprocess: PreprocessConfig, policy: Policy, batch_size: int = 64,
                       desc: str = "", view: str = "center") -> torch.Tensor:
    """Apply ``fn`` (a module in eval mode) to one view of decoded images, batch by batch; returns
    float32 on CPU."""
    outputs = []
    starts = range(0, len(images), batch_size)
    for start in progress_bar(starts, total=len(starts), desc=desc, enabled=bool(desc)):
        x = policy.prepare_input(eval_batch(images[start:start + batch_size], preprocess, view))
        with policy.autocast():
            outputs.append(fn(x).float().cpu())
    if not outputs:
        return torch.empty(0)
    return torch.cat(outputs)


def average_views(logits_per_view: list[torch.Tensor]) -> torch.Tensor:
    """Test-time augmentation: the mean of the views' class probabilities, returned as log-probabilities
    (so that ``softmax`` of the result gives the averaged probabilities back)."""
    probs = torch.stack([torch.softmax(logits, dim=1) for logits in logits_per_view]).mean(0)
    return probs.clamp_min(1e-12).log()


@torch.no_grad()
def predict_logits(model, images: list[torch.Tensor], preprocess: PreprocessConfig, policy: Policy,
                   tta: bool = False, batch_size: int = 64, desc: str = "", engine: str = "auto",
                   n_images: int | None = None) -> torch.Tensor:
    """Logits of ``model`` (eval mode) for decoded images; with ``tta`` the log of the probabilities
    averaged over :data:`~transferlab.preprocessing.TTA_VIEWS`. ``engine``: see :mod:`transferlab.inference`
    (``n_images``: how many images the caller will push through in all, which decides whether an ONNX
    export pays; default ``len(images)``)."""
    from .inference import forward_fn
    from .preprocessing import TTA_VIEWS

    views = TTA_VIEWS if tta else ("center",)
    total = (n_images if n_images is not None else len(images)) * len(views)
    fn = forward_fn(model, policy, engine, preprocess.input_size, total)
    outputs = [predict_in_batches(fn, images, preprocess, policy, batch_size,
                                  f"{desc} ({view})" if desc and tta else desc, view) for view in views]
    return average_views(outputs) if tta else outputs[0]
