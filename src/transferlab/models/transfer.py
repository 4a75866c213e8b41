"""The classifier: a backbone (features + pooling) followed by transferlab's head."""

from __future__ import annotations

import torch
from torch import nn

from ..options import parse_head_spec
from .backbones import Backbone
from .heads import make_head


@torch.no_grad()
def _pooled_dim(backbone: Backbone, pool: str, size: int) -> int:
    return int(backbone(torch.zeros(1, 3, size, size), pool=pool).shape[1])


def feature_dim(backbone: Backbone, pool: str) -> int:
    """Size of the pooled feature vector, found by one forward pass of a blank image. Average pooling
    gives one value per channel whatever the resolution, so a small image is enough (a full-size pass
    costs about a second on a laptop CPU); a flattened map needs the real size."""
    was_training = backbone.training
    backbone.eval()
    full = backbone.preprocess.input_size
    try:
        if pool != "flatten" and full > 64:
            try:
                return _pooled_dim(backbone, pool, 64)
            except Exception:  # a model that accepts only its own input size (a ViT)
                pass
        return _pooled_dim(backbone, pool, full)
    finally:
        backbone.train(was_training)


class TransferModel(nn.Module):
    def __init__(self, backbone: Backbone, num_classes: int, head: str = "256", dropout: float = 0.2,
                 pool: str = "avg"):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.head = make_head(feature_dim(backbone, pool), parse_head_spec(head), num_classes, dropout)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x, pool=self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
