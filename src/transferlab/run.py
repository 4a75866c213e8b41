"""A trained run, loaded from (or just written to) its run directory: predict with it.

The files themselves are named, written and read by :mod:`transferlab.io.rundir`; the model is built by
:func:`transferlab.models.build.build_model`, the one build path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from . import prediction
from .data.images import iter_decoded
from .errors import TransferlabError
from .io.rundir import RunConfigRecord, RunDir
from .models.build import ModelSpec, build_model
from .models.preprocessing import PreprocessConfig
from .prediction import check_prediction_options, expand_image_paths
from .runtime.inference import InferenceOptions, predict_logits, predict_logits_and_features
from .runtime.precision import Policy, resolve_policy
from .trust.model import load_trust

log = logging.getLogger("transferlab")


class Run:
    """A trained model with its configuration (config.json's record), loaded from or just written to a run
    directory."""

    def __init__(self, directory: str | os.PathLike, config: RunConfigRecord, model: torch.nn.Module,
                 policy: Policy | None = None):
        self.directory = Path(directory)
        self.config = config
        self.model = model.eval()
        self.policy = policy or resolve_policy(config.get("policy", {}).get("precision", "auto"))
        self.classes: list[str] = list(config["classes"])
        self.preprocess = PreprocessConfig.from_dict(config["preprocess"])
        self.tta: bool = bool(config.get("train", {}).get("tta", False))  # test-time augmentation
        self.engine: str = "auto"  # inference engine, see transferlab.runtime.inference
        self.trust = load_trust(RunDir(directory), config)  # calibration, unknown, prediction sets (or None)

    def __repr__(self) -> str:
        return f"Run({str(self.directory)!r}, backbone={self.config['backbone']['name']!r}, classes={self.classes})"

    @property
    def metrics(self) -> dict | None:
        return RunDir(self.directory).read_metrics()

    @classmethod
    def load(cls, directory: str | os.PathLike, precision: str = "auto", device: str = "auto") -> Run:
        run_dir = RunDir(directory)
        config = run_dir.read_config()
        state = run_dir.read_weights(config)
        policy = resolve_policy(precision, device)
        # the architecture of the training, its weights from the run directory
        spec = dataclasses.replace(ModelSpec.of(config["train"]), backbone=config["backbone"]["name"], weights="none")
        model = build_model(spec, len(config["classes"]), policy,
                            preprocess=PreprocessConfig.from_dict(config["preprocess"]))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise TransferlabError(f"{run_dir.weights_description(config)}: does not match config.json "
                                   f"({str(exc).splitlines()[0]})") from None
        return cls(run_dir.path, config, model, policy)

    # ------------------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict_tensors(self, images: list[torch.Tensor], batch_size: int = 32,
                        n_images: int | None = None) -> torch.Tensor:
        """Class probabilities for decoded images (uint8, short side = resize_size); averaged over the
        test-time augmentation views when ``self.tta``. ``n_images``: the total when the caller sends the
        images in several calls (it decides whether exporting the model to ONNX Runtime pays)."""
        self.model.eval()
        logits = predict_logits(self.model, images, self.policy, InferenceOptions(self.engine, self.tta, batch_size),
                                n_images=n_images)
        return torch.softmax(logits, dim=1) if len(logits) else logits
    def predict_arrays(self, images: list) -> np.ndarray:
        """Probabilities (n, classes) for decoded CHW uint8 numpy images: the interface of the torch-free
        :class:`~transferlab.runtime.onnx_classifier.OnnxClassifier` too."""
        return self.predict_tensors([torch.from_numpy(image) for image in images]).numpy()

    @torch.no_grad()
    def predict_outputs(self, images: list, batch_size: int = 32, n_images: int | None = None) -> tuple:
        """(probabilities, :class:`~transferlab.trust.model.TrustedPredictions` or None) for decoded images
        (tensors or CHW uint8 numpy arrays); the trust layer needs the pooled features, computed in the same
        forward pass."""
        images = [torch.from_numpy(i) if isinstance(i, np.ndarray) else i for i in images]
        if self.trust is None:
            return self.predict_tensors(images, batch_size, n_images).numpy(), None
        self.model.eval()
        logits, features = predict_logits_and_features(self.model, images, self.policy,
                                                       InferenceOptions(self.engine, self.tta, batch_size),
                                                       n_images=n_images)
        probs = torch.softmax(logits, dim=1).numpy()
        return probs, self.trust.apply(probs, features.numpy())

    def iter_predictions(self, inputs: list[str | os.PathLike], top_k: int = 3,
                         batch_size: int = 32) -> Iterator[dict]:
        """One record per image file (see :mod:`transferlab.prediction`); the next batch decodes in
        background threads while this one runs through the model."""
        check_prediction_options(top_k, batch_size)
        paths = expand_image_paths(inputs)
        decoded = iter_decoded(paths, self.preprocess, lookahead=2 * batch_size)

        def predict(images: list[torch.Tensor]):
            return self.predict_outputs(images, batch_size, n_images=len(paths))

        return prediction.stream(paths, decoded, predict, self.classes, top_k, batch_size)

    def predict(self, inputs: list[str | os.PathLike] | str | os.PathLike, top_k: int = 3) -> list[dict]:
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        return list(self.iter_predictions(list(inputs), top_k=top_k))
