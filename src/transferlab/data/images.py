"""Decoded images as torch tensors: the bridge from :mod:`transferlab.data.decode` to the models."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import TransferlabError
from ..progress import progress_bar
from . import decode
from .decode import ResizeSpec
from .discovery import Sample

log = logging.getLogger("transferlab")


@dataclass
class DecodedImages:
    """Samples that decoded, their uint8 tensors, and the files skipped with their reason."""

    samples: list[Sample]
    images: list[torch.Tensor]
    skipped: list[dict]


def decode_for_model(path: str | os.PathLike, cfg: ResizeSpec) -> torch.Tensor:
    """Decode to a CHW uint8 tensor whose short side is ``cfg.resize_size`` (aspect kept, capped)."""
    return torch.from_numpy(decode.decode_array(path, cfg))


def iter_decoded(paths: Sequence[str | os.PathLike], cfg: ResizeSpec, workers: int | None = None,
                 lookahead: int = 128) -> Iterator[tuple[torch.Tensor | None, str | None]]:
    """:func:`decode_for_model` over ``paths`` in background threads (see :func:`transferlab.data.decode.stream`):
    ``(tensor, None)`` or ``(None, reason)`` in input order, at most ``lookahead`` ahead of the consumer."""
    return decode.stream(paths, lambda path: decode_for_model(path, cfg), workers, lookahead)


def decode_samples(samples: list[Sample], cfg: ResizeSpec, strict: bool = False,
                   workers: int | None = None, desc: str = "decoding", progress: bool = True) -> DecodedImages:
    """Decode every sample once, in parallel threads."""
    return collect_decoded(samples, iter_decoded([s.path for s in samples], cfg, workers), strict, desc, progress)


def collect_decoded(samples: list[Sample], decoded: Iterable[tuple[torch.Tensor | None, str | None]],
                    strict: bool = False, desc: str = "decoding", progress: bool = True,
                    on_image: Callable[[Sample, torch.Tensor], None] | None = None) -> DecodedImages:
    """Sort decoding results into images and skipped files (``--strict``: the first failure is an
    error). ``on_image``, when given, receives each decoded image instead of it being kept."""
    ok_samples, images, skipped = [], [], []
    for sample, (tensor, reason) in progress_bar(zip(samples, decoded, strict=False), total=len(samples), desc=desc,
                                                 enabled=progress):
        if tensor is None:
            if strict:
                raise TransferlabError(f"{sample.path}: {reason} (--strict)")
            skipped.append({"path": str(sample.path), "label": sample.label, "reason": reason})
            continue
        ok_samples.append(sample)
        if on_image is not None:
            on_image(sample, tensor)
        else:
            images.append(tensor)
    if skipped:
        log.warning("skipped %d unreadable file(s) (listed with reasons in data_report.json), first: %s: %s",
                    len(skipped), skipped[0]["path"], skipped[0]["reason"])
    return DecodedImages(ok_samples, images, skipped)


