"""A run directory: the stable contract between training, evaluation, prediction and reports.

RUN_DIR/model.safetensors   weights of backbone + head (contiguous tensors)
RUN_DIR/config.json         format_version, backbone and weights source, classes in index order,
                            preprocessing, every training option, versions, SHA-256 of the weights
RUN_DIR/metrics.json        test-split metrics; history.csv; data_report.json; *.png figures
RUN_DIR/test_predictions.csv  path, true, pred, score and per-class probabilities of each test image

A frozen-backbone run of an experiment splits its weights: backbone.safetensors (a hard link to a
content-addressed file shared by the experiment's runs) and model.safetensors (the head); config.json's
``weight_files`` lists every weight file with its SHA-256.

Loading never executes code from the directory: JSON and safetensors only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .data import is_image_file, iter_decoded
from .errors import TransferlabError
from .fileio import read_json, sha256_file
from .precision import Policy, resolve_policy
from .preprocessing import PreprocessConfig

log = logging.getLogger("transferlab")

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
BACKBONE_FILE = "backbone.safetensors"
TEST_PREDICTIONS_FILE = "test_predictions.csv"
CONFIG_FILE = "config.json"


def expand_image_paths(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files as given; folders expanded to the image files inside them (recursively, sorted)."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and is_image_file(p)
                            and not any(part.startswith(".") for part in p.relative_to(item).parts))
        else:
            paths.append(item)
    return paths


class Run:
    """A trained model with its configuration, loaded from (or just written to) a run directory."""

    def __init__(self, directory: str | os.PathLike, config: dict, model: torch.nn.Module,
                 policy: Policy | None = None):
        self.directory = Path(directory)
        self.config = config
        self.model = model.eval()
        self.policy = policy or resolve_policy(config.get("policy", {}).get("precision", "auto"))
        self.classes: list[str] = list(config["classes"])
        self.preprocess = PreprocessConfig.from_dict(config["preprocess"])
        self.tta: bool = bool(config.get("train", {}).get("tta", False))  # test-time augmentation
        self.engine: str = "auto"  # inference engine, see transferlab.inference

    def __repr__(self) -> str:
        return f"Run({str(self.directory)!r}, backbone={self.config['backbone']['name']!r}, classes={self.classes})"

    @property
    def metrics(self) -> dict | None:
        path = self.directory / "metrics.json"
        return read_json(path) if path.is_file() else None

    @classmethod
    def load(cls, directory: str | os.PathLike, precision: str = "auto", device: str = "auto") -> Run:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .backbones import create_backbone
        from .model import TransferModel

        directory = Path(directory)
        if not directory.is_dir():
            raise TransferlabError(f"RUN_DIR {directory}: folder not found")
        config = read_json(directory / CONFIG_FILE)
        if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
            raise TransferlabError(f"{directory / CONFIG_FILE}: not a transferlab run config "
                                   f"(format_version {FORMAT_VERSION} expected)")
        weight_files = config.get("weight_files") or {MODEL_FILE: config.get("model_sha256")}
        if not isinstance(weight_files, dict):
            raise TransferlabError(f"{directory / CONFIG_FILE}: 'weight_files' must be an object")
        state: dict[str, torch.Tensor] = {}
        for name, expected in weight_files.items():
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise TransferlabError(f"{directory / CONFIG_FILE}: weight file {name!r} must be a file name "
                                       "inside the run directory")
            model_path = directory / name
            if not model_path.is_file():
                raise TransferlabError(f"{model_path}: file not found")
            if expected and sha256_file(model_path) != expected:
                raise TransferlabError(f"{model_path}: SHA-256 differs from config.json (file changed or corrupted)")
            try:
                part = load_file(str(model_path))
            except (SafetensorError, OSError, ValueError) as exc:
                raise TransferlabError(f"{model_path}: cannot read ({exc})") from None
            overlap = sorted(set(part) & set(state))
            if overlap:
                raise TransferlabError(f"{model_path}: tensor '{overlap[0]}' is also in another weight file")
            state.update(part)
        train = config["train"]
        backbone = create_backbone(config["backbone"]["name"], weights="none")
        backbone.preprocess = PreprocessConfig.from_dict(config["preprocess"])
        model = TransferModel(backbone, len(config["classes"]), train["head"], train["dropout"], train["pool"])
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            where = model_path if len(weight_files) == 1 else f"{directory} ({', '.join(weight_files)})"
            raise TransferlabError(f"{where}: does not match config.json "
                                   f"({str(exc).splitlines()[0]})") from None
        policy = resolve_policy(precision, device)
        return cls(directory, config, policy.prepare_model(model), policy)

    # ------------------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict_tensors(self, images: list[torch.Tensor], batch_size: int = 32,
                        n_images: int | None = None) -> torch.Tensor:
        """Class probabilities for decoded images (uint8, short side = resize_size); averaged over the
        test-time augmentation views when ``self.tta``. ``n_images``: the total when the caller sends the
        images in several calls (it decides whether exporting the model to ONNX Runtime pays)."""
        from .training import predict_logits

        self.model.eval()
        logits = predict_logits(self.model, images, self.preprocess, self.policy, self.tta, batch_size,
                                engine=self.engine, n_images=n_images)
        return torch.softmax(logits, dim=1) if len(logits) else logits

    def iter_predictions(self, inputs: list[str | os.PathLike], top_k: int = 3,
                         batch_size: int = 32) -> Iterator[dict]:
        """One dict per image file: ``{path, label, score, top_k}`` or ``{path, error}``."""
        if top_k < 1:
            raise TransferlabError(f"--top-k {top_k}: must be at least 1")
        if batch_size < 1:
            raise TransferlabError(f"--batch-size {batch_size}: must be at least 1")
        top_k = min(top_k, len(self.classes))
        paths = expand_image_paths(inputs)

        def flush(chunk: list[tuple[Path, torch.Tensor | None, str | None]]) -> Iterator[dict]:
            good = [tensor for _, tensor, _ in chunk if tensor is not None]
            probs = iter(self.predict_tensors(good, batch_size, n_images=len(paths)) if good else [])
            for path, tensor, error in chunk:
                if tensor is None:
                    yield {"path": str(path), "error": error}
                    continue
                scores, idx = next(probs).topk(top_k)
                ranked = [[self.classes[i], round(float(s), 6)] for s, i in zip(scores, idx.tolist(), strict=True)]
                yield {"path": str(path), "label": ranked[0][0], "score": ranked[0][1], "top_k": ranked}

        # the next batch decodes in background threads while this one runs through the model
        chunk: list[tuple[Path, torch.Tensor | None, str | None]] = []
        for path, (tensor, error) in zip(paths, iter_decoded(paths, self.preprocess, lookahead=2 * batch_size),
                                         strict=True):
            chunk.append((path, tensor, error))
            if len(chunk) == batch_size:
                yield from flush(chunk)
                chunk = []
        yield from flush(chunk)

    def predict(self, inputs: list[str | os.PathLike] | str | os.PathLike, top_k: int = 3) -> list[dict]:
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        return list(self.iter_predictions(list(inputs), top_k=top_k))
