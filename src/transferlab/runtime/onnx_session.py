"""ONNX Runtime sessions, without torch: the CPU session options every transferlab engine uses."""

from __future__ import annotations

import importlib.util
import os

# The exported classifier's interface (written by transferlab.runtime.export, read by the torch-free predictor)
INPUT_NAME = "image"  # NCHW float32, preprocessed (resize, centre crop, normalise: see the metadata)
OUTPUT_NAMES = ("probabilities", "features")  # softmax over the classes; the pooled backbone features
METADATA_KEY = "transferlab"  # custom metadata: JSON with classes, preprocess, weights, version


def onnxruntime_available() -> bool:
    """ONNX Runtime runs the model; the onnx package is what torch's exporter writes with."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def cpu_session(model: bytes | str | os.PathLike, threads: int):
    """A CPU InferenceSession on ``threads`` intra-op threads (one inter-op thread: the graph is a chain),
    warnings silenced (ONNX Runtime logs shape-inference chatter at its default level)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
