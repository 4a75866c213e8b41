"""Write the preprocessing fixtures of tests/test_preprocess_parity.py: real photos (from the bundled
hymenoptera data) saved in the modes decoding must handle, and the model input the torch path makes of each.

    python scripts/make_preprocess_golden.py tests/fixtures/preprocess

The golden arrays are what ``decode_for_model`` + ``eval_batch`` (the torch path) gave when this script was
run; the torch-free path must give the same numbers. Re-run it only on purpose: it redefines the reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.data.images import decode_for_model
from transferlab.models.preprocessing import PreprocessConfig, eval_batch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"bee": "data/hymenoptera/train/bees/1092977343_cb42b38d62.jpg",
           "ant": "data/hymenoptera/train/ants/0013035.jpg"}
# the default backbone's preprocessing, and a small one (64 px) that keeps the fixture small
CONFIGS = {"lite0": PreprocessConfig(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3),
           "small": PreprocessConfig(64, 73, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def variants(out: Path) -> list[Path]:
    """The photos as: plain JPEG, EXIF-rotated JPEG, CMYK JPEG, palette PNG with transparency, grey PNG,
    16-bit grey PNG, RGBA PNG with a transparent border."""
    bee = Image.open(ROOT / SOURCES["bee"]).convert("RGB")
    bee.thumbnail((320, 320))
    ant = Image.open(ROOT / SOURCES["ant"]).convert("RGB")
    ant.thumbnail((300, 300))
    files = []

    def save(image: Image.Image, name: str, **kwargs) -> None:
        image.save(out / name, **kwargs)
        files.append(out / name)

    save(bee, "plain.jpg", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: turn 90 degrees clockwise to display
    save(ant.transpose(Image.Transpose.ROTATE_90), "exif_rotated.jpg", exif=exif.tobytes(), quality=92)
    save(bee.convert("CMYK"), "cmyk.jpg", quality=92)
    palette = ant.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    save(palette, "palette.png", transparency=0)
    save(bee.convert("L"), "grey.png")
    grey16 = (np.asarray(ant.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    save(Image.fromarray(grey16), "grey16.png")
    rgba = bee.convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, dtype=np.uint8)
    alpha[:20, :] = 0
    rgba.putalpha(Image.fromarray(alpha))
    save(rgba, "rgba.png")
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    out = ap.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for path in variants(out):
        for name, cfg in CONFIGS.items():
            if name == "lite0" and path.name != "plain.jpg":
                continue  # one full-size reference is enough; the modes are checked at 64 px
            arrays[f"{path.name}:{name}"] = eval_batch([decode_for_model(path, cfg)], cfg)[0].numpy()
    np.savez_compressed(out / "golden.npz", **arrays)
    print(f"{len(arrays)} arrays in {out / 'golden.npz'}")


if __name__ == "__main__":
    main()
