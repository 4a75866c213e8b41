"""The callbacks every training uses: keep the best epoch, stop early, log, checkpoint; and the fine-tuning
recipe's optional ones: a moving average of the weights (:class:`EmaWeights`), Mixup/CutMix (:class:`MixBatches`)."""

from __future__ import annotations

import copy
import logging
import time
import zlib

import numpy as np
import torch
from torch import nn

from ..io import checkpoint
from ..io.rundir import RunDir
from ..selection import epoch_score, improves
from .loop import Callback, StopTraining, TrainLoop

log = logging.getLogger("transferlab")


class KeepBestOnValidation(Callback):
    """Remembers the weights of the best epoch (:mod:`transferlab.selection`: validation accuracy, then the
    lower loss) and puts them back at the end. Without validation data the last epoch is kept.

    ``source``: the module whose weights are scored and kept, when not the loop's own (:class:`EmaWeights`'s
    average: validation then scores the average too)."""

    order = 10

    def __init__(self, source: nn.Module | None = None) -> None:
        self.source = source
        self.best_key: tuple[float, float] | None = None
        self.best_state: dict | None = None
        self.best_epoch: int | None = None

    def after_epoch(self, loop: TrainLoop, row: dict) -> None:
        score = epoch_score(row)
        if improves(score, self.best_key):
            self.best_key, self.best_epoch = score, row["epoch"]
            module = self.source if self.source is not None else loop.module
            self.best_state = copy.deepcopy(module.state_dict())

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


class EmaWeights(Callback):
    """An exponential moving average of the weights (``timm.utils.ModelEmaV3``), updated after every
    optimizer step, that becomes the module's weights at the end of the stage (what the run saves).

    Give :attr:`module` (the average) to :class:`KeepBestOnValidation` and to the validation, so the best
    epoch is chosen among averaged weights. timm's warm-up is on: the decay after ``k`` updates is
    ``min(decay, 1 - k ** -2/3)`` (the first update copies the weights), so a short fine-tuning (tens to
    hundreds of steps) averages its last steps rather than staying near the weights it started from
    (``0.999 ** 100`` = 0.9). Buffers are averaged as timm does: with ``--bn frozen`` BatchNorm statistics
    do not change (the average of a constant is that constant); with ``--bn train`` the running statistics
    are averaged too. The average and the update count go into the checkpoint, so a resumed run ends the same.
    """

    order = 5  # after_fit before KeepBestOnValidation's: the best average, when there is one, comes last

    def __init__(self, module: nn.Module, decay: float) -> None:
        from timm.utils import ModelEmaV3

        self.ema = ModelEmaV3(module, decay=decay, use_warmup=True)
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        """The averaged copy (always in eval mode)."""
        return self.ema.module

    def after_step(self, loop: TrainLoop) -> None:
        self.updates += 1
        self.ema.update(loop.module, step=self.updates)

    def state(self) -> tuple[dict, dict]:
        return {f"ema.{k}": v for k, v in self.ema.module.state_dict().items()}, {"updates": self.updates}

    def load_state(self, tensors: dict, meta: dict) -> None:
        average = {k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")}
        if average:
            self.ema.module.load_state_dict(average)
        self.updates = int(meta.get("updates", 0))

    def after_fit(self, loop: TrainLoop) -> None:
        loop.module.load_state_dict(self.ema.module.state_dict())


class MixBatches(Callback):
    """Mixup / CutMix (``timm.data.Mixup``) on every training batch before the forward pass: ``loop.x``
    becomes the mixed images, ``loop.y`` soft targets (rows of class probabilities, ``label_smoothing``
    included) for ``timm.loss.SoftTargetCrossEntropy``. With both alphas above 0 each batch uses one of the
    two (timm's ``switch_prob`` 0.5). timm's batch mode mixes a batch with its reverse and needs an even
    size: an odd batch leaves out its last sample. timm draws from numpy's global generator, which is
    seeded here per epoch from (seed, epoch, stage), as the loop seeds torch's: a resumed run mixes alike."""

    def __init__(self, mixup: float, cutmix: float, label_smoothing: float, num_classes: int) -> None:
        from timm.data import Mixup

        self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                         num_classes=num_classes)

    def before_epoch(self, loop: TrainLoop) -> None:
        np.random.seed(zlib.crc32(f"mix/{loop.seed}/{loop.epoch}/{loop.stage}".encode()))

    def before_batch(self, loop: TrainLoop) -> None:
        loop.x, loop.y = self(loop.x, loop.y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets of a batch (a batch of one: its smoothed one-hot target)."""
        from timm.data.mixup import mixup_target

        if len(y) < 2:
            return x, mixup_target(y, self.mix.num_classes, 1.0, self.mix.label_smoothing)
        if len(y) % 2:
            x, y = x[:-1], y[:-1]
        return self.mix(x, y)


class EarlyStopping(Callback):
    """Stops after ``patience`` epochs in a row that do not improve on the best one (the same rule as
    :class:`KeepBestOnValidation`)."""

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
        score = epoch_score(row)
        if score is None:
            return
        if improves(score, self.best):
            self.best, self.waited = score, 0
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


class SaveCheckpoint(Callback):
    """A checkpoint in RUN_DIR/checkpoint (see :mod:`transferlab.io.checkpoint`) after the first and the last
    epoch of a stage, and after every other epoch that ends ``min_interval`` seconds or more after the last
    checkpoint: a head epoch on cached features takes milliseconds, less than writing its checkpoint, so a
    killed run loses at most ``min_interval`` seconds of work instead of doubling the cost of every epoch.
    Resuming from an earlier epoch gives the same result (each epoch's randomness depends only on its
    number)."""

    order = 40

    def __init__(self, run_dir: RunDir, config: dict, earlier_history: list[dict], min_interval: float = 1.0) -> None:
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
        state = checkpoint.TrainingState(loop.stage, loop.history[-1]["epoch"], loop.module, loop.optimizer,
                                         loop.scheduler, self.earlier_history + loop.history)
        for cb in loop.callbacks:
            cb_tensors, cb_meta = cb.state()
            state.extra_tensors |= {f"cb.{type(cb).__name__}.{k}": v for k, v in cb_tensors.items()}
            state.callbacks[type(cb).__name__] = cb_meta
        checkpoint.save_checkpoint(self.run_dir, state, self.config)
