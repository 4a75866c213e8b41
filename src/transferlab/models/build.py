"""The one build path: backbone -> image size -> head -> precision policy.

Training, ``Run.load`` and an experiment's reference rows all build their model here, so the three can
never disagree on how a configuration becomes a network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..runtime.precision import Policy
from .backbones import create_backbone
from .preprocessing import PreprocessConfig
from .transfer import TransferModel

log = logging.getLogger("transferlab")


@dataclass(frozen=True)
class ModelSpec:
    """What decides the architecture and its starting weights (a subset of TrainConfig)."""

    backbone: str
    weights: str = "default"
    image_size: int | None = None
    head: str = "256"
    dropout: float = 0.2
    pool: str = "avg"

    @classmethod
    def of(cls, config) -> ModelSpec:
        """The spec of a :class:`~transferlab.config.TrainConfig` (or a run's ``train`` dict)."""
        get = config.get if isinstance(config, dict) else lambda name: getattr(config, name)
        return cls(get("backbone"), get("weights"), get("image_size"), get("head"), get("dropout"), get("pool"))


def build_model(spec: ModelSpec, num_classes: int, policy: Policy, *, seed: int | None = None,
                preprocess: PreprocessConfig | None = None) -> TransferModel:
    """The classifier for ``spec``, on the policy's device and memory layout.

    ``seed``: the head is initialised right after ``torch.manual_seed(seed)``, so its initial weights do not
    depend on what the backbone's construction drew. ``preprocess``: the saved preprocessing of a run
    (``Run.load``), instead of the backbone's own at ``spec.image_size``.
    """
    backbone = create_backbone(spec.backbone, spec.weights)
    if preprocess is not None:
        backbone.preprocess = preprocess
    elif spec.image_size is not None:
        backbone.preprocess = backbone.preprocess.with_input_size(spec.image_size)
    if seed is not None:
        torch.manual_seed(seed)
    return policy.prepare_model(TransferModel(backbone, num_classes, spec.head, spec.dropout, spec.pool))
