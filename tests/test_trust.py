"""The trust layer's mechanisms on synthetic numbers and a tiny model: temperature scaling recovers a known
temperature and changes no prediction; conformal sets cover at the level asked; the nearest-neighbour
unknown score and its threshold; what a run stores, what predict/evaluate/serve add, and that a run without
a validation split is unchanged."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
from conftest import COLORS, TINY, make_class_folders, make_image

import transferlab
from transferlab.cli import main
from transferlab.io.rundir import RunDir
from transferlab.trust import calibration, conformal, unknown
from transferlab.trust.model import Trust

BASE_FIELDS = {"path", "label", "score", "top_k"}
TRUST_FIELDS = {"unknown", "unknown_score", "prediction_set"}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _draw(probs: np.ndarray, rng) -> np.ndarray:
    return (probs.cumsum(axis=1) > rng.random((len(probs), 1))).argmax(axis=1)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------------------------ calibration

def test_fitted_temperature_recovers_the_one_labels_were_drawn_with():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20_000, 5))
    labels = _draw(_softmax(logits / 2.0), rng)  # the model's probabilities are overconfident by T = 2
    probs = _softmax(logits)
    temperature, note = calibration.fit_temperature(probs, labels)
    assert note is None and abs(temperature - 2.0) < 0.1
    after = calibration.scaled(probs, temperature)
    assert (after.argmax(1) == probs.argmax(1)).all()  # no prediction changes
    report = calibration.calibration_report(labels[:3000], probs[:3000], temperature)
    assert report["ece_after"] < report["ece_before"] / 3
    low, high = report["ece_after_ci95"]
    assert low <= report["ece_after"] <= high
    assert sum(b["count"] for b in report["reliability_before"]) == 3000


def test_no_wrong_prediction_leaves_the_temperature_at_one():
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    temperature, note = calibration.fit_temperature(probs, np.array([0, 1, 0]))
    assert temperature == 1.0 and "not fitted" in note
    assert np.allclose(calibration.scaled(probs, 1.0), probs)


# --------------------------------------------------------------------------------------- conformal sets

def test_conformal_sets_cover_at_the_level_over_resplits_of_exchangeable_data():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(6, 0.4), size=3000)
    labels = _draw(probs, rng)
    coverages = []
    for _ in range(300):
        order = rng.permutation(len(labels))
        cal, test = order[:500], order[500:]
        threshold = conformal.fit_threshold(probs[cal], labels[cal], 0.9)
        coverages.append(conformal.set_report(probs[test], labels[test], threshold)["empirical_coverage"])
    assert 0.895 <= np.mean(coverages) <= 0.9 + 1 / 501 + 0.005


def test_too_few_calibration_images_give_every_class():
    probs = np.full((5, 3), 1 / 3)
    threshold = conformal.fit_threshold(probs, np.zeros(5, int), 0.9)  # rank ceil(6 * 0.9) = 6 > 5
    assert threshold == np.inf and conformal.prediction_sets(probs, threshold).all()


# ---------------------------------------------------------------------------------------------- unknown

def test_nearest_neighbour_score_and_threshold():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(200, 16)) + 3.0  # the known images' features share a direction
    score = unknown.NearestNeighbourScore(unknown.bank_of(train), k=1)
    assert score(train[:5]).max() < 1e-3  # a training image is its own nearest neighbour
    assert score(-train[:5]).min() > 1.5  # the opposite direction is far from every known image
    assert unknown.NearestNeighbourScore(unknown.bank_of(train[:3]), k=5).k == 3
    held_out, later = rng.normal(size=(400, 16)) + 3.0, rng.normal(size=(4000, 16)) + 3.0
    threshold = unknown.fit_threshold(score(held_out), 0.95)
    assert np.mean(score(later) <= threshold) >= 0.93  # about 95% of known images kept


def test_the_bank_is_bounded_normalised_and_seeded():
    features = np.random.default_rng(3).normal(size=(100, 8))
    bank = unknown.bank_of(features, seed=4, limit=10)
    assert bank.shape == (10, 8) and bank.dtype == np.float16
    assert np.allclose(np.linalg.norm(bank.astype(np.float32), axis=1), 1, atol=1e-3)
    assert (unknown.bank_of(features, seed=4, limit=10) == bank).all()


def test_trust_record_round_trip_gives_the_same_answers():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(300, 8))
    probs = _softmax(rng.normal(0, 2, (300, 3)))
    labels = _draw(probs, rng)
    trust = Trust.fit(probs[:100], labels[:100], features[:100], features[100:], keep_known=0.9, coverage=0.8)
    again = Trust.from_record(json.loads(json.dumps(trust.record())), trust.knn.bank.astype(np.float16))
    a, b = trust.apply(probs, features), again.apply(probs, features)
    assert np.allclose(a.probs, b.probs) and (a.unknown == b.unknown).all() and (a.sets == b.sets).all()
    assert np.allclose(a.unknown_score, b.unknown_score, atol=1e-6)


# ------------------------------------------------------------------------------------------------ runs

@pytest.fixture(scope="module")
def trusted_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    data = make_class_folders(root / "data", per_class=14)
    transferlab.train(data, out=root / "run", strategy="freeze", epochs=3, val_size=0.3, **TINY)
    return {"root": root, "data": data, "dir": root / "run"}


def test_a_run_with_a_validation_split_stores_the_trust_layer(trusted_run):
    run_dir = RunDir(trusted_run["dir"])
    for path in (run_dir.trust, run_dir.known_features, run_dir.reliability):
        assert path.is_file(), path
    metrics = run_dir.read_metrics()
    assert {"calibration", "unknown", "prediction_sets"} <= metrics.keys()
    record = json.loads(run_dir.trust.read_text())
    assert record["fitted_on"] == "validation" and record["n_calibration"] == 6  # 30% of 2 x (14 - 20% test)
    assert record["unknown"]["bank_size"] == 16 and record["weights"] == run_dir.weight_files(run_dir.read_config())


def test_predict_adds_fields_and_both_engines_agree(trusted_run):
    run_dir, images = trusted_run["dir"], sorted(trusted_run["data"].rglob("*.png"))[:6]
    rc, onnx_out, err = _cli(["predict", str(run_dir), *map(str, images)])
    assert rc == 0 and "predict runs on torch" not in err
    rc, torch_out, _ = _cli(["predict", str(run_dir), *map(str, images), "--engine", "torch", "--precision", "fp32"])
    onnx_rows, torch_rows = ([json.loads(line) for line in out.splitlines()] for out in (onnx_out, torch_out))
    for a, b in zip(onnx_rows, torch_rows, strict=True):
        assert a.keys() == b.keys() == BASE_FIELDS | TRUST_FIELDS
        assert a["label"] == b["label"] and a["unknown"] == b["unknown"] and a["prediction_set"] == b["prediction_set"]
        assert abs(a["score"] - b["score"]) < 1e-4 and abs(a["unknown_score"] - b["unknown_score"]) < 1e-4
    # score and top_k are the calibrated probabilities; the label is the model's own top class
    run = transferlab.load_run(run_dir, precision="fp32", device="cpu")
    from transferlab.data.discovery import Sample
    from transferlab.data.images import decode_samples

    decoded = decode_samples([Sample(p, "") for p in images], run.preprocess, progress=False).images
    raw = run.predict_tensors(decoded).numpy()
    expected = calibration.scaled(raw, run.trust.temperature)
    for row, p, q in zip(torch_rows, raw, expected, strict=True):
        assert row["label"] == run.classes[int(p.argmax())] and abs(row["score"] - q.max()) < 1e-5


def test_csv_has_the_trust_columns(trusted_run):
    image = str(next(trusted_run["data"].rglob("*.png")))
    rc, out, _ = _cli(["predict", str(trusted_run["dir"]), image, "--format", "csv"])
    header, line = out.splitlines()
    assert rc == 0 and header.endswith("error,unknown,unknown_score,prediction_set")
    assert line.split(",")[-3] in ("true", "false")


@pytest.mark.parametrize("options", [{"strategy": "unfreeze", "epochs": 1, "head_epochs": 1},
                                     {"strategy": "freeze", "epochs": 2, "tta": True}])
def test_fine_tuned_and_tta_runs_fit_on_the_final_model(tmp_path, options):
    data = make_class_folders(tmp_path / "data", per_class=10)
    run = transferlab.train(data, out=tmp_path / "run", val_size=0.3, **(TINY | options))
    assert run.trust is not None and run.trust.n_calibration == 4
    # the bank holds the final model's features of training images (here among train + validation)
    from transferlab.data.images import decode_samples
    from transferlab.runtime.inference import InferenceOptions, predict_logits_and_features

    run_dir = RunDir(run.directory)
    train_paths = {r["path"] for r in run_dir.read_test_predictions()}
    from transferlab.data.discovery import Sample

    samples = [Sample(p, "") for p in sorted(data.rglob("*.png")) if str(p.resolve()) not in train_paths]
    features = predict_logits_and_features(run.model, decode_samples(samples, run.preprocess, progress=False).images,
                                           run.policy, InferenceOptions("torch"))[1].numpy()
    similarity = unknown.normalised(features) @ run.trust.knn.bank.T
    assert (similarity.max(axis=0) > 1 - 2e-3).all()  # every bank row is one of these images' features


def test_a_run_without_a_validation_split_predicts_as_before(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=6)
    transferlab.train(data, out=tmp_path / "run", strategy="freeze", epochs=2, **TINY)
    run_dir = RunDir(tmp_path / "run")
    assert not run_dir.trust.exists() and not run_dir.known_features.exists()
    assert "calibration" not in run_dir.read_metrics()
    image = str(next(data.rglob("*.png")))
    rc, out, _ = _cli(["predict", str(run_dir.path), image])
    assert rc == 0 and json.loads(out).keys() == BASE_FIELDS


def test_trust_of_other_weights_is_ignored_and_retraining_removes_it(trusted_run, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(trusted_run["dir"], run_dir)
    record = json.loads((run_dir / "trust.json").read_text())
    record["weights"] = {"model.safetensors": "0" * 64}
    (run_dir / "trust.json").write_text(json.dumps(record))
    assert transferlab.load_run(run_dir).trust is None and "made for other weights" in caplog.text
    transferlab.train(trusted_run["data"], out=run_dir, strategy="freeze", epochs=2, export=False, **TINY)
    assert not (run_dir / "trust.json").exists() and not (run_dir / "known_features.safetensors").exists()
    assert not (run_dir / "reliability.png").exists()


def test_evaluate_reports_the_trust_figures_and_an_unknown_folder(trusted_run, tmp_path):
    others = tmp_path / "others"
    for i in range(5):
        make_image(others / f"green_{i}.png", COLORS["green"], seed=900 + i)
    rc, out, err = _cli(["evaluate", str(trusted_run["dir"]), str(trusted_run["data"]), "--out", str(tmp_path / "e"),
                         "--unknown", str(others)])
    assert rc == 0 and "exchangeable" in err and "AUROC" in out
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["unknown"]["n_unknown"] == 5 and 0 <= metrics["unknown"]["auroc"] <= 1
    assert metrics["prediction_sets"]["n"] == metrics["n_test"] == 28


def test_evaluate_streams_in_chunks_with_the_same_figures(trusted_run, tmp_path, monkeypatch):
    from transferlab import evaluation

    others = tmp_path / "others"
    for i in range(5):
        make_image(others / f"green_{i}.png", COLORS["green"], seed=900 + i)
    whole = transferlab.evaluate(trusted_run["dir"], trusted_run["data"], out=tmp_path / "whole", unknown_dir=others)
    held = []
    original = evaluation.Run.predict_outputs

    def recording(self, images, *args, **kwargs):
        held.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(evaluation, "EVALUATION_CHUNK", 3)
    monkeypatch.setattr(evaluation.Run, "predict_outputs", recording)
    chunked = transferlab.evaluate(trusted_run["dir"], trusted_run["data"], out=tmp_path / "chunks",
                                   unknown_dir=others)
    assert max(held) == 3 and sum(held) == 28 + 5  # never more than a chunk of decoded images at once
    assert {k: v for k, v in chunked.items() if k != "data_dir"} == {k: v for k, v in whole.items()
                                                                     if k != "data_dir"}


def test_evaluate_unknown_needs_a_trust_layer_and_options_are_checked(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", per_class=6)
    transferlab.train(data, out=tmp_path / "run", strategy="freeze", epochs=1, **TINY)
    assert main(["evaluate", str(tmp_path / "run"), str(data), "--unknown", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--unknown" in err and "--val-size" in err
    assert main(["train", str(data), "--out", str(tmp_path / "r2"), "--coverage", "1.5"]) == 2
    assert "--coverage 1.5" in capsys.readouterr().err


def test_the_web_app_adds_the_trust_fields(trusted_run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from transferlab.serve.app import ServeSettings, create_app

    image = next(trusted_run["data"].rglob("*.png")).read_bytes()
    with TestClient(create_app(trusted_run["dir"], ServeSettings(explain=False))) as client:
        [record] = client.post("/predict", files={"file": ("x.png", image, "image/png")}).json()
        info = client.get("/info").json()
    assert record.keys() == BASE_FIELDS | TRUST_FIELDS
    assert info["trust"]["coverage"] == 0.9 and info["trust"]["keep_known"] == 0.95


def test_the_experiment_report_shows_each_runs_calibration(tmp_path):
    from transferlab.api import run_experiment

    data = make_class_folders(tmp_path / "data", per_class=12)
    options = {k: v for k, v in TINY.items() if k != "backbone"} | {"val_size": 0.3}
    result = run_experiment(data, tmp_path / "exp", strategies="freeze", optimizers="adam", heads="0",
                            backbones=TINY["backbone"], epochs=2, options=options, audit=False)
    page = (tmp_path / "exp" / "report.html").read_text()
    assert result.directory and "reliability diagram" in page and "after temperature scaling" in page
