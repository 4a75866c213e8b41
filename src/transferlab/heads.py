"""The classifier head: a small fully connected network on pooled backbone features."""

from __future__ import annotations

from torch import nn

from .errors import TransferlabError


def parse_head_spec(spec: str | int) -> list[int]:
    """``"256"`` -> [256]; ``"512x128"`` -> [512, 128]; ``"0"`` -> [] (a linear classifier)."""
    text = str(spec).strip().lower()
    try:
        sizes = [int(part) for part in text.split("x")]
    except ValueError:
        raise TransferlabError(f"--head {spec}: expected hidden-layer sizes like 256, 512x128 or 0") from None
    if sizes == [0]:
        return []
    if any(s <= 0 for s in sizes):
        raise TransferlabError(f"--head {spec}: layer sizes must be positive (0 alone means linear)")
    return sizes


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
