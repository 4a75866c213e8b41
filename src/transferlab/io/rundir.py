"""A run directory: the stable contract between training, evaluation, prediction and reports.

The one module that names, writes and reads the files of a run; nothing else spells a file name.

RUN_DIR/model.safetensors   weights of backbone + head (contiguous tensors)
RUN_DIR/config.json         format_version, backbone and weights source, classes in index order,
                            preprocessing, every training option, versions, SHA-256 of the weights
RUN_DIR/metrics.json        test-split metrics; history.csv; data_report.json; *.png figures
RUN_DIR/test_predictions.csv  path, true, pred, score and per-class probabilities of each test image
RUN_DIR/model.onnx          the exported model (fp32; model.int8.onnx quantized), export.json: what was
                            exported from which weights, int8 agreement and speed
RUN_DIR/evaluations/<name>/ metrics.json, data_report.json, figures and a fingerprint of an ``evaluate``
RUN_DIR/checkpoint/         state.json + state-<stage>-<epoch>.safetensors while training runs
RUN_DIR/trust.json          the trust layer fitted on the validation split: temperature, unknown and
                            prediction-set thresholds; known_features.safetensors: the training features
                            "unknown" is measured against (:mod:`transferlab.trust`); reliability.png
RUN_DIR/auto.json, auto.md  ``--strategy auto``: every candidate's cross-validation score and cost, the
                            finalists' validation scores, the choice and why; RUN_DIR/auto/<name>/ the
                            finalists that were not chosen (complete run directories)

A frozen-backbone run of an experiment splits its weights: backbone.safetensors (a hard link to a
content-addressed file shared by the experiment's runs) and model.safetensors (the head); config.json's
``weight_files`` lists every weight file with its SHA-256.

Loading never executes code from the directory: JSON and safetensors only. torch and matplotlib are
imported only by the functions that write weights or figures, so reading a run's records stays light.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from .. import __version__
from ..errors import TransferlabError
from .digest import sha256_file
from .files import atomic_path, read_json, write_json, write_text

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
BACKBONE_FILE = "backbone.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
DATA_REPORT_FILE = "data_report.json"
TEST_PREDICTIONS_FILE = "test_predictions.csv"
CONFUSION_MATRIX_FIGURE = "confusion_matrix.png"
CLASS_DISTRIBUTION_FIGURE = "class_distribution.png"
TRAINING_CURVES_FIGURE = "training_curves.png"
EVALUATIONS_DIR = "evaluations"
FINGERPRINT_FILE = "fingerprint.txt"
ONNX_FILE = "model.onnx"
ONNX_INT8_FILE = "model.int8.onnx"
EXPORT_FILE = "export.json"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE_FILE = "state.json"
TRUST_FILE = "trust.json"
KNOWN_FEATURES_FILE = "known_features.safetensors"
RELIABILITY_FIGURE = "reliability.png"
AUTO_FILE = "auto.json"
AUTO_MARKDOWN_FILE = "auto.md"
AUTO_DIR = "auto"
HISTORY_COLUMNS = ["stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
RUN_FILES = (MODEL_FILE, CONFIG_FILE, METRICS_FILE, HISTORY_FILE, CONFUSION_MATRIX_FIGURE,
             CLASS_DISTRIBUTION_FIGURE, TRAINING_CURVES_FIGURE, DATA_REPORT_FILE)


class BackboneRecord(TypedDict):
    name: str
    weights: str
    weights_source: str
    license: str | None


class RunConfigRecord(TypedDict, total=False):
    """What config.json holds."""

    format_version: int
    created: str
    versions: dict[str, str]
    backbone: BackboneRecord
    classes: list[str]  # in index order
    preprocess: dict[str, Any]  # PreprocessConfig.to_dict()
    train: dict[str, Any]  # TrainConfig.to_dict(), paths absolute
    policy: dict[str, Any]  # device, precision, channels_last
    model_file: str
    model_sha256: str
    weight_files: dict[str, str]  # file name -> SHA-256, when the weights are split (experiments)


class MetricsRecord(TypedDict, total=False):
    """What metrics.json holds (see :func:`transferlab.metrics.compute_metrics`), plus timings."""

    accuracy: float
    accuracy_ci95: list[float]
    precision: float
    recall: float
    f1: float
    precision_weighted: float
    recall_weighted: float
    f1_weighted: float
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    classes: list[str]
    n_test: int
    roc_auc: float | None
    top5_accuracy: float
    ece: float
    train_seconds: float
    decode_seconds: float
    total_seconds: float
    data_dir: str  # evaluations
    tta: bool  # evaluations


@dataclass
class TestPredictions:
    """Per test image: its path, the true class index and the class probabilities."""

    paths: list[str]
    y_true: Any  # numpy int array
    probs: Any  # numpy float array, one row per image

    def csv_text(self, classes: list[str]) -> str:
        """path, true, pred, score (probability of pred), then one probability column per class."""
        import numpy as np

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "true", "pred", "score", *[f"prob_{c}" for c in classes]])
        for path, t, p in zip(self.paths, self.y_true, self.probs, strict=True):
            k = int(np.argmax(p))
            writer.writerow([str(Path(path).resolve()), classes[int(t)], classes[k], f"{float(p[k]):.6f}",
                             *[f"{float(v):.6f}" for v in p]])
        return buffer.getvalue()


@dataclass
class RunOutputs:
    """Everything a finished training writes into its run directory."""

    state: dict[str, torch.Tensor]  # the model's state_dict (backbone.* and head.*)
    config: RunConfigRecord
    metrics: MetricsRecord
    history: list[dict]
    data_report: dict
    test_predictions: TestPredictions | None = None
    trust: dict | None = None  # trust.json's record (transferlab.trust.model.Trust.record)
    known_features: Any = None  # numpy float16 (n, features): the bank "unknown" is measured against


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []


def _history_csv(history: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


class EvaluationDir:
    """RUN_DIR/evaluations/<name>/: what ``evaluate`` writes for one folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metrics = self.path / METRICS_FILE
        self.data_report = self.path / DATA_REPORT_FILE
        self.confusion_matrix = self.path / CONFUSION_MATRIX_FIGURE
        self.class_distribution = self.path / CLASS_DISTRIBUTION_FIGURE
        self.fingerprint = self.path / FINGERPRINT_FILE

    def write(self, metrics: MetricsRecord, data_report: dict, title: str) -> None:
        from ..plots import class_distribution_png, confusion_matrix_png

        write_json(self.metrics, metrics)
        write_json(self.data_report, data_report)
        confusion_matrix_png(metrics["confusion_matrix"], metrics["classes"], self.confusion_matrix, title=title)
        class_distribution_png(data_report["counts"], self.class_distribution)

    def read_metrics(self) -> MetricsRecord | None:
        return read_json(self.metrics) if self.metrics.is_file() else None

    def read_fingerprint(self) -> str | None:
        try:
            return self.fingerprint.read_text(encoding="utf-8")
        except OSError:
            return None

    def write_fingerprint(self, text: str) -> None:
        write_text(self.fingerprint, text)


class RunDir:
    """The files of one run directory, by name."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = self.path / CONFIG_FILE
        self.metrics = self.path / METRICS_FILE
        self.history = self.path / HISTORY_FILE
        self.data_report = self.path / DATA_REPORT_FILE
        self.test_predictions = self.path / TEST_PREDICTIONS_FILE
        self.model = self.path / MODEL_FILE
        self.backbone = self.path / BACKBONE_FILE
        self.confusion_matrix = self.path / CONFUSION_MATRIX_FIGURE
        self.class_distribution = self.path / CLASS_DISTRIBUTION_FIGURE
        self.training_curves = self.path / TRAINING_CURVES_FIGURE
        self.onnx = self.path / ONNX_FILE
        self.onnx_int8 = self.path / ONNX_INT8_FILE
        self.export = self.path / EXPORT_FILE
        self.checkpoint_dir = self.path / CHECKPOINT_DIR
        self.checkpoint_state = self.checkpoint_dir / CHECKPOINT_STATE_FILE
        self.trust = self.path / TRUST_FILE
        self.known_features = self.path / KNOWN_FEATURES_FILE
        self.reliability = self.path / RELIABILITY_FIGURE
        self.auto = self.path / AUTO_FILE
        self.auto_markdown = self.path / AUTO_MARKDOWN_FILE
        self.auto_dir = self.path / AUTO_DIR

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def evaluation(self, name: str) -> EvaluationDir:
        return EvaluationDir(self.path / EVALUATIONS_DIR / name)

    def checkpoint_tensors(self, stage: str, epoch: int) -> Path:
        return self.checkpoint_dir / f"state-{stage}-{epoch}.safetensors"

    def run_files(self) -> list[Path]:
        """The files that make up the run itself (not its evaluations, checkpoint or auto search), config.json
        last: moving them in this order moves a complete run."""
        files = [self.model, self.backbone, self.test_predictions, self.history, self.metrics, self.data_report,
                 self.confusion_matrix, self.class_distribution, self.training_curves, self.reliability,
                 self.known_features, self.trust, self.onnx, self.onnx_int8, self.export, self.config]
        return files

    def is_finished(self) -> bool:
        """config.json is written last, so with metrics.json beside it the run is complete."""
        return self.config.is_file() and self.metrics.is_file()

    # ----------------------------------------------------------------------------------------- reading

    def read_config(self) -> RunConfigRecord:
        """config.json, checked to be a transferlab run's (a one-line error otherwise)."""
        if not self.path.is_dir():
            raise TransferlabError(f"RUN_DIR {self.path}: folder not found")
        config = read_json(self.config)
        if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
            raise TransferlabError(f"{self.config}: not a transferlab run config "
                                   f"(format_version {FORMAT_VERSION} expected)")
        return config

    def read_metrics(self) -> MetricsRecord | None:
        return read_json(self.metrics) if self.metrics.is_file() else None

    def read_history(self) -> list[dict]:
        """history.csv rows as strings (the empty string where a value is missing)."""
        return _read_csv(self.history)

    def read_data_report(self) -> dict:
        return read_json(self.data_report) if self.data_report.is_file() else {}

    def read_test_predictions(self) -> list[dict]:
        return _read_csv(self.test_predictions)

    def weight_files(self, config: RunConfigRecord) -> dict[str, str | None]:
        """Weight file name -> expected SHA-256 (None: not recorded), each checked to lie in the run."""
        files = config.get("weight_files") or {MODEL_FILE: config.get("model_sha256")}
        if not isinstance(files, dict):
            raise TransferlabError(f"{self.config}: 'weight_files' must be an object")
        for name in files:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise TransferlabError(f"{self.config}: weight file {name!r} must be a file name "
                                       "inside the run directory")
        return files

    def read_weights(self, config: RunConfigRecord) -> dict[str, torch.Tensor]:
        """Every weight file's tensors, each file's SHA-256 checked against config.json."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for name, expected in self.weight_files(config).items():
            path = self.path / name
            if not path.is_file():
                raise TransferlabError(f"{path}: file not found")
            if expected and sha256_file(path) != expected:
                raise TransferlabError(f"{path}: SHA-256 differs from config.json (file changed or corrupted)")
            try:
                part = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as exc:
                raise TransferlabError(f"{path}: cannot read ({exc})") from None
            overlap = sorted(set(part) & set(state))
            if overlap:
                raise TransferlabError(f"{path}: tensor '{overlap[0]}' is also in another weight file")
            state.update(part)
        return state

    def weights_unchanged(self, config: RunConfigRecord) -> bool:
        """Whether every weight file is present with the SHA-256 config.json records."""
        try:
            return all(expected and sha256_file(self.path / name) == expected
                       for name, expected in self.weight_files(config).items())
        except OSError:
            return False

    def read_export(self) -> dict:
        """export.json (file name -> what it is, its SHA-256, the weights it came from); {} when absent."""
        try:
            record = read_json(self.export) if self.export.is_file() else {}
        except TransferlabError:
            return {}
        return record if isinstance(record, dict) else {}

    def record_export(self, name: str, entry: dict) -> None:
        """Add (or replace) one exported file's entry in export.json."""
        record = self.read_export()
        record.setdefault("format_version", 1)
        record.setdefault("files", {})[name] = entry
        write_json(self.export, record)

    def read_trust(self, config: RunConfigRecord) -> tuple[dict, Any] | None:
        """trust.json and its bank of training features (numpy), or None when the run has none; a record
        made for other weights (the weights were replaced since) is ignored with a warning."""
        import logging

        if not self.trust.is_file():
            return None
        record = read_json(self.trust)
        if not isinstance(record, dict) or record.get("weights") != self.weight_files(config):
            logging.getLogger("transferlab").warning("%s: made for other weights; calibration, unknown and "
                                                     "prediction sets are off", self.trust)
            return None
        if sha256_file(self.known_features) != record.get("known_features_sha256") \
                if self.known_features.is_file() else True:
            raise TransferlabError(f"{self.known_features}: missing, or its SHA-256 differs from trust.json")
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            bank = load_file(str(self.known_features))["features"]
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise TransferlabError(f"{self.known_features}: cannot read ({exc})") from None
        return record, bank

    def weights_description(self, config: RunConfigRecord) -> str:
        """How to name the weights in an error: the one file, or the folder and its files."""
        files = self.weight_files(config)
        return str(self.path / next(iter(files))) if len(files) == 1 else f"{self.path} ({', '.join(files)})"

    # ----------------------------------------------------------------------------------------- writing

    def write(self, outputs: RunOutputs, shared_dir: str | os.PathLike | None = None) -> None:
        """Write every file atomically; config.json last (it marks a complete run).

        ``shared_dir`` (frozen backbones in an experiment): the backbone tensors go to the content-addressed
        file ``shared_dir/<sha256>.safetensors`` (written once), hard-linked (or copied) into
        ``backbone.safetensors``; ``model.safetensors`` then holds the head only, and config.json lists both
        files with their SHA-256 in ``weight_files``.
        """
        config = dict(outputs.config)
        weight_files = self._write_weights(outputs.state, shared_dir)
        if outputs.test_predictions is not None:
            write_text(self.test_predictions, outputs.test_predictions.csv_text(config["classes"]))
        write_text(self.history, _history_csv(outputs.history))
        write_json(self.metrics, outputs.metrics)
        write_json(self.data_report, outputs.data_report)
        self._write_figures(outputs, config["classes"])
        config["model_sha256"] = sha256_file(self.model)
        if weight_files is not None:
            config["weight_files"] = {MODEL_FILE: config["model_sha256"], **weight_files}
        self._write_trust(outputs, self.weight_files(config))
        write_json(self.config, config)

    def _write_trust(self, outputs: RunOutputs, weights: dict) -> None:
        for stale in (self.trust, self.known_features):
            stale.unlink(missing_ok=True)
        if outputs.trust is None:
            return
        from safetensors.numpy import save_file

        with atomic_path(self.known_features) as tmp:
            save_file({"features": outputs.known_features}, str(tmp))
        write_json(self.trust, {**outputs.trust, "weights": weights,
                                "known_features_sha256": sha256_file(self.known_features)})

    def _write_figures(self, outputs: RunOutputs, classes: list[str]) -> None:
        from ..plots import class_distribution_png, confusion_matrix_png, training_curves_png

        confusion_matrix_png(outputs.metrics["confusion_matrix"], classes, self.confusion_matrix)
        class_distribution_png({k: v for k, v in outputs.data_report["counts"].items() if v}, self.class_distribution)
        if outputs.history:
            training_curves_png(outputs.history, self.training_curves)
        self.reliability.unlink(missing_ok=True)
        if outputs.metrics.get("calibration"):
            from ..plots import reliability_png

            reliability_png(outputs.metrics["calibration"], self.reliability)

    def _write_weights(self, state: dict[str, torch.Tensor],
                       shared_dir: str | os.PathLike | None) -> dict[str, str] | None:
        import torch
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in state.items()}
        weight_files = None
        if shared_dir is not None:
            backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
            state = {k: v for k, v in state.items() if k not in backbone}
            # one metadata key only: safetensors writes a metadata map in no fixed order, and the blob's name is
            # the SHA-256 of its bytes, so identical tensors must give identical bytes
            weight_files = {BACKBONE_FILE: _link_shared_blob(backbone, Path(shared_dir), self.backbone)}
        else:
            self.backbone.unlink(missing_ok=True)  # a stale file from an earlier run in this folder
        for stale in (self.onnx, self.onnx_int8, self.export):  # exports of earlier weights in this folder
            stale.unlink(missing_ok=True)
        with atomic_path(self.model) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "producer": f"transferlab {__version__}"})
        return weight_files


def _link_shared_blob(state: dict[str, torch.Tensor], shared_dir: Path, target: Path) -> str:
    """Store ``state`` once as ``shared_dir/<sha256>.safetensors`` and hard-link it to ``target``
    (copy where hard links are impossible, e.g. across file systems). Returns the SHA-256."""
    from safetensors.torch import save

    data = save(state, metadata={"format": "pt"})
    digest = hashlib.sha256(data).hexdigest()
    blob = shared_dir / f"{digest}.safetensors"
    if not blob.is_file() or sha256_file(blob) != digest:  # written once; a damaged blob is replaced
        with atomic_path(blob) as tmp:
            tmp.write_bytes(data)
    del data
    try:
        if target.exists() and os.path.samefile(blob, target):
            return digest
    except OSError:
        pass
    with atomic_path(target) as tmp:
        try:
            tmp.unlink()
            os.link(blob, tmp)
        except OSError:
            shutil.copyfile(blob, tmp)
    return digest
