"""Precision and device policy: the one place that decides dtype, autocast and memory layout."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import TransferlabError
from ..options import DEVICES, PRECISIONS


@dataclass(frozen=True)
class Policy:
    device: str  # cpu | cuda | cuda:<index> (one process of a DDP training) | mps
    precision: str  # fp32 | bf16 | fp16 (the resolved one)
    channels_last: bool

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.device_type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()  # page-locked host memory: the copy below runs asynchronously
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` intra-op threads. A head on cached features does microsecond-sized
    operations, where waking other threads costs more than the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_has_native_bf16() -> bool:
    """What torch reports about this CPU (AVX512-BF16 or AMX); emulated bf16 is several times slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise TransferlabError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TransferlabError("--device cuda: no CUDA device is available here")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TransferlabError("--device mps: no MPS device is available here")
    return device


def resolve_policy(precision: str = "auto", device: str = "auto") -> Policy:
    """auto: bf16 autocast + channels_last on CPUs with native bf16, fp32 + channels_last on other CPUs
    (channels_last alone is faster there), AMP fp16 + channels_last on CUDA."""
    if precision not in PRECISIONS:
        raise TransferlabError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    if dev == "cpu":
        if precision == "fp16":
            raise TransferlabError("--precision fp16: CPUs have no fp16 arithmetic units (it runs ~4x slower "
                                   "than fp32); use bf16 or fp32")
        if precision == "auto":
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
        return Policy("cpu", precision, channels_last=True)
    if dev == "cuda":
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return Policy("cuda", precision, channels_last=True)
    return Policy(dev, "fp32" if precision == "auto" else precision, channels_last=False)
