"""The exported model with real weights on real data (EfficientNet-Lite0, frozen, defaults otherwise):
parity with the fp32 torch model, the torch path (bf16 where the CPU has it) against the torch-free fp32
path, and int8 against fp32, on hymenoptera's 153 and cats_and_dogs' 1000 test images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import need_shared

import transferlab
from transferlab.api import load_predictor
from transferlab.data.discovery import discover
from transferlab.data.images import decode_samples
from transferlab.models.preprocessing import eval_batch
from transferlab.run import Run
from transferlab.runtime.onnx_classifier import OnnxClassifier
from transferlab.runtime.onnx_session import cpu_session

pytestmark = pytest.mark.integration
DATASETS = ("hymenoptera", "cats_and_dogs")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-real")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERLAB_CACHE_DIR", str(root / "cache"))
        for name in DATASETS:
            data = need_shared(name)
            run = transferlab.train(data, out=root / name, strategy="freeze")
            test = [s.path for s in discover(data).test]
            out[name] = {"data": data, "dir": root / name, "run": run, "test": test}
        yield out


def test_onnx_file_matches_the_fp32_torch_model_on_real_images(runs):
    entry = runs["hymenoptera"]
    run = Run.load(entry["dir"], precision="fp32", device="cpu")
    images = decode_samples(discover(entry["data"]).test, run.preprocess, progress=False).images
    session = cpu_session(entry["dir"] / "model.onnx", 2)
    worst_probs = worst_features = 0.0
    same_top1 = 0
    for start in range(0, len(images), 32):
        x = eval_batch(images[start:start + 32], run.preprocess)
        with torch.no_grad():
            features = run.model.features(x)
            probs = torch.softmax(run.model.head(features), 1).numpy()
        onnx_probs, onnx_features = session.run(None, {"image": x.numpy()})
        worst_probs = max(worst_probs, float(np.abs(onnx_probs - probs).max()))
        worst_features = max(worst_features, float(np.abs(onnx_features - features.numpy()).max()))
        same_top1 += int((onnx_probs.argmax(1) == probs.argmax(1)).sum())
    print(f"ONNX vs torch fp32 on {len(images)} images: probabilities {worst_probs:.1e}, features "
          f"{worst_features:.1e}, same top-1 {same_top1}/{len(images)}")
    assert len(images) == 153 and same_top1 == 153
    assert worst_probs < 1e-3 and worst_features < 1e-3


def test_torch_path_and_torch_free_path_agree_on_top1(runs):
    for name in DATASETS:
        entry = runs[name]
        fast = load_predictor(entry["dir"])
        assert isinstance(fast, OnnxClassifier)
        torch_path = load_predictor(entry["dir"], engine="torch")
        assert isinstance(torch_path, Run)
        a = [r["label"] for r in fast.iter_predictions(entry["test"], top_k=1)]
        b = [r["label"] for r in torch_path.iter_predictions(entry["test"], top_k=1)]
        agreement = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
        print(f"{name}: torch ({torch_path.policy.precision}) vs torch-free fp32 top-1 agreement "
              f"{agreement:.4f} on {len(a)} images")
        assert len(a) == {"hymenoptera": 153, "cats_and_dogs": 1000}[name]
        assert agreement >= 0.99


def test_int8_agrees_with_fp32_on_98_percent(runs):
    agree = total = 0
    for name in DATASETS:
        result = transferlab.api.export(runs[name]["dir"], quantize="int8")
        m = result.int8
        print(f"{name}: int8 vs fp32 top-1 agreement {m['agreement']:.4f} on {m['n_images']} images; images/s "
              f"fp32 {m['images_per_s']['fp32']}, int8 {m['images_per_s']['int8']} ({m['speedup']}x)")
        recorded = json.loads((runs[name]["dir"] / "export.json").read_text())["files"]["model.int8.onnx"]
        n_train = len(discover(runs[name]["data"]).train)  # calibration: 300 training images, or all of them
        assert recorded["agreement"] == m["agreement"] and recorded["calibration"]["images"] == min(300, n_train)
        agree += round(m["agreement"] * m["n_images"])
        total += m["n_images"]
    print(f"together: {agree}/{total} = {agree / total:.4f}")
    assert total == 1153
    assert agree / total >= 0.98
