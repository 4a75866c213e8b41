"""Test-time augmentation (--tta) and the balanced sampler (--sampler balanced)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_class_folders

import transferlab
from transferlab.cli import main
from transferlab.models.preprocessing import TTA_VIEWS, PreprocessConfig, eval_batch
from transferlab.runtime.inference import average_views
from transferlab.training.batches import _batch_indices, balanced_weights, epoch_generator


def _cfg(input_size=4, resize_size=6) -> PreprocessConfig:
    return PreprocessConfig(input_size, resize_size, "bilinear", (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))


def test_views_centre_flip_and_whole_image():
    image = torch.arange(3 * 6 * 9, dtype=torch.uint8).reshape(3, 6, 9)  # short side = resize_size 6
    cfg = _cfg()
    center = eval_batch([image], cfg)[0]
    assert torch.equal(center, eval_batch([image], cfg, "center")[0])
    assert torch.equal(center, image[:, 1:5, 2:6].float())
    assert torch.equal(eval_batch([image], cfg, "flip")[0], center.flip(-1))
    full = eval_batch([image], cfg, "full")[0]
    assert full.shape == (3, 4, 4) and not torch.equal(full, center)  # resized, not cropped from the middle
    assert torch.equal(eval_batch([image], cfg, "full_flip")[0], full.flip(-1))
    with pytest.raises(ValueError, match="view"):
        eval_batch([image], cfg, "rotate")


def test_average_views_averages_probabilities():
    a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    probs = torch.softmax(average_views([a, b]), 1)
    assert torch.allclose(probs, torch.tensor([[0.5, 0.5]]), atol=1e-6)
    c = torch.tensor([[1.0, -1.0]])
    expected = (torch.softmax(a, 1) + torch.softmax(c, 1)) / 2
    assert torch.allclose(torch.softmax(average_views([a, c]), 1), expected, atol=1e-6)


@pytest.fixture(scope="module")
def tta_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta")
    data = make_class_folders(root / "data", per_class=6)
    runs = {}
    for strategy in ("freeze", "unfreeze"):
        runs[strategy] = transferlab.train(data, out=root / strategy, strategy=strategy, epochs=2, head_epochs=1,
                                           tta=True, **TINY)
    return data, runs


def _test_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "test_predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("strategy", ["freeze", "unfreeze"])
def test_tta_test_predictions_are_the_mean_over_the_four_views(tta_runs, strategy):
    from transferlab.data.images import decode_for_model

    _, runs = tta_runs
    run = transferlab.load_run(runs[strategy].directory)
    assert run.config["train"]["tta"] is True and run.tta is True
    rows = _test_rows(run.directory)
    images = [decode_for_model(r["path"], run.preprocess) for r in rows]
    per_view = []
    with torch.no_grad():
        for view in TTA_VIEWS:
            per_view.append(torch.softmax(run.model(eval_batch(images, run.preprocess, view)), 1))
    expected = torch.stack(per_view).mean(0)
    saved = torch.tensor([[float(r[f"prob_{c}"]) for c in run.classes] for r in rows])
    assert torch.allclose(saved, expected, atol=1e-4)
    single = per_view[0]
    assert not torch.allclose(saved, single, atol=1e-4)  # the views really differ
    assert torch.allclose(run.predict_tensors(images), expected, atol=1e-4)  # predict inherits tta
    run.tta = False
    assert torch.allclose(run.predict_tensors(images), single, atol=1e-4)


def test_tta_freeze_caches_features_per_view(tta_runs, tmp_path, caplog):
    data, runs = tta_runs
    with caplog.at_level("INFO", logger="transferlab"):
        transferlab.train(data, out=tmp_path / "again", strategy="freeze", epochs=2, tta=True, **TINY)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features")]
    assert any(m.startswith("features (flip): ") and m.endswith(" 0 computed") for m in lines), lines
    assert any(m.startswith("features (full_flip): ") and m.endswith(" 0 computed") for m in lines), lines


def test_predict_and_evaluate_tta_flags(tta_runs, tmp_path, capsys):
    data, runs = tta_runs
    run_dir = str(runs["freeze"].directory)
    image = str(next((data / "red").iterdir()))
    scores = {}
    for flag in ("--tta", "--no-tta"):
        assert main(["predict", run_dir, image, flag]) == 0
        scores[flag] = json.loads(capsys.readouterr().out.splitlines()[0])["score"]
    assert scores["--tta"] != scores["--no-tta"]
    assert main(["evaluate", run_dir, str(data), "--no-tta", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["tta"] is False


def test_balanced_sampler_draws_classes_equally():
    labels = torch.tensor([0] * 90 + [1] * 10)
    weights = balanced_weights(labels)
    drawn = torch.cat([torch.cat(_batch_indices(100, 16, epoch_generator(0, e, "x"), weights)) for e in range(20)])
    minority = float((labels[drawn] == 1).float().mean())
    assert 0.45 < minority < 0.55
    plain = torch.cat(_batch_indices(100, 16, epoch_generator(0, 0, "x")))
    assert sorted(plain.tolist()) == list(range(100))  # shuffle: every image once per epoch


def test_train_with_balanced_sampler(tmp_path):
    data = tmp_path / "data"
    make_class_folders(data, per_class=12, classes=("red",))
    make_class_folders(data, per_class=3, classes=("blue",), start_seed=77)
    run = transferlab.train(data, out=tmp_path / "run", strategy="freeze", epochs=2, sampler="balanced",
                            test_size=0.34, **TINY)
    assert run.config["train"]["sampler"] == "balanced"
    with pytest.raises(transferlab.TransferlabError, match="--sampler"):
        transferlab.train(data, out=tmp_path / "bad", sampler="uniform", **TINY)
