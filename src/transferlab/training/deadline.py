"""``--time-limit``: stop training cleanly when the next epoch would not end before the deadline."""

from __future__ import annotations

import logging
import time

from .loop import Callback, StopTraining, TrainLoop

log = logging.getLogger("transferlab")


class Deadline(Callback):
    """Ends a stage after an epoch when ``now + that epoch's time + reserve`` would pass ``deadline`` (a
    ``time.perf_counter()`` value), so the run stops within the limit plus at most one epoch (the first
    epoch of a stage always runs: a stage with no epoch has no weights to keep). ``reserve(epoch_seconds)``:
    the time still needed after training (testing, writing), estimated from the epoch's time.
    :class:`~transferlab.training.callbacks.KeepBestOnValidation` then keeps the best epoch so far."""

    order = 25  # after keep-best and early stopping, before the checkpoint

    def __init__(self, deadline: float, reserve=lambda epoch_seconds: 0.0) -> None:
        self.deadline, self.reserve = deadline, reserve
        self.stopped_after: tuple[str, int] | None = None

    def after_epoch(self, loop: TrainLoop, row: dict) -> None:
        if row["epoch"] >= loop.epochs:
            return
        needed = row["seconds"] + self.reserve(row["seconds"])
        if time.perf_counter() + needed > self.deadline:
            self.stopped_after = (loop.stage, row["epoch"])
            log.info("%s: stopping after epoch %d of %d: the time limit leaves no room for another epoch",
                     loop.stage, row["epoch"], loop.epochs)
            raise StopTraining
