"""The training loop's events: epoch, batch and step events in order, the loop's state visible to callbacks,
and a callback that changes the gradients between ``before_step`` and the optimizer step."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, make_class_folders
from torch import nn

import transferlab
from transferlab.runtime.precision import Policy
from transferlab.training.batches import BatchOrder, feature_batches
from transferlab.training.loop import EVENTS, Callback, LoopSpec, TrainLoop


class Recorder(Callback):
    def __init__(self):
        self.events: list[tuple] = []


def _recording(name: str):
    def record(self, loop, *args):
        self.events.append((name, loop.epoch, loop.batch_index, None if loop.loss is None else loop.loss.item()))
    return record


for _name in EVENTS:  # the recorder listens to every event
    setattr(Recorder, _name, _recording(_name))


def _loop(callbacks, epochs=2, n=10, batch_size=4):
    torch.manual_seed(0)
    head = nn.Linear(3, 2)
    x, y = torch.randn(n, 3), torch.arange(n) % 2
    spec = LoopSpec(head, feature_batches(x, y, BatchOrder(batch_size, 0, "head")), nn.CrossEntropyLoss(),
                    torch.optim.SGD(head.parameters(), lr=0.5), epochs, Policy("cpu", "fp32", False), "head",
                    warmup_epochs=0)
    return TrainLoop(spec, callbacks), head


def test_events_fire_in_order_with_the_loop_state():
    recorder = Recorder()
    loop, _ = _loop([recorder], epochs=2, n=10, batch_size=4)  # batches of 4, 4, 2 -> 3 per epoch
    loop.fit()
    names = [e[0] for e in recorder.events]
    per_batch = ["before_batch", "before_step", "after_step", "after_batch"]
    assert names == ["before_fit"] + (["before_epoch"] + per_batch * 3 + ["after_epoch"]) * 2 + ["after_fit"]
    batch_events = [e for e in recorder.events if e[0] == "after_batch"]
    assert [(e[1], e[2]) for e in batch_events] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert all(e[3] is not None and e[3] > 0 for e in batch_events)  # the batch's loss is visible


class ZeroGradients(Callback):
    def before_step(self, loop):
        for p in loop.module.parameters():
            p.grad.zero_()


def test_a_callback_changes_gradients_before_the_step():
    loop, head = _loop([ZeroGradients()])
    before = {k: v.clone() for k, v in head.state_dict().items()}
    loop.fit()
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())  # plain SGD: zero gradient, no move
    moved_loop, moved = _loop([])
    moved_loop.fit()
    assert not all(torch.equal(before[k], v) for k, v in moved.state_dict().items())


class CountBatches(Callback):
    def __init__(self):
        self.batches: dict[str, int] = {}

    def after_batch(self, loop):
        self.batches[loop.stage] = self.batches.get(loop.stage, 0) + 1


def test_train_passes_extra_callbacks_to_every_stage(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=6)
    counter = CountBatches()
    transferlab.train(data, out=tmp_path / "run", strategy="unfreeze", head_epochs=2, epochs=1, callbacks=[counter],
                      **TINY)
    # 10 training images in batches of 8 and 2: two batches per epoch
    assert counter.batches == {"head": 2 * 2, "finetune": 1 * 2}


def test_a_failing_callback_names_itself_and_the_event():
    class Broken(Callback):
        def after_step(self, loop):
            raise ValueError("boom")

    loop, _ = _loop([Broken()])
    with pytest.raises(RuntimeError, match="callback Broken failed in after_step: boom"):
        loop.fit()
