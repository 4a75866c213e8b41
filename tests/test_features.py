"""The frozen-feature cache: hits skip the backbone, changes invalidate, damage is repaired."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLORS, make_class_folders, make_image

from transferlab.data.discovery import Sample, read_class_folders
from transferlab.features import FeatureCache, FeatureExtractor, model_key
from transferlab.models.backbones import create_backbone
from transferlab.models.transfer import TransferModel
from transferlab.runtime.precision import resolve_policy


def tiny_model(pool: str = "avg", image_size: int = 64) -> TransferModel:
    backbone = create_backbone("timm/test_efficientnet", weights="none")
    backbone.preprocess = backbone.preprocess.with_input_size(image_size)
    torch.manual_seed(0)
    return TransferModel(backbone, 2, head="0", dropout=0.0, pool=pool).eval()


class CallCounter:
    def __init__(self, module: torch.nn.Module):
        self.images = 0
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.images += inputs[0].shape[0]


@pytest.fixture
def samples(tmp_path: Path) -> list[Sample]:
    return read_class_folders(make_class_folders(tmp_path / "data", per_class=3))


def test_second_pass_is_served_from_cache_without_running_the_backbone(tmp_path, samples):
    model, policy = tiny_model(), resolve_policy("fp32", "cpu")
    cache = FeatureCache(tmp_path / "cache")
    counter = CallCounter(model.backbone)
    first = FeatureExtractor(model, policy, cache).extract(samples)
    assert (first.hits, first.misses, counter.images) == (0, 6, 6)
    second = FeatureExtractor(model, policy, cache).extract(samples)
    assert (second.hits, second.misses, counter.images) == (6, 0, 6)
    for sample in samples:
        assert torch.equal(first.features[sample], second.features[sample])


def test_changed_image_is_recomputed_and_others_are_not(tmp_path, samples):
    model, policy = tiny_model(), resolve_policy("fp32", "cpu")
    cache = FeatureCache(tmp_path / "cache")
    before = FeatureExtractor(model, policy, cache).extract(samples)
    changed = samples[0]
    make_image(changed.path, COLORS["green"], seed=99)
    after = FeatureExtractor(model, policy, cache).extract(samples)
    assert (after.hits, after.misses) == (5, 1)
    assert not torch.equal(before.features[changed], after.features[changed])


def test_every_key_part_changes_the_model_key():
    policy = resolve_policy("fp32", "cpu")
    base = tiny_model()
    keys = {model_key(base, policy)}
    flat = tiny_model(pool="flatten")
    keys.add(model_key(flat, policy))
    bigger = tiny_model(image_size=96)
    keys.add(model_key(bigger, policy))
    keys.add(model_key(base, resolve_policy("bf16", "cpu")))
    other_weights = tiny_model()
    with torch.no_grad():
        next(other_weights.backbone.parameters()).add_(1.0)
    keys.add(model_key(other_weights, policy))
    assert len(keys) == 5
    assert model_key(base, policy) == model_key(tiny_model(), policy)


def test_damaged_entry_is_recomputed(tmp_path, samples):
    model, policy = tiny_model(), resolve_policy("fp32", "cpu")
    cache = FeatureCache(tmp_path / "cache")
    FeatureExtractor(model, policy, cache).extract(samples)
    entries = sorted((tmp_path / "cache").rglob("*.npy"))
    assert len(entries) == 6
    entries[0].write_bytes(b"garbage")
    again = FeatureExtractor(model, policy, cache).extract(samples)
    assert (again.hits, again.misses) == (5, 1)


def test_disabled_cache_always_computes_and_bad_files_are_skipped(tmp_path, samples):
    model, policy = tiny_model(), resolve_policy("fp32", "cpu")
    bad = tmp_path / "data" / "red" / "broken.jpg"
    bad.write_text("not an image")
    all_samples = samples + [Sample(bad, "red")]
    counter = CallCounter(model.backbone)
    for _ in range(2):
        result = FeatureExtractor(model, policy, FeatureCache(None)).extract(all_samples)
        assert result.misses == 6 and len(result.skipped) == 1
        assert result.skipped[0]["path"] == str(bad)
    assert counter.images == 12
    assert not any(tmp_path.rglob("*.npy"))


def test_entries_read_once_per_process_are_served_from_memory(tmp_path, samples, monkeypatch):
    model, policy = tiny_model(), resolve_policy("fp32", "cpu")
    cache = FeatureCache(tmp_path / "cache")
    first = FeatureExtractor(model, policy, cache).extract(samples)

    def no_disk_reads(*args, **kwargs):
        raise AssertionError("read from disk")

    monkeypatch.setattr(np, "load", no_disk_reads)
    again = FeatureExtractor(model, policy, FeatureCache(tmp_path / "cache")).extract(samples)
    assert (again.hits, again.misses) == (6, 0)
    assert all(torch.equal(first.features[s], again.features[s]) for s in samples)
