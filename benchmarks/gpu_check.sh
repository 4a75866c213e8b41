#!/usr/bin/env bash
# The CUDA check, one short prepared script (about 2-4 minutes on one GPU; budget: 5): train freeze and unfreeze on
# the bundled hymenoptera on the GPU, check their test accuracy, and print training and inference images/s beside
# the same figures measured on this machine's CPU in the same run (a baseline measured here, not a number from
# another machine).
#
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--epochs N] [--data DIR] [--out DIR]
#
# --epochs: fine-tuning epochs of the unfreeze run (default 8, the strategy's default); the CPU baseline always
# fine-tunes 1 epoch (images/s per epoch do not depend on the count). --device cpu runs the device half on the CPU
# and skips the baseline: a dry run of the script itself. Exit status 1 when the device is missing or a test
# accuracy is below MIN_ACCURACY (default 0.90: both strategies measure 0.93-0.95 on a CPU over 3 seeds, so a
# lower one means a broken device path, not noise).
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda epochs=8 data=data/hymenoptera out=runs/gpu_check
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "gpu_check.sh: unknown option $1 (--device, --epochs, --data, --out)" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-.venv/bin/python}
export TRANSFERLAB_OFFLINE=1 MIN_ACCURACY=${MIN_ACCURACY:-0.90}

"$py" - "$device" <<'PY'
import sys
import torch
device = sys.argv[1]
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, {torch.get_num_threads()} CPU threads")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch.cuda.is_available() is False: no usable CUDA device (or a CPU-only torch)")
    print(f"device: {torch.cuda.get_device_name(0)}")
PY

rm -rf "$out"  # every figure comes from this run: fresh run directories and an empty feature cache per device
train() {  # NAME DEVICE [train options]
  local name=$1 dev=$2
  shift 2
  local started=$SECONDS
  "$py" -m transferlab.cli -q train "$data" --out "$out/$name" --device "$dev" --cache-dir "$out/cache-$dev" \
    "$@" > "$out/$name.log" 2>&1 || { cat "$out/$name.log" >&2; exit 1; }
  echo "$name: $((SECONDS - started)) s"
}
mkdir -p "$out"
train "freeze-$device" "$device" --strategy freeze
train "unfreeze-$device" "$device" --strategy unfreeze --epochs "$epochs" --head-epochs 2
if [ "$device" != cpu ]; then
  train freeze-cpu cpu --strategy freeze
  train unfreeze-cpu cpu --strategy unfreeze --epochs 1 --head-epochs 1
fi

"$py" - "$out" "$device" <<'PY'
"""Accuracy checks and the speed table, from the run directories just written."""
import csv, json, os, statistics, sys, time
from pathlib import Path

import torch

import transferlab
from transferlab.data.discovery import discover
from transferlab.data.images import decode_samples

out, device = Path(sys.argv[1]), sys.argv[2]
devices = [device] if device == "cpu" else [device, "cpu"]
minimum = float(os.environ["MIN_ACCURACY"])


def read(run: Path):
    metrics = json.loads((run / "metrics.json").read_text())
    counts = json.loads((run / "data_report.json").read_text())["counts"]
    with open(run / "history.csv", newline="") as fh:
        history = list(csv.DictReader(fh))
    return metrics, sum(counts["train"].values()), sum(counts["test"].values()), history


def training_speed(run: Path) -> float:
    """Training images/s of the fine-tuning epochs (the first left out when there are more: warm-up)."""
    _, n_train, _, history = read(run)
    seconds = [float(r["seconds"]) for r in history if r["stage"] == "finetune"]
    return n_train / statistics.median(seconds[1:] or seconds)


def feature_speed(run: Path) -> float:
    """Frozen run, cold cache: images/s of reading every image once and computing its features (decode + forward)."""
    metrics, n_train, n_test, _ = read(run)
    return (n_train + n_test) / metrics["decode_seconds"]


def inference_speed(run: Path, dev: str, repeats: int = 3) -> float:
    """Images/s of the trained model on the decoded test images (batch 64), after one warm-up pass."""
    loaded = transferlab.load_run(run, device=dev)
    config = json.loads((run / "config.json").read_text())["train"]
    splits = discover(config["data_dir"], config.get("test_dir"))
    images = decode_samples(splits.test or splits.train, loaded.preprocess, progress=False).images
    loaded.predict_tensors(images, batch_size=64)
    if dev == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        loaded.predict_tensors(images, batch_size=64)  # returns CPU tensors: every pass has finished
    return repeats * len(images) / (time.perf_counter() - started)


rows, failed = [], []
for strategy in ("freeze", "unfreeze"):
    values = []
    for dev in devices:
        accuracy = read(out / f"{strategy}-{dev}")[0]["accuracy"]
        values.append(accuracy)
        if dev == device and accuracy < minimum:
            failed.append(f"{strategy} on {dev}: test accuracy {accuracy:.4f} < {minimum}")
    rows.append((f"{strategy}: test accuracy", values, False))
rows.append(("freeze: frozen features images/s (decode + forward, cold cache)",
             [feature_speed(out / f"freeze-{d}") for d in devices], True))
rows.append(("unfreeze: fine-tuning training images/s", [training_speed(out / f"unfreeze-{d}") for d in devices], True))
rows.append(("unfreeze: inference images/s (decoded test images, batch 64)",
             [inference_speed(out / f"unfreeze-{d}", d) for d in devices], True))

print(f"\n| measure | {' | '.join(devices)} |" + (f" {device} / cpu |" if len(devices) > 1 else ""))
print("|---|" + "---|" * (len(devices) + (len(devices) > 1)))
for name, values, speed in rows:
    cells = [f"{v:.1f}" if speed else f"{v:.4f}" for v in values]
    ratio = f" {values[0] / values[1]:.1f}x |" if len(values) > 1 and speed else (" |" if len(values) > 1 else "")
    print(f"| {name} | {' | '.join(cells)} |{ratio}")
for line in failed:
    print(f"FAILED: {line}")
sys.exit(1 if failed else 0)
PY
