"""Forward-pass images/s of the default backbone in each precision, layout and engine this machine offers.

    python benchmarks/forward_speed.py [--batch-size 32] [--repeats 8]

EfficientNet-Lite0 (random weights: speed does not depend on them) at 224 px, inference mode, one batch
repeated after a warm-up batch. Rows: fp32 NCHW (the tutorials' default), fp32 channels_last, bf16 autocast +
channels_last (fast only where torch reports native bf16), and fp32 on ONNX Runtime (--engine onnxruntime).
"""

from __future__ import annotations

import argparse
import time

import torch


def images_per_s(forward, batch_size: int, repeats: int) -> float:
    forward()  # warm-up: allocations, kernel selection
    start = time.perf_counter()
    for _ in range(repeats):
        forward()
    return batch_size * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()

    import timm

    from transferlab.runtime.inference import OnnxRunner
    from transferlab.runtime.precision import cpu_has_native_bf16

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()
    x = torch.randn(args.batch_size, 3, 224, 224)
    rows = {}
    with torch.inference_mode():
        rows["fp32, NCHW"] = images_per_s(lambda: model(x), args.batch_size, args.repeats)
        model_cl = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        rows["fp32, channels_last"] = images_per_s(lambda: model_cl(x_cl), args.batch_size, args.repeats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows["bf16 autocast, channels_last"] = images_per_s(lambda: model_cl(x_cl), args.batch_size, args.repeats)
    runner = OnnxRunner(model.to(memory_format=torch.contiguous_format), input_size=224)
    rows["fp32, ONNX Runtime"] = images_per_s(lambda: runner(x), args.batch_size, args.repeats)

    print(f"EfficientNet-Lite0, 224 px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"native bf16: {cpu_has_native_bf16()}")
    print("| precision, layout | images/s |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
