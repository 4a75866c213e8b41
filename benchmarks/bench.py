"""`make bench`: the naive tutorial loop against transferlab's commands, one after the other, same data,
backbone and epochs; every transferlab command runs as a fresh subprocess (cold interpreter).

Prints a table of ratios measured in this one run and writes bench.json (seconds, images/s, ratios,
peak RSS, accuracy for both sides). Usage: python benchmarks/bench.py [DATA_DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from transferlab.data.discovery import is_image_file
from transferlab.runtime.precision import cpu_has_native_bf16

HERE = Path(__file__).resolve().parent
TL = [sys.executable, "-m", "transferlab.cli", "-q"]


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; return wall seconds, peak RSS of the process (MB) and its stdout."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"benchmark command failed ({code}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "stdout": out}


def accuracy_of(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["accuracy"]


def finetune_images_per_s(run_dir: Path) -> float:
    rows = [r for r in csv.DictReader(open(run_dir / "history.csv")) if r["stage"] == "finetune"]
    n_train = sum(json.loads((run_dir / "data_report.json").read_text())["counts"]["train"].values())
    return n_train * len(rows) / sum(float(r["seconds"]) for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir", nargs="?", default="data/hymenoptera")
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--epochs", type=int, default=10, help="frozen-head epochs on both sides")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    args = ap.parse_args()
    data, out = Path(args.data_dir), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cache = {"TRANSFERLAB_CACHE_DIR": str(out / "cache")}
    naive = [sys.executable, str(HERE / "naive_loop.py"), str(data)]
    n_val = sum(1 for p in (data / "val").rglob("*") if p.is_file() and is_image_file(p))
    r: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "processor": platform.processor()}, "data": str(data), "epochs": args.epochs}

    def step(name, cmd, env=None):
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        r[name] = run(cmd, env)
        return r[name]

    def naive_step(name, cmd):
        """Both sides are timed as whole processes (interpreter start and imports included); the naive
        loop's own timer, which starts after its imports, is kept as in_process_seconds."""
        result = step(name, cmd)
        stats = json.loads(result.pop("stdout"))
        stats["in_process_seconds"] = stats.pop("seconds")
        result |= stats
        return result

    nf = naive_step("naive_freeze", naive + ["--mode", "freeze", "--epochs", str(args.epochs)])
    common = ["--strategy", "freeze", "--epochs", str(args.epochs)]
    step("tl_freeze_cold", TL + ["train", str(data), "--out", str(out / "cold"), "--head", "256"] + common, cache)
    step("tl_freeze_warm", TL + ["train", str(data), "--out", str(out / "warm"), "--head", "512"] + common, cache)
    r["tl_freeze_cold"]["accuracy"] = accuracy_of(out / "cold")
    r["tl_freeze_warm"]["accuracy"] = accuracy_of(out / "warm")
    grid = TL + ["experiment", str(data), "--out", str(out / "grid"), "--strategies", "freeze", "--optimizers",
                 "sgd,adam", "--heads", "0,256,512x128", "--epochs", str(args.epochs)]
    step("tl_frozen_grid", grid, {"TRANSFERLAB_CACHE_DIR": str(out / "grid-cache")})

    nt = naive_step("naive_finetune", naive + ["--mode", "finetune", "--epochs", str(args.finetune_epochs)])
    step("tl_finetune", TL + ["train", str(data), "--out", str(out / "ft"), "--strategy", "unfreeze",
                              "--epochs", str(args.finetune_epochs), "--head-epochs", "0"], cache)
    r["tl_finetune"]["train_images_per_s"] = round(finetune_images_per_s(out / "ft"), 2)
    r["tl_finetune"]["accuracy"] = accuracy_of(out / "ft")

    npred = naive_step("naive_predict", naive + ["--mode", "predict"])
    # the product's defaults: `train` exported RUN_DIR/model.onnx, so predict runs it without torch
    tl_pred = step("tl_predict", TL + ["predict", str(out / "cold"), str(data / "val")])
    tl_pred.pop("stdout")
    # throughput after start-up: the extra images of a larger folder over the extra seconds they took
    n_all = sum(1 for p in data.rglob("*") if p.is_file() and is_image_file(p))
    pall = step("tl_predict_all", TL + ["predict", str(out / "cold"), str(data)])
    pall.pop("stdout")
    p32 = step("tl_predict_fp32", TL + ["predict", str(out / "cold"), str(data / "val"), "--precision", "fp32"])
    pbf = step("tl_predict_bf16", TL + ["predict", str(out / "cold"), str(data / "val"), "--precision", "bf16"])
    imports = step("startup_imports", [sys.executable, "-c", "import torch, timm, matplotlib.pyplot"])
    imports.pop("stdout")
    fast_imports = step("predict_imports", [sys.executable, "-c", "import transferlab.cli, transferlab.api, "
                                            "transferlab.runtime.onnx_classifier, onnxruntime, PIL.Image"])
    fast_imports.pop("stdout")
    exported = step("tl_export_int8", TL + ["export", str(out / "cold"), "--quantize", "int8"])
    exported["stdout"] = exported["stdout"].splitlines()
    int8 = json.loads((out / "cold" / "export.json").read_text())["files"]["model.int8.onnx"]
    r["int8"] = int8
    r["native_bf16"] = cpu_has_native_bf16()
    labels32 = [json.loads(line).get("label") for line in p32.pop("stdout").splitlines()]
    labelsbf = [json.loads(line).get("label") for line in pbf.pop("stdout").splitlines()]
    agreement = sum(a == b for a, b in zip(labels32, labelsbf, strict=True)) / len(labels32)

    naive_grid_seconds = 6 * nf["seconds"]  # the naive way runs each of the 6 grid configurations separately
    rows = [
        ("frozen, whole train command, cold cache", nf["seconds"], r["tl_freeze_cold"]["seconds"], 10),
        ("frozen, warm cache (second head size)", nf["seconds"], r["tl_freeze_warm"]["seconds"], 20),
        ("frozen grid 2 optimizers x 3 heads, one experiment", naive_grid_seconds, r["tl_frozen_grid"]["seconds"], 50),
    ]
    table = [(name, f"{a:.1f} s", f"{b:.1f} s", a / b, goal) for name, a, b, goal in rows]
    ft_ratio = r["tl_finetune"]["train_images_per_s"] / nt["train_images_per_s"]
    table.append(("fine-tune training images/s", f"{nt['train_images_per_s']:.1f}/s",
                  f"{r['tl_finetune']['train_images_per_s']:.1f}/s", ft_ratio, 2.5))
    naive_pred_ips = n_val / npred["seconds"]
    tl_pred_ips = n_val / r["tl_predict"]["seconds"]
    table.append((f"predict on a folder ({n_val} images), whole command, images/s", f"{naive_pred_ips:.1f}/s",
                  f"{tl_pred_ips:.1f}/s", tl_pred_ips / naive_pred_ips, 2.5))
    naive_steady = npred["predict_images_per_s"]  # its loop alone: decoding + forward, no start-up
    tl_steady = (n_all - n_val) / max(1e-9, pall["seconds"] - r["tl_predict"]["seconds"])
    r["tl_predict_all"]["steady_images_per_s"] = round(tl_steady, 2)
    table.append((f"predict throughput after start-up ({n_all} - {n_val} images), images/s", f"{naive_steady:.1f}/s",
                  f"{tl_steady:.1f}/s", tl_steady / naive_steady, 2.5))
    r["ratios"] = {name: round(ratio, 2) for name, _, _, ratio, _ in table}
    r["bf16_top1_agreement"] = agreement
    r["naive_settings"] = nf["settings"]
    (out / "bench.json").write_text(json.dumps(r, indent=2))
    print("| case | naive | transferlab | ratio | goal |\n|---|---|---|---|---|")
    for name, a, b, ratio, goal in table:
        print(f"| {name} | {a} | {b} | {ratio:.1f}x | >= {goal}x {'met' if ratio >= goal else 'NOT met'} |")
    print(f"| top-1 agreement bf16 (torch) vs fp32 (exported model) ({len(labels32)} images) | | | {agreement:.1%} "
          f"| >= 99% {'met' if agreement >= 0.99 else 'NOT met'} |")
    speeds = int8["images_per_s"]
    print(f"| int8 vs fp32 exported model on {int8['n_images']} test images: top-1 agreement {int8['agreement']:.1%}, "
          f"images/s | {speeds['fp32']}/s (fp32) | {speeds['int8']}/s (int8) | {int8['speedup']:.2f}x | "
          f"{'faster' if int8['speedup'] > 1 else 'NOT faster'} |")
    print(f"accuracy: naive frozen {nf['accuracy']:.4f}, transferlab frozen {r['tl_freeze_cold']['accuracy']:.4f}; "
          f"naive fine-tune {nt['accuracy']:.4f}, transferlab fine-tune {r['tl_finetune']['accuracy']:.4f}")
    # what bounds the cases that are not met, measured in this run
    print(f"start-up: a process that only imports torch, timm/torchvision and matplotlib takes "
          f"{imports['seconds']:.1f} s (the warm-cache train command: {r['tl_freeze_warm']['seconds']:.1f} s); "
          f"the torch-free predict command's imports take {fast_imports['seconds']:.2f} s (the whole command on "
          f"{n_val} images: {r['tl_predict']['seconds']:.1f} s)")
    print(f"native bf16 on this CPU (what torch reports): {r['native_bf16']}: transferlab's --precision auto "
          + ("computes in bf16 autocast (the naive loop in fp32, as the tutorials do)" if r["native_bf16"]
             else "computes in fp32 like the naive loop (emulated bf16 would be slower)"))
    print(f"written: {out / 'bench.json'}")


if __name__ == "__main__":
    main()
