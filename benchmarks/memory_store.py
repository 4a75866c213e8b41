"""Peak anonymous memory and training images/s of fine-tuning at 1,000 and 20,000 images, with the decoded-image
store (the default) and with the images decoded into memory (``--cache-dir none``, the way before the store).

    python benchmarks/memory_store.py [--work /tmp/transferlab-memory] [--sizes 1000,20000] [--workers 0,2]

Generates JPEG photos-like images (320 x 256 px, two classes) once under ``--work``, then runs ``transferlab
train`` in a subprocess per row: a small random-init backbone (timm's test_efficientnet) at its own resolution (160
px crops from images decoded at 168 px short side, ~106 KB each; the default Lite0's 256 px short side takes ~2x
that per image), one fine-tuning epoch, no head stage, a test split of ``--test-images`` (200) at every size, so
testing costs the same (ONNX Runtime from 64 test images on: its fixed cost would otherwise show as growth). Peak
memory: RssAnon (anonymous resident memory, from /proc) summed over the process and all its children (DataLoader
workers, decode threads are in-process), sampled every 0.1 s. Memory-mapped pages read from the store's files are
file-backed, not counted: the kernel drops them under pressure. Training images/s: training images / the fine-
tuning epoch's seconds (history.csv). Each row starts with an empty store (its own cache folder), so the store's
rows include building it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TRAIN = ["--backbone", "timm/test_efficientnet", "--weights", "none", "--strategy", "unfreeze", "--head-epochs", "0",
         "--epochs", "1", "--batch-size", "32", "--precision", "fp32", "-q"]


def make_images(folder: Path, n: int) -> Path:
    """``n`` JPEGs in two class folders (smooth random colour fields: they compress like photos)."""
    from PIL import Image

    done = folder / ".complete"
    if done.is_file() and int(done.read_text()) == n:
        return folder
    rng = np.random.default_rng(0)
    for i in range(n):
        label = "a" if i % 2 else "b"
        small = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((320, 256), Image.Resampling.BICUBIC)
        path = folder / label / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=85)
    done.write_text(str(n))
    return folder


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def rss_anon_kib(root: int) -> int:
    """RssAnon of ``root`` and every descendant, in KiB."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
        except OSError:
            continue
        todo += _children(pid)
    return total


def run_row(data: Path, out: Path, cache: str, workers: int, options: list[str]) -> dict:
    command = [sys.executable, "-m", "transferlab", "train", str(data), "--out", str(out), "--cache-dir", cache,
               "--loader-workers", str(workers), *options, *TRAIN]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_anon_kib(proc.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({proc.returncode}): {' '.join(command)}\n{proc.stderr.read()[-3000:]}")
    history = list(csv.DictReader((out / "history.csv").open()))
    epoch_seconds = float(history[-1]["seconds"])
    report = json.loads((out / "data_report.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    n_train = sum(report["counts"]["train"].values())
    return {"peak_anon_mb": peak / 1024, "train_images_per_s": n_train / epoch_seconds, "wall_s": wall,
            "decode_s": metrics["decode_seconds"], "train_images": n_train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/transferlab-memory"))
    parser.add_argument("--sizes", default="1000,20000")
    parser.add_argument("--workers", default="0,2", help="--loader-workers values for the store's rows")
    parser.add_argument("--test-images", type=int, default=200)
    parser.add_argument("--engine", default="auto", help="--engine of the runs (testing; auto: ONNX Runtime "
                        "from 64 test images on)")
    parser.add_argument("--no-memory-rows", action="store_true", help="skip the --cache-dir none rows")
    args = parser.parse_args()

    import torch

    from transferlab.provenance import cpu_name

    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, native bf16 {torch.cpu._is_avx512_bf16_supported()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}")
    rows = []
    for n in sizes:
        data = make_images(args.work / f"images-{n}", n)
        options = ["--engine", args.engine, "--test-size", str(args.test_images / n)]
        modes = [(f"store, {w} loader workers", w) for w in (int(x) for x in args.workers.split(","))]
        if not args.no_memory_rows:
            modes.append(("in memory (--cache-dir none)", 0))
        for name, workers in modes:
            tag = f"{n}-{'memory' if 'memory' in name else f'store-w{workers}'}"
            cache = "none" if "memory" in name else str(args.work / f"cache-{tag}")
            subprocess.run(["rm", "-rf", str(args.work / f"run-{tag}"), *([] if cache == "none" else [cache])],
                           check=True)
            row = {"images": n, "mode": name, **run_row(data, args.work / f"run-{tag}", cache, workers, options)}
            rows.append(row)
            print(f"{n:>6} images  {name:<30} peak RssAnon {row['peak_anon_mb']:7.0f} MB  "
                  f"train {row['train_images_per_s']:6.1f} img/s  decode {row['decode_s']:6.1f} s  "
                  f"wall {row['wall_s']:6.1f} s", flush=True)
    print()
    for mode in dict.fromkeys(r["mode"] for r in rows):
        by_size = {r["images"]: r for r in rows if r["mode"] == mode}
        if len(sizes) > 1 and all(s in by_size for s in (sizes[0], sizes[-1])):
            small, large = by_size[sizes[0]], by_size[sizes[-1]]
            print(f"{mode}: +{large['peak_anon_mb'] - small['peak_anon_mb']:.0f} MB from {sizes[0]} to "
                  f"{sizes[-1]} images (goal: <= +400 MB); images/s ratio {sizes[-1]}/{sizes[0]} "
                  f"{large['train_images_per_s'] / small['train_images_per_s']:.2f}")


if __name__ == "__main__":
    main()
