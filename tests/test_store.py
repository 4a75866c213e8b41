"""The decoded-image store (transferlab.data.store) and the DataLoader that reads training images from it."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import COLORS, TINY, make_class_folders, make_image

import transferlab
from transferlab.data import store as store_module
from transferlab.data.discovery import Sample
from transferlab.data.images import decode_samples
from transferlab.data.store import ImageStore, StoredImages
from transferlab.errors import TransferlabError
from transferlab.models.preprocessing import PreprocessConfig
from transferlab.training.batches import Augmentation, BatchOrder, LoaderOptions, image_batches

PRE = PreprocessConfig(32, 36, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _samples(root: Path, n: int, size=(48, 40)) -> list[Sample]:
    return [Sample(make_image(root / f"im{i:04d}.png", COLORS["red"], seed=i, size=(size[0] + i % 7, size[1])), "red")
            for i in range(n)]


def _same_images(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_stored_images_equal_decoding_in_memory_and_keep_each_aspect(tmp_path):
    samples = _samples(tmp_path / "img", 10)
    loaded = ImageStore(tmp_path / "cache", PRE).load(samples, progress=False)
    assert isinstance(loaded.images, StoredImages) and loaded.built == 10
    assert _same_images(loaded.images, decode_samples(samples, PRE, progress=False).images)
    assert len({tuple(im.shape) for im in loaded.images}) > 1  # ragged: each image keeps its aspect ratio
    assert all(min(im.shape[1:]) == PRE.resize_size for im in loaded.images)
    again = ImageStore(tmp_path / "cache", PRE).load(samples, progress=False)
    assert again.built == 0 and _same_images(again.images, loaded.images)
    assert _same_images(loaded.images[2:5], [loaded.images[i] for i in (2, 3, 4)])


def test_without_a_store_images_are_decoded_in_memory(tmp_path):
    samples = _samples(tmp_path / "img", 4)
    loaded = ImageStore(None, PRE).load(samples, progress=False)
    assert isinstance(loaded.images, list) and _same_images(loaded.images, decode_samples(samples, PRE,
                                                                                          progress=False).images)
    assert not (tmp_path / "cache").exists()


def test_a_changed_image_or_preprocessing_misses_the_store(tmp_path):
    samples = _samples(tmp_path / "img", 6)
    cache = tmp_path / "cache"
    first = ImageStore(cache, PRE).load(samples, progress=False)
    make_image(samples[3].path, COLORS["blue"], seed=99, size=(60, 50))  # rewritten in place
    changed = ImageStore(cache, PRE).load(samples, progress=False)
    assert changed.built == 1
    assert not torch.equal(changed.images[3], first.images[3])
    assert torch.equal(changed.images[3], decode_samples([samples[3]], PRE, progress=False).images[0])
    assert _same_images(changed.images[:3], first.images[:3])
    bigger = PreprocessConfig(32, 40, "bilinear", PRE.mean, PRE.std)
    other = ImageStore(cache, bigger).load(samples, progress=False)
    assert other.built == 6 and all(min(im.shape[1:]) == 40 for im in other.images)
    bicubic = ImageStore(cache, PreprocessConfig(32, 36, "bicubic", PRE.mean, PRE.std)).load(samples, progress=False)
    assert bicubic.built == 6


def test_files_that_do_not_decode_are_recorded_once_and_skipped(tmp_path):
    samples = _samples(tmp_path / "img", 3)
    broken = tmp_path / "img" / "broken.png"
    broken.write_bytes(b"not an image")
    samples.insert(1, Sample(broken, "red"))
    store = ImageStore(tmp_path / "cache", PRE)
    loaded = store.load(samples, progress=False)
    assert loaded.samples == [samples[0], *samples[2:]] and len(loaded.images) == 3
    assert [entry["path"] for entry in loaded.skipped] == [str(broken)] and loaded.skipped[0]["reason"]
    again = store.load(samples, progress=False)
    assert again.built == 0 and again.skipped == loaded.skipped  # the failure is in the index: not retried
    with pytest.raises(TransferlabError, match=r"broken\.png: .*--strict"):
        store.load(samples, strict=True, progress=False)
    assert decode_samples(samples, PRE, progress=False).skipped == loaded.skipped  # as without a store


def test_a_shared_build_gives_every_process_its_share(tmp_path):
    samples = _samples(tmp_path / "img", 9)
    store = ImageStore(tmp_path / "cache", PRE)
    assert store.build(samples, shard=(0, 2), lock=False, progress=False) == 5
    assert store.build(samples, shard=(1, 2), lock=False, progress=False) == 4
    assert store.load(samples, progress=False).built == 0


_KILLED_BUILD = """
import sys, time
from pathlib import Path
from transferlab.data import decode, store
from transferlab.data.discovery import Sample
from transferlab.models.preprocessing import PreprocessConfig

store.SEGMENT_IMAGES = 8
real = decode.decode_array
def slow(path, cfg):
    time.sleep(0.05)
    return real(path, cfg)
decode.decode_array = slow
paths = sorted(Path(sys.argv[1]).glob("*.png"))
pre = PreprocessConfig(32, 36, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
store.ImageStore(sys.argv[2], pre).load([Sample(p, "red") for p in paths], progress=False)
"""


def test_a_killed_build_resumes_with_what_it_had_finished(tmp_path):
    samples = _samples(tmp_path / "img", 60)
    cache = tmp_path / "cache"
    folder = ImageStore(cache, PRE).folder
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(tmp_path / "img"), str(cache)])
    deadline = time.monotonic() + 60
    while len(list(folder.glob("*.json"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sealed = len(list(folder.glob("*.json")))
    assert 2 <= sealed < 60 / 8, "the build was not killed part-way"
    assert list(folder.glob(".*.u8.partial")), "the killed build left its open segment"
    resumed = ImageStore(cache, PRE).load(samples, progress=False)
    assert 0 < resumed.built <= 60 - 8 * sealed  # only what the killed build had not sealed
    assert _same_images(resumed.images, decode_samples(samples, PRE, progress=False).images)


def _load_in_process(args) -> tuple[int, list[torch.Tensor]]:
    paths, cache = args
    loaded = ImageStore(cache, PRE).load([Sample(Path(p), "red") for p in paths], progress=False)
    return loaded.built, [im.clone() for im in loaded.images]


def test_two_processes_at_once_share_one_build_and_read_the_same_images(tmp_path):
    samples = _samples(tmp_path / "img", 40)
    cache = tmp_path / "cache"
    args = ([str(s.path) for s in samples], str(cache))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        (built_a, images_a), (built_b, images_b) = pool.map(_load_in_process, [args, args])
    assert built_a + built_b == 40  # the second waited on the lock, then found the first one's work
    expected = decode_samples(samples, PRE, progress=False).images
    assert _same_images(images_a, expected) and _same_images(images_b, expected)


def test_readers_see_only_complete_segments_while_another_build_adds(tmp_path):
    samples = _samples(tmp_path / "img", 12)
    cache = tmp_path / "cache"
    first = ImageStore(cache, PRE).load(samples[:6], progress=False)
    folder = ImageStore(cache, PRE).folder
    (folder / ".unfinished.u8.partial").write_bytes(b"\0" * 1000)  # a build in progress elsewhere
    (folder / "orphan.u8").write_bytes(b"\0" * 1000)  # sealed data without its index: not visible
    reading = first.images[0]
    second = ImageStore(cache, PRE).load(samples, progress=False)
    assert second.built == 6 and torch.equal(first.images[0], reading)
    assert _same_images(second.images[:6], first.images)
    assert (folder / ".unfinished.u8.partial").exists()  # fresh: it may belong to a live build


def test_stale_partial_segments_are_removed_by_the_next_build(tmp_path, monkeypatch):
    samples = _samples(tmp_path / "img", 3)
    store = ImageStore(tmp_path / "cache", PRE)
    store.load(samples[:1], progress=False)
    stale = store.folder / ".old.u8.partial"
    stale.write_bytes(b"\0" * 100)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    store.load(samples, progress=False)
    assert not stale.exists()


def test_an_index_is_json_naming_offsets_and_shapes(tmp_path):
    samples = _samples(tmp_path / "img", 2)
    store = ImageStore(tmp_path / "cache", PRE)
    loaded = store.load(samples, progress=False)
    index, = store.folder.glob("*.json")
    entries = json.loads(index.read_text())["images"]
    assert sorted(tuple(shape) for _, *shape in entries.values()) == sorted(tuple(im.shape) for im in loaded.images)
    data = index.with_suffix(".u8").stat().st_size
    assert data == sum(im.numel() for im in loaded.images)


# --------------------------------------------------------------------------------------- the loader


BASIC = Augmentation()


def _epoch(images, labels, workers: int, augment=BASIC) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = image_batches(images, labels, BatchOrder(4, seed=3, stage="finetune"), PRE, augment,
                            LoaderOptions(workers))
    return [list(batches.make(epoch)) for epoch in (1, 2)]


@pytest.mark.parametrize("policy", ["basic", "trivial"])
def test_batches_are_the_same_with_zero_or_two_loader_workers(tmp_path, policy):
    samples = _samples(tmp_path / "img", 10)
    images = ImageStore(tmp_path / "cache", PRE).load(samples, progress=False).images
    labels = torch.arange(10) % 2
    torch.manual_seed(0)
    inline = _epoch(images, labels, 0, Augmentation(policy))
    after_inline = torch.rand(3)
    torch.manual_seed(0)
    workers = _epoch(images, labels, 2, Augmentation(policy))
    assert torch.equal(torch.rand(3), after_inline)  # augmentation never moves the training loop's RNG
    for epoch_a, epoch_b in zip(inline, workers, strict=True):
        assert len(epoch_a) == len(epoch_b) == 3  # 10 images, batch 4: 4 + 4 + 2
        for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(inline[0][0][0], inline[1][0][0])  # another epoch: another order and crops


def test_a_draws_augmentation_depends_on_its_position_not_on_what_ran_before(tmp_path):
    images = ImageStore(tmp_path / "cache", PRE).load(_samples(tmp_path / "img", 8), progress=False).images
    labels = torch.zeros(8, dtype=torch.long)
    epoch2_alone = list(image_batches(images, labels, BatchOrder(4, 3, "finetune"), PRE, Augmentation()).make(2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(_epoch(images, labels, 0)[1], epoch2_alone, strict=True))


def test_without_augmentation_batches_are_centre_crops(tmp_path):
    from transferlab.models.preprocessing import eval_batch

    images = ImageStore(tmp_path / "cache", PRE).load(_samples(tmp_path / "img", 6), progress=False).images
    batches = image_batches(images, torch.zeros(6, dtype=torch.long), BatchOrder(3, 0, "finetune"), PRE, None)
    order = BatchOrder(3, 0, "finetune").epoch(6, 1)
    for (x, _), idx in zip(batches.make(1), order, strict=True):
        assert torch.equal(x, eval_batch([images[i] for i in idx.tolist()], PRE))


# ---------------------------------------------------------------------------------- whole trainings

FINETUNE = dict(TINY, strategy="unfreeze", head_epochs=1, epochs=2, export=False)


def _weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run.directory) / "model.safetensors"))


def test_training_from_the_store_equals_training_in_memory_and_with_loader_workers(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=8)
    cache = tmp_path / "cache"
    stored = transferlab.train(data, out=tmp_path / "stored", cache_dir=str(cache), **FINETUNE)
    assert list((cache / "images").glob("*/*.u8"))
    memory = transferlab.train(data, out=tmp_path / "memory", cache_dir="none", **FINETUNE)
    workers = transferlab.train(data, out=tmp_path / "workers", cache_dir=str(cache), loader_workers=2, **FINETUNE)
    reference = _weights(stored)
    for other in (memory, workers):
        assert all(torch.equal(reference[k], v) for k, v in _weights(other).items())
        assert other.metrics["accuracy"] == stored.metrics["accuracy"]
    config = json.loads((Path(workers.directory) / "config.json").read_text())
    assert config["train"]["loader_workers"] == 2


def test_the_data_report_lists_skipped_files_as_before(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=6)
    (data / "red" / "broken.png").write_bytes(b"nope")
    run = transferlab.train(data, out=tmp_path / "run", cache_dir=str(tmp_path / "cache"), **FINETUNE)
    report = json.loads((Path(run.directory) / "data_report.json").read_text())
    assert [Path(entry["path"]).name for entry in report["skipped"]] == ["broken.png"]


def test_loader_workers_option_is_checked(tmp_path, capsys):
    from transferlab.cli import main

    data = make_class_folders(tmp_path / "data", per_class=2)
    assert main(["-q", "train", str(data), "--out", str(tmp_path / "run"), "--loader-workers", "-1"]) == 2
    assert "--loader-workers -1" in capsys.readouterr().err


def test_segments_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "SEGMENT_IMAGES", 4)
    samples = _samples(tmp_path / "img", 10)
    store = ImageStore(tmp_path / "cache", PRE)
    loaded = store.load(samples, progress=False)
    assert len(list(store.folder.glob("*.json"))) == 3 and len(loaded.images) == 10


def test_a_store_that_cannot_be_written_falls_back_to_memory(tmp_path, caplog):
    samples = _samples(tmp_path / "img", 3)
    blocked = tmp_path / "cache-is-a-file"
    blocked.write_text("")
    loaded = ImageStore(blocked, PRE).load(samples, progress=False)
    assert isinstance(loaded.images, list) and len(loaded.images) == 3
    assert "decoding into memory instead" in caplog.text
