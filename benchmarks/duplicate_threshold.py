"""Measure the near-duplicate threshold of the audit and the leakage check (docs/audit.md).

    python benchmarks/duplicate_threshold.py [THRESHOLD]

For every image of hymenoptera (../shared/data): the cosine similarity of its frozen features
(efficientnet_lite0, the default preprocessing and precision) to those of a JPEG re-encoding at quality 90
and 70, a copy resized to 80% and a horizontal flip; and for hymenoptera, cats_and_dogs, oxford17 and
aid_dev the most similar pairs of distinct files. Prints the share of copies above THRESHOLD (default: the
product's) and the highest similarities between different files.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from transferlab.audit.duplicates import NEAR_DUPLICATE_THRESHOLD
from transferlab.data.decode import load_rgb
from transferlab.data.discovery import Sample, discover
from transferlab.features import FeatureCache, FeatureExtractor, cache_root
from transferlab.models.build import ModelSpec, build_model
from transferlab.runtime.precision import resolve_policy

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
def _save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


VARIANTS = {
    "JPEG quality 90": lambda im, p: _save(im, p.with_suffix(".jpg"), quality=90),
    "JPEG quality 70": lambda im, p: _save(im, p.with_suffix(".jpg"), quality=70),
    "resized to 80%": lambda im, p: _save(im.resize((round(im.width * 0.8), round(im.height * 0.8)),
                                                    Image.Resampling.BICUBIC), p.with_suffix(".png")),
    "horizontal flip": lambda im, p: _save(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), p.with_suffix(".png")),
}


def unit_features(extractor: FeatureExtractor, samples: list[Sample]) -> tuple[list[Sample], np.ndarray]:
    found = extractor.extract(samples).features
    kept = [s for s in samples if s in found]
    x = np.stack([found[s].float().numpy() for s in kept])
    return kept, x / np.linalg.norm(x, axis=1, keepdims=True)


def main(threshold: float) -> None:
    policy = resolve_policy("auto", "auto")
    model = build_model(ModelSpec("efficientnet_lite0"), 2, policy)
    extractor = FeatureExtractor(model, policy, FeatureCache(cache_root(None)))
    print(f"threshold {threshold}; efficientnet_lite0, {policy.device} {policy.precision}")
    splits = discover(SHARED / "hymenoptera")
    originals, x = unit_features(extractor, splits.train + splits.test)
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in VARIANTS.items():
            copies = [Sample(make(load_rgb(s.path), Path(tmp) / f"{name[:4]}{i}"), s.label)
                      for i, s in enumerate(originals)]
            _, y = unit_features(extractor, copies)
            sims = (x * y).sum(axis=1)
            print(f"  {name:16s} share above: {np.mean(sims > threshold):.1%}  min {sims.min():.3f}  "
                  f"5th percentile {np.percentile(sims, 5):.3f}  median {np.median(sims):.3f}")
    for dataset in ("hymenoptera", "cats_and_dogs", "oxford17", "aid_dev"):
        found = discover(SHARED / dataset)
        samples, z = unit_features(extractor, found.train + (found.val or []) + (found.test or []))
        sims = z @ z.T
        upper = np.triu_indices(len(z), 1)
        values = sims[upper]
        order = np.argsort(-values)[:6]
        top = ", ".join(f"{values[k]:.3f} ({samples[upper[0][k]].path.name} / {samples[upper[1][k]].path.name})"
                        for k in order)
        print(f"  {dataset}: {len(samples)} images, {int(np.sum(values > threshold))} pairs above; highest: {top}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else NEAR_DUPLICATE_THRESHOLD)
