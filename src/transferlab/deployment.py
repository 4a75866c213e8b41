"""Ship a trained run: the ONNX model (fp32), and an int8 one quantized with ONNX Runtime, measured.

The fp32 file is the one the torch-free ``predict`` runs (:mod:`transferlab.runtime.onnx_classifier`);
``train`` writes it at the end of a standalone run, ``transferlab export`` (re)writes it and, with
``--quantize int8``, adds the int8 model: static quantization in the QDQ format with per-channel weights
(depthwise convolutions need them), calibrated on a few hundred images. The int8 model's top-1 agreement
with fp32 on the run's test split and the images/s of both are measured and written into export.json.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .data.decode import ImageDecodeError, available_cpus, decode_array
from .data.discovery import discover, is_image_file
from .errors import TransferlabError
from .io.digest import sha256_file
from .io.files import atomic_path, check_writable_dir
from .io.rundir import RunConfigRecord, RunDir
from .models.preprocessing import PreprocessConfig, eval_array
from .options import QUANTIZATIONS, check_choice
from .runtime.onnx_session import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, cpu_session

log = logging.getLogger("transferlab")

CALIBRATION_IMAGES = 300
MEASURE_BATCH = 32


@dataclass
class ExportResult:
    files: dict[str, Path] = field(default_factory=dict)  # "fp32" / "int8" -> the file written
    int8: dict | None = None  # agreement and speeds, as recorded in export.json


def export_metadata(config: RunConfigRecord, run_dir: RunDir, precision: str) -> dict:
    """What a consumer needs beside the graph: classes, preprocessing, the weights it came from."""
    return {"format_version": 1, "classes": config["classes"], "preprocess": config["preprocess"],
            "weights": run_dir.weight_files(config), "transferlab": __version__, "precision": precision,
            "input": INPUT_NAME, "outputs": list(OUTPUT_NAMES)}


def write_fp32(run_dir: RunDir, model, config: RunConfigRecord, target: Path | None = None) -> Path:
    """Export ``model`` (the run's trained model) to ONNX atomically; a file inside the run is recorded in
    export.json."""
    from .runtime.export import classifier_onnx

    target = Path(target) if target is not None else run_dir.onnx
    try:
        data = classifier_onnx(model, export_metadata(config, run_dir, "fp32"))
    except Exception as exc:  # a model with data-dependent control flow, an operator without ONNX support
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise TransferlabError(f"{target}: ONNX export failed ({type(exc).__name__}: {detail})") from None
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    if target.parent.resolve() == run_dir.path.resolve():
        run_dir.record_export(target.name, {"precision": "fp32", "sha256": sha256_file(target),
                                            "weights": run_dir.weight_files(config)})
    return target


def export_run(directory: str | os.PathLike, out: str | os.PathLike | None = None, *, quantize: str | None = None,
               calibration: str | os.PathLike | None = None) -> ExportResult:
    """Export a run to ONNX (``out``: the file to write; default RUN_DIR/model.onnx, or RUN_DIR/model.int8.onnx
    with ``quantize="int8"``). Checks every input before writing anything."""
    from .run import Run

    run_dir = RunDir(directory)
    config = run_dir.read_config()
    if quantize is not None:
        check_choice("quantize", quantize, QUANTIZATIONS)
    calibration_images = _calibration_images(config, run_dir, calibration) if quantize else None
    if out is not None:
        _check_out(Path(out), run_dir, quantize)
    run = Run.load(run_dir.path, precision="fp32", device="cpu")
    result = ExportResult()
    fp32_target = Path(out) if out is not None and quantize is None else run_dir.onnx
    result.files["fp32"] = write_fp32(run_dir, run.model, config, fp32_target)
    log.info("exported %s", result.files["fp32"])
    if quantize:
        int8_target = Path(out) if out is not None else run_dir.onnx_int8
        result.int8 = quantize_int8(result.files["fp32"], int8_target, calibration_images, run_dir, config)
        result.files["int8"] = int8_target
    return result


def _check_out(out: Path, run_dir: RunDir, quantize: str | None) -> None:
    """``--out`` must be writable and must not take the name the run gives the other precision's model."""
    check_writable_dir(out.parent, "--out")
    other = run_dir.onnx if quantize else run_dir.onnx_int8
    if out.resolve() == other.resolve():
        raise TransferlabError(f"--out {out}: that is the run's {'fp32' if quantize else 'int8'} model; "
                               "choose another file name")


def _calibration_images(config: RunConfigRecord, run_dir: RunDir, calibration: str | os.PathLike | None
                        ) -> tuple[list[Path], str]:
    """The images to calibrate on: every image under ``calibration``, or the run's training images (its
    test split left out, so the measured agreement is on images calibration never saw)."""
    if calibration is not None:
        folder = Path(calibration)
        if not folder.is_dir():
            raise TransferlabError(f"--calibration {calibration}: folder not found")
        return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p)), str(folder.resolve())
    train = config["train"]
    if not Path(train["data_dir"]).is_dir():
        raise TransferlabError(f"--quantize int8: the run's training folder {train['data_dir']} is gone; name a "
                               "folder of representative images with --calibration DIR")
    splits = discover(train["data_dir"], train.get("test_dir"), train.get("labels"))
    test = {str(Path(row["path"]).resolve()) for row in run_dir.read_test_predictions()}
    paths = [s.path for s in splits.train + (splits.val or []) if str(Path(s.path).resolve()) not in test]
    return paths, f"the training images of {train['data_dir']}"


def _decoded(paths: list[Path], preprocess: PreprocessConfig) -> tuple[list[Path], list[np.ndarray]]:
    kept, images = [], []
    for path in paths:
        try:
            images.append(decode_array(path, preprocess))
            kept.append(path)
        except ImageDecodeError:
            continue
    return kept, images


def _calibration_batches(paths: list[Path], source: str, preprocess: PreprocessConfig,
                         limit: int = CALIBRATION_IMAGES) -> list[dict]:
    """A seeded sample of ``limit`` images, preprocessed like the model's input, in batches of 10."""
    paths = list(paths)
    random.Random(0).shuffle(paths)
    _, images = _decoded(paths[: limit], preprocess)
    if not images:
        raise TransferlabError(f"--calibration: no decodable images in {source}")
    return [{INPUT_NAME: eval_array(images[i:i + 10], preprocess)} for i in range(0, len(images), 10)]


def quantize_int8(fp32: Path, target: Path, calibration: tuple[list[Path], str], run_dir: RunDir,
                  config: RunConfigRecord) -> dict:
    """Static QDQ int8 quantization (uint8 activations, int8 per-channel weights, min-max calibration; the
    final softmax stays in float), then the measured agreement and speed against fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    preprocess = PreprocessConfig.from_dict(config["preprocess"])
    batches = _calibration_batches(*calibration, preprocess)
    n_calibration = sum(len(b[INPUT_NAME]) for b in batches)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    log.info("int8: calibrating on %d images (%s)", n_calibration, calibration[1])
    with tempfile.TemporaryDirectory() as scratch:
        prepared, quantized = Path(scratch) / "prepared.onnx", Path(scratch) / "int8.onnx"
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            softmax = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Softmax"]
            quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=softmax)
            _mark_precision(quantized, "int8")
            measured = measure_against_fp32(fp32, quantized, run_dir, preprocess)
        except TransferlabError:
            raise
        except Exception as exc:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise TransferlabError(f"--quantize int8: ONNX Runtime could not quantize {fp32} "
                                   f"({type(exc).__name__}: {detail})") from None
        with atomic_path(target) as tmp:
            shutil.copyfile(quantized, tmp)
    entry = {"precision": "int8", "sha256": sha256_file(target), "weights": run_dir.weight_files(config),
             "calibration": {"source": calibration[1], "images": n_calibration}, **measured}
    if target.parent.resolve() == run_dir.path.resolve():
        run_dir.record_export(target.name, entry)
    return entry


def _mark_precision(path: Path, precision: str) -> None:
    """Quantization copies the fp32 model's metadata; the int8 file says what it is."""
    import onnx

    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = json.dumps(json.loads(prop.value) | {"precision": precision}, sort_keys=True)
    onnx.save(model, str(path))


def measure_against_fp32(fp32: Path, int8: Path, run_dir: RunDir, preprocess: PreprocessConfig) -> dict:
    """Top-1 agreement of the two models on the run's test images, and the images/s of each: the same
    preprocessed batches on the same threads, two passes each, alternating, the faster pass of each kept
    (a machine's speed drifts by 10-20% between seconds)."""
    paths = [Path(row["path"]) for row in run_dir.read_test_predictions()]
    _, images = _decoded([p for p in paths if p.is_file()], preprocess)
    if not images:
        return {"agreement": None, "n_images": 0, "images_per_s": None,
                "note": "the run's test images are not on this machine: agreement and speed not measured"}
    batches = [eval_array(images[i:i + MEASURE_BATCH], preprocess) for i in range(0, len(images), MEASURE_BATCH)]
    sessions = {name: cpu_session(path, available_cpus()) for name, path in (("fp32", fp32), ("int8", int8))}
    top1, speed = {}, {"fp32": 0.0, "int8": 0.0}
    for session in sessions.values():  # warm-up
        session.run(["probabilities"], {INPUT_NAME: batches[0]})
    for _ in range(2):
        for name, session in sessions.items():
            started = time.perf_counter()
            probs = [session.run(["probabilities"], {INPUT_NAME: b})[0] for b in batches]
            speed[name] = max(speed[name], round(len(images) / (time.perf_counter() - started), 1))
            top1[name] = np.concatenate(probs).argmax(axis=1)
    agreement = float((top1["fp32"] == top1["int8"]).mean())
    return {"agreement": round(agreement, 4), "n_images": len(images), "images_per_s": speed,
            "speedup": round(speed["int8"] / speed["fp32"], 2)}
