"""Which engine ``predict`` (and the web app) runs a run's model on: the one decision, made without torch.

The run's exported model on ONNX Runtime (:mod:`transferlab.runtime.onnx_classifier`) when the run holds a
current one and the options allow it (fp32 on the CPU, no test-time augmentation, ``engine`` auto or
onnxruntime); otherwise the torch :class:`~transferlab.run.Run`, with one log line saying why. Both have
``classes``, ``preprocess`` and ``iter_predictions(inputs, top_k, batch_size)``.
"""

from __future__ import annotations

import logging
import os

from .io.rundir import RunDir
from .options import DEVICES, ENGINES, PRECISIONS, check_choice

log = logging.getLogger("transferlab")


def load_predictor(directory: str | os.PathLike, *, precision: str = "auto", device: str = "auto",
                   engine: str = "auto", tta: bool | None = None):
    """The predictor for a run directory (see the module's documentation)."""
    for option, value, allowed in (("precision", precision, PRECISIONS), ("device", device, DEVICES),
                                   ("engine", engine, ENGINES)):
        check_choice(option, value, allowed)
    config = RunDir(directory).read_config()
    tta = bool(config["train"].get("tta", False)) if tta is None else tta
    reason = _needs_torch(precision, device, engine, tta)
    if reason is None:
        from .runtime.onnx_classifier import OnnxClassifier

        classifier, reason = OnnxClassifier.from_run(directory)
        if classifier is not None:
            return classifier
    log.info("predict runs on torch: %s", reason)
    from .run import Run

    run = Run.load(directory, precision=precision, device=device)
    run.tta, run.engine = tta, engine
    return run


def _needs_torch(precision: str, device: str, engine: str, tta: bool) -> str | None:
    if engine == "torch":
        return "--engine torch"
    if precision not in ("auto", "fp32") or device not in ("auto", "cpu"):
        return f"--precision {precision} --device {device} (the exported model runs fp32 on the CPU)"
    if tta:
        return "test-time augmentation (its views resize tensors)"
    return None
