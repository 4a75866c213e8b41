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

import torch

from .data.discovery import is_image_file
from .data.images import iter_decoded
from .errors import TransferlabError
from .io.rundir import RunConfigRecord, RunDir
from .models.build import ModelSpec, build_model
from .models.preprocessing import PreprocessConfig
from .runtime.inference import InferenceOptions, predict_logits
from .runtime.precision import Policy, resolve_policy

log = logging.getLogger("transferlab")


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
