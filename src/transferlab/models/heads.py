"""The classifier head: a small fully connected network on pooled backbone features."""

from __future__ import annotations

from torch import nn


def make_head(in_features: int, hidden: list[int], num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout before every Linear; ReLU after every hidden Linear."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
        width = size
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
