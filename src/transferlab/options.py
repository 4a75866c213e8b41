"""Allowed values of every option, defined once; imports nothing heavy (no torch).

Each choice is a ``Literal`` type (what type checkers see on :class:`~transferlab.config.TrainConfig`) and
the tuple of its values (what validation and the command line's ``choices=`` use). Defaults that depend on
another option live here too, beside the values they are keyed by.
"""

from __future__ import annotations

from typing import Literal, get_args

from .errors import TransferlabError

Strategy = Literal["freeze", "unfreeze", "partial"]
# what `train --strategy` accepts: a strategy, or "auto" (transferlab.auto searches for the best one)
TrainStrategy = Literal["freeze", "unfreeze", "partial", "auto"]
Optimizer = Literal["adamw", "adam", "sgd"]
BatchNormMode = Literal["frozen", "train"]
Pool = Literal["avg", "flatten"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda", "mps"]
Engine = Literal["auto", "torch", "onnxruntime"]
ClassWeights = Literal["none", "balanced"]
Sampler = Literal["shuffle", "balanced"]
# fine-tuning augmentation after the random resized crop + flip (models.preprocessing.TrainAugment)
AugmentPolicy = Literal["basic", "trivial", "randaugment"]
Quantization = Literal["int8"]  # transferlab export --quantize
PredictionFormat = Literal["json", "csv"]  # transferlab predict --format

STRATEGIES: tuple[str, ...] = get_args(Strategy)
TRAIN_STRATEGIES: tuple[str, ...] = get_args(TrainStrategy)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
BN_MODES: tuple[str, ...] = get_args(BatchNormMode)
POOL_MODES: tuple[str, ...] = get_args(Pool)
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEVICES: tuple[str, ...] = get_args(Device)
ENGINES: tuple[str, ...] = get_args(Engine)
CLASS_WEIGHTS: tuple[str, ...] = get_args(ClassWeights)
SAMPLERS: tuple[str, ...] = get_args(Sampler)
AUGMENT_POLICIES: tuple[str, ...] = get_args(AugmentPolicy)
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
PREDICTION_FORMATS: tuple[str, ...] = get_args(PredictionFormat)

DEFAULT_BACKBONE = "efficientnet_lite0"
# SGD (momentum 0.9) needs a larger step than the Adam family; one shared default would make an
# SGD-vs-Adam comparison unfair.
DEFAULT_LR = {"adamw": 1e-3, "adam": 1e-3, "sgd": 1e-2}
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-2, "adam": 0.0, "sgd": 1e-4}
DEFAULT_EPOCHS = {"freeze": 30, "unfreeze": 8, "partial": 8, "auto": 8}  # auto: its fine-tuning candidates
# A frozen run trains nothing but its head, so it needs at least one epoch; a fine-tuning run may stop after
# the head-first stage (--epochs 0).
MIN_EPOCHS = {"freeze": 1, "unfreeze": 0, "partial": 0, "auto": 0}


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


def parse_duration(text: str | float | int, option: str = "time-limit") -> float:
    """``"90s"``, ``"10m"``, ``"1.5h"`` or a number of seconds -> seconds (> 0)."""
    raw = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    scale = units.get(raw[-1:], None)
    number = raw[:-1] if scale else raw
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise TransferlabError(f"--{option} {text}: expected a duration like 90s, 10m or 1.5h") from None
    if not seconds > 0:
        raise TransferlabError(f"--{option} {text}: must be positive")
    return seconds


def check_choice(option: str, value, allowed: tuple) -> None:
    """The one-line error for a value outside ``allowed``, naming the command-line option."""
    if value not in allowed:
        raise TransferlabError(f"--{option} {value}: choose one of {', '.join(map(str, allowed))}")
