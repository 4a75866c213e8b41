"""The exported model of a run, run with ONNX Runtime, numpy and Pillow only: ``predict`` without torch.

A run's model.onnx is used only while it belongs to the run's weights: the SHA-256 of every weight file must
match config.json, and the weights the ONNX file was exported from (its metadata) must be those. Otherwise,
or for what this path does not cover (test-time augmentation views, which resize tensors; another device
or precision), :func:`transferlab.api.load_predictor` falls back to torch and says why.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import numpy as np

from .. import prediction
from ..data.decode import available_cpus, decode_array, stream
from ..io.rundir import RunDir
from ..models.preprocessing import PreprocessConfig, eval_array
from .onnx_session import INPUT_NAME, METADATA_KEY, cpu_session, onnxruntime_available

log = logging.getLogger("transferlab")


class OnnxClassifier:
    """Class probabilities for images from an exported transferlab model."""

    def __init__(self, session, classes: list[str], preprocess: PreprocessConfig, trust=None):
        self.session, self.classes, self.preprocess = session, list(classes), preprocess
        self.trust = trust  # transferlab.trust.model.Trust or None

    @classmethod
    def from_run(cls, directory: str | os.PathLike) -> tuple[OnnxClassifier | None, str]:
        """The run's exported model, or None and the reason it cannot be used (a bad run directory is an
        error, as for every command)."""
        run_dir = RunDir(directory)
        config = run_dir.read_config()
        if not run_dir.onnx.is_file():
            return None, f"{run_dir.onnx.name} is not in the run (`transferlab export {run_dir.path}` writes it)"
        if not onnxruntime_available():
            return None, "onnxruntime is not installed"
        if not run_dir.weights_unchanged(config):
            return None, "the weight files differ from config.json"
        try:
            session = cpu_session(run_dir.onnx, available_cpus())
            meta = json.loads(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))
        except Exception as exc:  # a damaged or foreign file: the torch path still works
            return None, f"{run_dir.onnx.name} cannot be read ({type(exc).__name__})"
        if not isinstance(meta, dict):
            return None, f"{run_dir.onnx.name} has no transferlab metadata"
        if meta.get("precision") != "fp32":
            return None, f"{run_dir.onnx.name} is not the fp32 model (its metadata says {meta.get('precision')})"
        if meta.get("weights") != run_dir.weight_files(config):
            return None, f"{run_dir.onnx.name} was exported from other weights (stale): run `transferlab export " \
                         f"{run_dir.path}` again"
        if meta.get("classes") != config["classes"] or meta.get("preprocess") != config["preprocess"]:
            return None, f"{run_dir.onnx.name} does not match config.json's classes or preprocessing"
        from ..trust.model import load_trust

        return cls(session, config["classes"], PreprocessConfig.from_dict(config["preprocess"]),
                   load_trust(run_dir, config)), ""

    def predict_arrays(self, images: list[np.ndarray]) -> np.ndarray:
        """Probabilities (n, classes) for decoded CHW uint8 images (short side = resize_size)."""
        probabilities = self.session.run(["probabilities"], {INPUT_NAME: eval_array(images, self.preprocess)})[0]
        return probabilities.astype(np.float32, copy=False)

    def predict_outputs(self, images: list[np.ndarray]) -> tuple:
        """(probabilities, :class:`~transferlab.trust.model.TrustedPredictions` or None), as
        :meth:`transferlab.run.Run.predict_outputs`."""
        if self.trust is None:
            return self.predict_arrays(images), None
        probs, features = self.session.run(["probabilities", "features"],
                                           {INPUT_NAME: eval_array(images, self.preprocess)})
        return probs.astype(np.float32, copy=False), self.trust.apply(probs, features)

    def iter_predictions(self, inputs: list[str | os.PathLike], top_k: int = 3,
                         batch_size: int = 32) -> Iterator[dict]:
        """The same records as :meth:`transferlab.run.Run.iter_predictions`."""
        prediction.check_prediction_options(top_k, batch_size)
        paths = prediction.expand_image_paths(inputs)
        decoded = stream(paths, lambda path: decode_array(path, self.preprocess), lookahead=2 * batch_size)
        return prediction.stream(paths, decoded, self.predict_outputs, self.classes, top_k, batch_size)
