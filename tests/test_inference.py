"""Inference engines: torch and ONNX Runtime give the same outputs; the choice and its fall-backs."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BACKBONE
from torch import nn

import transferlab
from transferlab.models.backbones import create_backbone
from transferlab.models.transfer import TransferModel
from transferlab.runtime.inference import MIN_IMAGES_FOR_EXPORT, OnnxRunner, forward_fn, resolve_engine
from transferlab.runtime.precision import Policy


def _model() -> TransferModel:
    backbone = create_backbone(TINY_BACKBONE, "none")
    backbone.preprocess = backbone.preprocess.with_input_size(64)
    torch.manual_seed(0)
    return TransferModel(backbone, 3, "16").eval()


CPU32 = Policy("cpu", "fp32", channels_last=True)
CPU16 = Policy("cpu", "bf16", channels_last=True)


def test_resolve_engine():
    assert resolve_engine("auto", CPU32) == "onnxruntime"
    assert resolve_engine("auto", CPU16) == "torch"  # bf16 autocast is torch's
    assert resolve_engine("torch", CPU32) == "torch"
    with pytest.raises(transferlab.TransferlabError, match="--engine onnxruntime: runs fp32 on the CPU only"):
        resolve_engine("onnxruntime", CPU16)
    with pytest.raises(transferlab.TransferlabError, match="--engine tvm"):
        resolve_engine("tvm", CPU32)


def test_onnxruntime_matches_torch_and_is_reused_until_the_weights_change():
    model = _model()
    x = torch.randn(5, 3, 64, 64)
    fn = forward_fn(model, CPU32, "auto", 64, MIN_IMAGES_FOR_EXPORT)
    assert isinstance(fn, OnnxRunner)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(fn(x), expected, atol=1e-4)
        features = forward_fn(model.features, CPU32, "auto", 64, 100, owner=model)
        assert isinstance(features, OnnxRunner) and features is not fn
        assert torch.allclose(features(x), model.features(x), atol=1e-4)
    assert forward_fn(model, CPU32, "auto", 64, 100) is fn  # same weights: the export is re-used
    with torch.no_grad():
        model.head[-1].bias.add_(1.0)  # an optimizer step changes weights in place
    changed = forward_fn(model, CPU32, "auto", 64, 100)
    assert changed is not fn
    with torch.no_grad():
        assert torch.allclose(changed(x), model(x), atol=1e-4)


def test_few_images_or_torch_engine_run_the_module_itself():
    model = _model()
    assert forward_fn(model, CPU32, "auto", 64, MIN_IMAGES_FOR_EXPORT - 1) is model
    assert forward_fn(model, CPU32, "torch", 64, 10_000) is model
    assert isinstance(forward_fn(model, CPU32, "onnxruntime", 64, 1), OnnxRunner)  # asked for: always


class _Unexportable(nn.Module):
    def forward(self, x):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            raise RuntimeError("data-dependent control flow")
        return x.mean((2, 3))


def test_failed_export_falls_back_to_torch_or_names_the_option():
    module = _Unexportable()
    assert forward_fn(module, CPU32, "auto", 8, 1000) is module
    with pytest.raises(transferlab.TransferlabError, match="--engine onnxruntime: export failed"):
        forward_fn(module, CPU32, "onnxruntime", 8, 1000)


def test_train_records_the_engine_and_both_engines_agree(tiny_data, tmp_path):
    from conftest import TINY

    runs = {}
    for engine in ("torch", "onnxruntime"):
        runs[engine] = transferlab.train(tiny_data, out=tmp_path / engine, strategy="unfreeze", epochs=1,
                                         head_epochs=1, engine=engine, cache_dir="none", **TINY)
        assert runs[engine].config["train"]["engine"] == engine
    import csv

    probs = {}
    for engine, run in runs.items():
        with open(run.directory / "test_predictions.csv", newline="") as fh:
            probs[engine] = torch.tensor([[float(v) for k, v in row.items() if k.startswith("prob_")]
                                          for row in csv.DictReader(fh)])
    assert torch.allclose(probs["torch"], probs["onnxruntime"], atol=1e-4)
    assert runs["torch"].metrics["accuracy"] == runs["onnxruntime"].metrics["accuracy"]


def test_inputs_for_cuda_are_pinned_before_an_asynchronous_copy(monkeypatch):
    """No GPU here: record what prepare_input does to the host tensor instead of copying it."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(("to", a, k)) or self)
    Policy("cuda", "fp16", channels_last=False).prepare_input(torch.zeros(2, 3, 8, 8))
    assert calls == ["pin", ("to", ("cuda",), {"non_blocking": True})]
    calls.clear()
    CPU32.prepare_input(torch.zeros(2, 3, 8, 8))
    assert "pin" not in calls  # pinning only pays for a copy to a GPU
