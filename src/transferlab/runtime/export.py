"""The one ONNX exporter: the in-memory export the ONNX Runtime engine runs, and the file ``transferlab
export`` (and ``train``) writes.

The TorchScript-based exporter (``dynamo=False``): the torch.export one needs onnxscript and takes several
times longer for the same graph. Opset 17, fixed image size, dynamic batch axis.
"""

from __future__ import annotations

import copy
import io
import json
import warnings

import torch
from torch import nn

from .onnx_session import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES


def onnx_bytes(module: nn.Module, input_size: int, input_name: str = "x", output_names: tuple[str, ...] = ("y",)
               ) -> bytes:
    """``module`` (eval mode) as an ONNX graph for ``input_size`` x ``input_size`` images, batch axis dynamic."""
    buffer = io.BytesIO()
    example = torch.zeros(1, 3, input_size, input_size)
    axes = {name: {0: "n"} for name in (input_name, *output_names)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer chatter
        torch.onnx.export(module, example, buffer, input_names=[input_name], output_names=list(output_names),
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    return buffer.getvalue()


class ClassifierWithFeatures(nn.Module):
    """The exported graph of a trained model: class probabilities and the pooled features (what an
    "unknown image" score is computed from)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(x)
        return torch.softmax(self.model.head(features), dim=1), features


def classifier_onnx(model: nn.Module, metadata: dict) -> bytes:
    """A trained :class:`~transferlab.models.transfer.TransferModel` as ONNX (fp32, on the CPU, whatever
    device and layout it trains with), ``metadata`` stored as JSON under :data:`METADATA_KEY`."""
    import onnx

    cpu = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()
    graph = onnx.load_from_string(onnx_bytes(ClassifierWithFeatures(cpu), cpu.backbone.preprocess.input_size,
                                             INPUT_NAME, OUTPUT_NAMES))
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    graph.producer_name = "transferlab"
    return graph.SerializeToString()
