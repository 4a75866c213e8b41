"""ONNX export and the torch-free predict, on a tiny random-init model: the file and its metadata, parity
with the torch model, predict without torch (and its fall-backs), the README's consumer snippet, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_class_folders, make_image

import transferlab
from transferlab.cli import main
from transferlab.data.discovery import read_class_folders
from transferlab.data.images import decode_samples
from transferlab.runtime.onnx_session import METADATA_KEY, cpu_session

README = Path(__file__).resolve().parents[1] / "README.md"
# Imports of these fail in the subprocesses below: what runs there must not need them.
BLOCK_IMPORTS = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, _Blocked())
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_class_folders(root / "data", per_class=8)
    run = transferlab.train(data, out=root / "run", strategy="freeze", epochs=2, **TINY)
    return {"root": root, "data": data, "run": run, "dir": root / "run"}


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_train_writes_the_onnx_model_with_its_metadata(exported):
    run_dir, run = exported["dir"], exported["run"]
    session = cpu_session(run_dir / "model.onnx", 1)
    meta = json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    config = json.loads((run_dir / "config.json").read_text())
    assert meta["classes"] == ["blue", "red"] == config["classes"]
    assert meta["preprocess"] == config["preprocess"] and meta["preprocess"]["input_size"] == 64
    assert meta["weights"] == {"model.safetensors": config["model_sha256"]}
    assert meta["transferlab"] == transferlab.__version__
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["probabilities", "features"]
    for batch in (1, 3):  # fixed image size, any batch
        probs, features = session.run(None, {"image": np.zeros((batch, 3, 64, 64), np.float32)})
        assert probs.shape == (batch, 2) and features.shape[0] == batch
    record = json.loads((run_dir / "export.json").read_text())["files"]["model.onnx"]
    assert record["weights"] == meta["weights"] and record["precision"] == "fp32"
    assert run.metrics["inference"]["precision"] == "fp32"


def test_exported_model_matches_the_torch_model(exported):
    run = transferlab.load_run(exported["dir"], precision="fp32", device="cpu")
    images = decode_samples(read_class_folders(exported["data"]), run.preprocess, progress=False).images
    from transferlab.models.preprocessing import eval_batch

    x = eval_batch(images, run.preprocess)
    with torch.no_grad():
        features = run.model.features(x)
        probs = torch.softmax(run.model.head(features), 1)
    onnx_probs, onnx_features = cpu_session(exported["dir"] / "model.onnx", 1).run(None, {"image": x.numpy()})
    assert np.abs(onnx_probs - probs.numpy()).max() < 1e-3
    assert (onnx_probs.argmax(1) == probs.numpy().argmax(1)).all()
    assert np.abs(onnx_features - features.numpy()).max() < 1e-3


def _predict_in_fresh_process(argv: list[str], blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    code = (BLOCK_IMPORTS.format(blocked=set(blocked)) if blocked else "") + textwrap.dedent(f"""
        import sys
        from transferlab.cli import main
        rc = main({argv!r})
        print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH", file=sys.stderr)
        sys.exit(rc)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_predict_runs_without_torch_and_agrees_with_the_torch_path(exported):
    folder = str(exported["data"])
    done = _predict_in_fresh_process(["predict", str(exported["dir"]), folder, "--top-k", "2"], blocked=("torch",))
    assert done.returncode == 0, done.stderr
    assert "NO_TORCH" in done.stderr and "runs on torch" not in done.stderr
    fast = _records(done.stdout)
    rc, out, err = _cli(["predict", str(exported["dir"]), folder, "--top-k", "2", "--engine", "torch"])
    assert rc == 0 and "predict runs on torch: --engine torch" in err
    slow = _records(out)
    assert len(fast) == len(slow) == 16
    for a, b in zip(fast, slow, strict=True):
        assert a.keys() == b.keys() == {"path", "label", "score", "top_k"}
        assert a["path"] == b["path"] and a["label"] == b["label"]
        assert abs(a["score"] - b["score"]) < 1e-4


def test_csv_format_and_error_rows(exported, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    good = make_image(tmp_path / "good.png", (220, 40, 40), seed=3)
    rc, out, _ = _cli(["predict", str(exported["dir"]), str(good), str(broken), "--format", "csv"])
    lines = out.splitlines()
    assert rc == 1  # an unreadable file: reported, the others predicted
    assert lines[0] == "path,label,score,label_1,score_1,label_2,score_2,error"
    assert lines[1].startswith(f"{good},") and lines[1].endswith(",")
    cells = lines[1].split(",")
    assert cells[1] in ("blue", "red") and cells[3] == cells[1] and 0.5 <= float(cells[2]) <= 1.0
    assert lines[2] == f"{broken},,,,,,,not an image Pillow can identify"


def test_stale_export_falls_back_to_torch_and_never_predicts_with_it(exported, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(exported["dir"], run_dir)
    stale = (run_dir / "model.onnx").read_bytes()
    # the run is trained again in the same folder without an export; the old ONNX file is put back
    transferlab.train(exported["data"], out=run_dir, strategy="freeze", epochs=3, seed=1, export=False, **TINY)
    assert not (run_dir / "model.onnx").exists()  # writing a run removes exports of earlier weights
    (run_dir / "model.onnx").write_bytes(stale)
    image = str(next(exported["data"].rglob("*.png")))
    rc, out, err = _cli(["predict", str(run_dir), image])
    assert rc == 0 and "stale" in err and err.count("predict runs on torch") == 1
    expected = _records(_cli(["predict", str(run_dir), image, "--engine", "torch"])[1])
    assert _records(out) == expected
    # weights changed behind config.json's back: no fast path, and the torch path refuses them
    weights = run_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    rc, _, err = _cli(["predict", str(run_dir), image])
    assert rc == 2 and "SHA-256 differs" in err and "weight files differ" in err


def test_tta_and_other_devices_fall_back_with_a_reason(exported):
    image = str(next(exported["data"].rglob("*.png")))
    rc, _, err = _cli(["predict", str(exported["dir"]), image, "--tta"])
    assert rc == 0 and "test-time augmentation" in err
    rc, _, err = _cli(["predict", str(exported["dir"]), image, "--precision", "bf16"])
    assert rc == 0 and "--precision bf16" in err


def _readme_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- consumer snippet -->\n```python\n(.*?)```", text, re.S)
    assert match, "the consumer snippet is missing from the README"
    return match.group(1)


def test_readme_consumer_snippet_runs_as_written_without_torch_or_transferlab(exported, tmp_path):
    snippet = _readme_snippet()
    assert len(snippet.strip().splitlines()) <= 20
    (tmp_path / "runs").mkdir()
    os.symlink(exported["dir"], tmp_path / "runs" / "r1")
    from PIL import Image

    Image.fromarray(np.asarray(Image.open(next(exported["data"].rglob("red_1.png"))))).save(tmp_path / "photo.jpg",
                                                                                           quality=95)
    (tmp_path / "consumer.py").write_text(BLOCK_IMPORTS.format(blocked={"torch", "transferlab"}) + snippet)
    done = subprocess.run([sys.executable, "consumer.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    label, score = done.stdout.split()
    ours = _records(_cli(["predict", str(exported["dir"]), str(tmp_path / "photo.jpg")])[1])[0]
    assert label == ours["label"] and abs(float(score) - ours["score"]) < 1e-5


def test_export_command_rewrites_the_model(exported, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(exported["dir"], run_dir)
    (run_dir / "model.onnx").unlink()
    rc, out, _ = _cli(["export", str(run_dir)])
    assert rc == 0 and f"fp32: {run_dir / 'model.onnx'}" in out
    assert (run_dir / "model.onnx").read_bytes()[:2] and (run_dir / "export.json").is_file()
    other = tmp_path / "elsewhere" / "classifier.onnx"
    other.parent.mkdir()
    rc, out, _ = _cli(["export", str(run_dir), "--out", str(other)])
    assert rc == 0 and other.is_file()


def test_export_int8_measures_agreement_and_speed(exported, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(exported["dir"], run_dir)
    rc, out, _ = _cli(["export", str(run_dir), "--quantize", "int8"])
    assert rc == 0, out
    record = json.loads((run_dir / "export.json").read_text())["files"]["model.int8.onnx"]
    assert record["calibration"]["images"] == 12  # the training images: 16 minus the 4 of the test split
    assert record["n_images"] == 4 and 0.0 <= record["agreement"] <= 1.0
    assert record["images_per_s"]["fp32"] > 0 and record["images_per_s"]["int8"] > 0
    assert re.search(r"int8: top-1 agreement with fp32 [\d.]+% on 4 test images; [\d.]+ images/s fp32, "
                     r"[\d.]+ images/s int8", out)
    session = cpu_session(run_dir / "model.int8.onnx", 1)
    probs, _ = session.run(None, {"image": np.zeros((2, 3, 64, 64), np.float32)})
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1.0, atol=1e-3)
    assert json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])["precision"] == "int8"
    # an int8 file in model.onnx's place is never run as the fp32 model
    shutil.copyfile(run_dir / "model.int8.onnx", run_dir / "model.onnx")
    rc, _, err = _cli(["predict", str(run_dir), str(next(exported["data"].rglob("*.png")))])
    assert rc == 0 and "is not the fp32 model" in err


def test_metrics_say_what_computed_the_test_predictions(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=4)
    cache = {"cache_dir": str(tmp_path / "cache")}
    first = transferlab.train(data, out=tmp_path / "a", strategy="freeze", epochs=1, **TINY, **cache)
    assert first.metrics["inference"] == {"engine": "torch", "precision": "fp32", "device": "cpu",
                                          "features": {"from_cache": 0, "computed": 8}}  # 8 images: torch
    again = transferlab.train(data, out=tmp_path / "b", strategy="freeze", epochs=1, head="16", **TINY, **cache)
    assert again.metrics["inference"]["engine"] == "cache"
    assert again.metrics["inference"]["features"] == {"from_cache": 8, "computed": 0}


@pytest.mark.parametrize("case", ["not_a_run", "missing_calibration", "unwritable_out", "gone_training_folder",
                                  "int8_over_the_fp32_model"])
def test_bad_export_input_is_one_line_and_writes_nothing(exported, tmp_path, case):
    run_dir = tmp_path / "run"
    shutil.copytree(exported["dir"], run_dir)
    for name in ("model.onnx", "export.json"):
        (run_dir / name).unlink()
    argv = ["export", str(run_dir), "--quantize", "int8"]
    if case == "not_a_run":
        argv[1] = str(tmp_path)
    elif case == "missing_calibration":
        argv += ["--calibration", str(tmp_path / "nowhere")]
    elif case == "unwritable_out":
        (tmp_path / "blocker").write_text("a file")
        argv += ["--out", str(tmp_path / "blocker" / "model.onnx")]
    elif case == "int8_over_the_fp32_model":
        argv += ["--out", str(run_dir / "model.onnx")]
    else:
        config = json.loads((run_dir / "config.json").read_text())
        config["train"]["data_dir"] = str(tmp_path / "moved_away")
        (run_dir / "config.json").write_text(json.dumps(config))
    rc, _, err = _cli(argv)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("transferlab: error: "), err
    assert {"not_a_run": "config.json", "missing_calibration": "--calibration",
            "unwritable_out": "--out", "gone_training_folder": "--calibration DIR",
            "int8_over_the_fp32_model": "that is the run's fp32 model"}[case] in err
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".onnx", ".tmp")]
