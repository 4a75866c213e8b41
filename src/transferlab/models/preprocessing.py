"""Preprocessing: the one owner of how pixels become model input.

A :class:`PreprocessConfig` travels with the weights (the backbone registry creates it, config.json
stores it) so that training, evaluation and prediction always resize, crop and normalise the way the
pretrained weights expect.

Images are decoded once (see :mod:`transferlab.data.decode`) to uint8 tensors whose short side is
``resize_size``; the transforms here take it from there: centre crop for evaluation, random resized
crop + flip (and optionally TrivialAugment or RandAugment) for training, then scaling and normalisation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where pixels are transformed: the config itself must load without it
    import torch

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class PreprocessConfig:
    input_size: int  # side of the square crop the network sees
    resize_size: int  # short side after resizing, before the crop
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def crop_pct(self) -> float:
        return self.input_size / self.resize_size

    @classmethod
    def from_crop_pct(cls, input_size: int, crop_pct: float, interpolation: str, mean, std) -> PreprocessConfig:
        # timm's rule (timm.data.transforms_factory): scale_size = floor(img_size / crop_pct)
        return cls(input_size, math.floor(input_size / crop_pct), interpolation, tuple(mean), tuple(std))

    def with_input_size(self, input_size: int) -> PreprocessConfig:
        """The same crop fraction at another resolution (``--image-size``)."""
        # floor(input_size / crop_pct) in exact integer arithmetic: the float ratio can land just below a
        # whole number (192/225 -> 224.99...), so the same size would not give back the same config.
        resize_size = input_size * self.resize_size // self.input_size
        return PreprocessConfig(input_size, resize_size, self.interpolation, self.mean, self.std)

    def to_dict(self) -> dict:
        return asdict(self) | {"crop_pct": round(self.crop_pct, 4)}

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        return cls(int(d["input_size"]), int(d["resize_size"]), d["interpolation"], d["mean"], d["std"])


def normalize(batch_uint8: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    import torch

    mean = torch.tensor(cfg.mean).view(-1, 3, 1, 1) * 255.0
    std = torch.tensor(cfg.std).view(-1, 3, 1, 1) * 255.0
    return (batch_uint8.float() - mean) / std


def center_crop(image: torch.Tensor | np.ndarray, size: int) -> torch.Tensor | np.ndarray:
    """Centre crop of a CHW tensor or array; images smaller than ``size`` were already resized up at decode."""
    _, h, w = image.shape
    top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return image[:, top : top + size, left : left + size]


# Deterministic views for test-time augmentation (``--tta``): the centre crop the weights expect, its
# mirror image, and the same two at crop fraction 1.0 (the whole short side, so objects near the border
# are kept). Deterministic views also make per-view frozen features cacheable.
TTA_VIEWS = ("center", "flip", "full", "full_flip")


def _view(image: torch.Tensor, cfg: PreprocessConfig, view: str) -> torch.Tensor:
    if view.startswith("full"):
        from torchvision.transforms.v2 import functional as F

        _, h, w = image.shape
        if min(h, w) != cfg.input_size:
            scale = cfg.input_size / min(h, w)
            size = [max(cfg.input_size, round(h * scale)), max(cfg.input_size, round(w * scale))]
            image = F.resize(image, size, interpolation=F.InterpolationMode(cfg.interpolation), antialias=True)
    image = center_crop(image, cfg.input_size)
    return image.flip(-1) if view.endswith("flip") else image


def eval_batch(images: list[torch.Tensor], cfg: PreprocessConfig, view: str = "center") -> torch.Tensor:
    """Decoded uint8 images (short side = resize_size) -> normalised float batch of one view
    (``center``, the default, or another of :data:`TTA_VIEWS`)."""
    import torch

    if view not in TTA_VIEWS:
        raise ValueError(f"view must be one of {TTA_VIEWS}, got {view!r}")
    return normalize(torch.stack([_view(im, cfg, view) for im in images]), cfg)


def eval_array(images: list[np.ndarray], cfg: PreprocessConfig) -> np.ndarray:
    """The ``center`` view of :func:`eval_batch` in numpy, for the torch-free predict path: decoded CHW uint8
    arrays -> a normalised float32 NCHW batch, the same numbers as the torch path's."""
    crops = [center_crop(image, cfg.input_size) for image in images]
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
    return (np.stack(crops).astype(np.float32) - mean) / std


AUGMENT_STEPS = {"basic": None, "trivial": "TrivialAugmentWide", "randaugment": "RandAugment"}  # see options


class TrainAugment:
    """Random resized crop (area fraction ``scale``) + horizontal flip on a decoded uint8 tensor, then
    normalisation. ``policy`` (:data:`~transferlab.options.AUGMENT_POLICIES`): ``basic`` is that alone;
    ``trivial`` adds torchvision's ``TrivialAugmentWide``, ``randaugment`` its ``RandAugment`` (2 ops,
    magnitude 9), both on the uint8 crop with bilinear interpolation, after the flip (timm's order).

    Draws from the global torch RNG; training seeds it per image (see :mod:`transferlab.training.batches`).
    """

    def __init__(self, cfg: PreprocessConfig, scale: tuple[float, float] = (0.35, 1.0), policy: str = "basic"):
        from torchvision.transforms import InterpolationMode, v2

        if policy not in AUGMENT_STEPS:
            raise ValueError(f"policy must be one of {tuple(AUGMENT_STEPS)}, got {policy!r}")
        self.cfg = cfg
        steps = [
            v2.RandomResizedCrop(
                cfg.input_size,
                scale=scale,
                interpolation=InterpolationMode(cfg.interpolation),
                antialias=True,
            ),
            v2.RandomHorizontalFlip(),
        ]
        if AUGMENT_STEPS[policy] is not None:
            steps.append(getattr(v2, AUGMENT_STEPS[policy])(interpolation=InterpolationMode.BILINEAR))
        self.transform = v2.Compose(steps)

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        """One decoded uint8 image -> its augmented uint8 crop."""
        return self.transform(image)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        import torch

        return normalize(torch.stack([self.crop(im) for im in images]), self.cfg)
