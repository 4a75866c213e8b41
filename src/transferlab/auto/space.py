"""What ``--strategy auto`` searches: backbones x input resolutions x head sizes, and what each costs.

An option the user gave fixes that axis (``--backbone resnet50`` searches resolutions and heads of
resnet50 only; ``--image-size 384`` one resolution); the rest is searched. Feature sets are visited
cheapest first (every backbone at its own resolution, then every backbone at the larger one), so a tight
time limit still compares the backbones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..models.backbones import list_backbones
from ..runtime.precision import Policy
from ..training.strategies import apply_strategy

AUTO_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
AUTO_HEADS = ("0", "256")
# Small objects in large photos need more pixels: the second resolution is 1.4x the backbone's own.
AUTO_SCALES = (1.0, 1.4)


@dataclass(frozen=True)
class FeatureSet:
    """One frozen backbone at one input resolution (``image_size`` None: the backbone's own)."""

    backbone: str
    scale: float = 1.0
    image_size: int | None = None

    def size_for(self, native: int) -> int:
        """The input resolution: the given one, or the backbone's own times ``scale``, a multiple of 32."""
        if self.image_size is not None:
            return self.image_size
        return native if self.scale == 1.0 else int(round(native * self.scale / 32) * 32)


@dataclass(frozen=True)
class SearchSpace:
    feature_sets: tuple[FeatureSet, ...]
    heads: tuple[str, ...]

    @classmethod
    def of(cls, config, given: set[str]) -> SearchSpace:
        """The space for a TrainConfig; ``given``: the option names the user set (those axes are fixed)."""
        available = set(list_backbones())
        backbones = (config.backbone,) if "backbone" in given else tuple(b for b in AUTO_BACKBONES if b in available)
        if "image_size" in given and config.image_size is not None:
            sets = tuple(FeatureSet(b, image_size=config.image_size) for b in backbones)
        else:
            sets = tuple(FeatureSet(b, scale) for scale in AUTO_SCALES for b in backbones)
        heads = (config.head,) if "head" in given else AUTO_HEADS
        return cls(sets, heads)


def forward_gflops(model, image_size: int) -> float:
    """GFLOPs of one forward pass of ``model`` on one image (torch's FLOP counter, fp32 on the CPU): a cost
    that does not depend on what else the machine is doing, or on a warm feature cache."""
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters())
    image = torch.zeros(1, 3, image_size, image_size, device=parameter.device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def training_speed(model, policy: Policy, batch_size: int, image_size: int, bn: str = "frozen",
                   passes: int = 2) -> tuple[float, float]:
    """Measured (training images/s, inference images/s) of ``model`` fine-tuned as ``--strategy unfreeze``
    trains it (every layer, BatchNorm as ``bn``), on a random batch: the fastest of ``passes`` timed passes
    after one that warms up kernels and allocations (a slower pass is the machine being busy, not the model)."""
    strategy = apply_strategy(model, "unfreeze", bn=bn)
    batch = policy.prepare_input(torch.randn(batch_size, 3, image_size, image_size))
    target = torch.zeros(batch_size, dtype=torch.long, device=policy.device)
    params = [p for p in model.parameters() if p.requires_grad]
    seconds = {}
    for mode in ("train", "eval"):
        if mode == "train":
            strategy.set_train_mode(model)
        else:
            model.eval()
        timed = []
        for _ in range(1 + passes):
            started = time.perf_counter()
            with torch.set_grad_enabled(mode == "train"), policy.autocast():
                logits = model(batch)
            if mode == "train":
                torch.nn.functional.cross_entropy(logits.float(), target).backward()
                for p in params:
                    p.grad = None
            timed.append(time.perf_counter() - started)
        seconds[mode] = min(timed[1:])
    model.eval()
    return batch_size / seconds["train"], batch_size / seconds["eval"]
