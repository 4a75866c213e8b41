"""torchrun DDP: two CPU processes (gloo on loopback) against one process, on real images with the tiny
random-init model. Every multi-process run has a subprocess timeout, a short process-group timeout and a
pytest timeout, so a broken collective fails the test instead of hanging CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, need_shared

import transferlab
from transferlab.io.files import read_json
from transferlab.training.batches import BatchOrder, balanced_weights

WORKER = Path(__file__).with_name("ddp_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
RUN_TIMEOUT_S = 240
FINETUNE = {**TINY, "strategy": "unfreeze", "head_epochs": 1, "epochs": 3, "batch_size": 16, "val_size": 0.15,
            "seed": 0}


def _env() -> dict:
    return os.environ | {"GLOO_SOCKET_IFNAME": "lo", "TRANSFERLAB_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1",
                         "PYTHONPATH": str(Path(transferlab.__file__).parents[1])}


def torchrun(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*TORCHRUN, *args], env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def worker(data: Path, out: Path, record: Path, options: dict, kill_after: str | None = None, check: bool = True):
    return torchrun(str(WORKER), str(data), str(out), str(record), json.dumps(options),
                    *([kill_after] if kill_after else []), check=check)


def records(folder: Path) -> dict[int, list[dict]]:
    return {rank: [json.loads(line) for line in (folder / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.fixture(scope="module")
def hymenoptera() -> Path:
    return need_shared("hymenoptera")


@pytest.fixture(scope="module")
def two_process_run(hymenoptera, tmp_path_factory):
    """A 2-process fine-tuning run through ``python -m transferlab train`` (the CLI under torchrun)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    flags = ["--backbone", TINY["backbone"], "--weights", "none", "--precision", "fp32", "--image-size", "64",
             "--strategy", "unfreeze", "--head-epochs", "1", "--epochs", "3", "--batch-size", "16",
             "--val-size", "0.15", "--seed", "0"]
    done = torchrun("-m", "transferlab", "train", str(hymenoptera), "--out", str(out), *flags)
    return out, done


@pytest.fixture(scope="module")
def one_process_run(hymenoptera, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    transferlab.train(hymenoptera, out=out, **FINETUNE)  # with model.onnx, as the CLI writes it
    return out


# --------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("weights", [False, True], ids=["shuffle", "balanced"])
def test_each_epochs_per_rank_indices_are_disjoint_and_cover_the_global_order(weights):
    labels = torch.tensor([0] * 30 + [1] * 7)
    sample_weights = balanced_weights(labels) if weights else None
    single = BatchOrder(8, 3, "finetune", sample_weights)
    ranks = [BatchOrder(8, 3, "finetune", sample_weights, rank, 2) for rank in (0, 1)]
    for epoch in (1, 2):
        draws = [order.draws(len(labels), epoch) for order in ranks]
        assert len(draws[0]) == len(draws[1]) == ranks[0].count(len(labels))  # same number of steps
        positions = torch.cat([p for d in draws for p, _ in d])
        assert len(set(positions.tolist())) == len(positions)  # disjoint draws
        for (_, i0), (_, i1), whole in zip(*draws, ranks[0].global_epoch(len(labels), epoch), strict=True):
            assert len(i0) == len(i1) and torch.equal(torch.cat([i0, i1]), whole)  # the two halves of a batch
        covered = torch.cat([torch.cat([i0, i1]) for (_, i0), (_, i1) in zip(*draws, strict=True)])
        reference = torch.cat(single.epoch(len(labels), epoch))
        assert torch.equal(covered, reference[:len(covered)])  # the one-process order, less < world at the end
        assert len(reference) - len(covered) < 2
    if not weights:  # a permutation: every sample once (37 = 4 x 8 + 5 -> the last batch trimmed to 4)
        assert sorted(covered.tolist()) == sorted(reference[:36].tolist())


def test_a_global_batch_not_divisible_by_the_processes_is_refused(monkeypatch, tiny_data, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(transferlab.TransferlabError, match="--batch-size 7 is the global batch"):
        transferlab.train(tiny_data, out=tmp_path / "r", **{**TINY, "batch_size": 7})
    with pytest.raises(transferlab.TransferlabError, match="--strategy auto under torchrun"):
        transferlab.train(tiny_data, out=tmp_path / "r", strategy="auto")


# ------------------------------------------------------------------------------------ two processes


@pytest.mark.timeout(600)
def test_two_processes_write_the_run_one_process_writes(two_process_run, one_process_run):
    out, done = two_process_run
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_process_run.iterdir())
    two, one = read_json(out / "metrics.json"), read_json(one_process_run / "metrics.json")
    assert set(two) == set(one)
    assert two["n_test"] == one["n_test"] == 153  # hymenoptera's val folder: every test image once
    assert sum(map(sum, two["confusion_matrix"])) == 153
    assert read_json(out / "config.json")["train"] == read_json(one_process_run / "config.json")["train"] | {
        "data_dir": read_json(out / "config.json")["train"]["data_dir"]}
    assert set(weights(out)) == set(weights(one_process_run))
    assert "torchrun: 2 processes" in done.stderr and done.stderr.count("test accuracy") == 1  # rank 0 speaks


@pytest.mark.timeout(600)
def test_ranks_agree_and_a_killed_two_process_run_resumes_to_the_same_result(hymenoptera, two_process_run,
                                                                            tmp_path):
    reference, _ = two_process_run
    out = tmp_path / "run"
    killed = worker(hymenoptera, out, tmp_path / "killed", FINETUNE, kill_after="finetune:2", check=False)
    assert killed.returncode != 0 and (out / "checkpoint").is_dir() and not (out / "metrics.json").exists()
    seen = records(tmp_path / "killed")
    assert [(r["stage"], r["epoch"]) for r in seen[0]] == [("head", 1), ("finetune", 1), ("finetune", 2)]
    for r0, r1 in zip(seen[0], seen[1], strict=False):  # the weights of the two processes, epoch by epoch
        assert (r0["stage"], r0["epoch"], r0["digest"]) == (r1["stage"], r1["epoch"], r1["digest"])
    finetune = [r for r in seen[1] if r["stage"] == "finetune"]
    assert all(size == 8 for r in finetune for size in r["batch_sizes"])  # half of each global batch of 16
    head = [r for r in seen[1] if r["stage"] == "head"]
    assert sum(head[0]["batch_sizes"]) > 1.8 * sum(finetune[0]["batch_sizes"])  # the head trains on all features

    worker(hymenoptera, out, tmp_path / "resumed", FINETUNE)
    again = records(tmp_path / "resumed")
    assert again[0][0]["stage"] == "finetune" and again[0][0]["epoch"] in (2, 3)  # continued, not restarted
    assert again[0][-1]["digest"] == again[1][-1]["digest"]
    resumed, expected = weights(out), weights(reference)
    assert all(torch.allclose(resumed[k], expected[k], atol=1e-6) for k in expected)
    a, b = read_json(out / "metrics.json"), read_json(reference / "metrics.json")
    assert a["accuracy"] == b["accuracy"] and a["confusion_matrix"] == b["confusion_matrix"]


@pytest.mark.timeout(600)
def test_one_two_process_step_equals_one_process_step_with_the_whole_batch(hymenoptera, tmp_path):
    """fp32, no augmentation, no dropout, frozen BatchNorm: 2 x 122 images give the step of 244 in one."""
    options = {**TINY, "strategy": "unfreeze", "head_epochs": 0, "epochs": 1, "batch_size": 244, "dropout": 0.0,
               "augment": False, "val_size": 0.0, "seed": 1, "lr": 0.05}
    transferlab.train(hymenoptera, out=tmp_path / "one", export=False, **options)
    worker(hymenoptera, tmp_path / "two", tmp_path / "record", options)
    assert [r["batch_sizes"] for r in records(tmp_path / "record")[0]] == [[122]]
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    initial = _initial_weights(hymenoptera, options)
    frozen = [k for k in one if "running_mean" in k]
    assert frozen and all(torch.equal(one[k], initial[k]) for k in frozen)  # the same initial model
    assert max(float((one[k] - initial[k]).abs().max()) for k in one) > 1e-3  # the step moved the weights
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5


def _initial_weights(data: Path, options: dict) -> dict[str, torch.Tensor]:
    from transferlab.models.build import ModelSpec, build_model
    from transferlab.provenance import seed_everything
    from transferlab.runtime.precision import resolve_policy

    cfg = transferlab.TrainConfig().replace(data_dir=str(data), **options).resolved()
    seed_everything(cfg.seed)
    model = build_model(ModelSpec.of(cfg), 2, resolve_policy("fp32", "cpu"), seed=cfg.seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.timeout(600)
def test_frozen_features_are_sharded_into_the_cache_one_process_reads(hymenoptera, tmp_path):
    options = {**TINY, "strategy": "freeze", "epochs": 5, "val_size": 0.15, "seed": 0,
               "cache_dir": str(tmp_path / "cache")}
    worker(hymenoptera, tmp_path / "two", tmp_path / "record", options)
    run = transferlab.train(hymenoptera, out=tmp_path / "one", export=False, **options)
    one, two = run.metrics, read_json(tmp_path / "two" / "metrics.json")
    assert one["inference"]["features"] == {"from_cache": 398, "computed": 0}  # all computed by the 2 processes
    assert two["inference"]["features"]["computed"] == 398
    assert one["confusion_matrix"] == two["confusion_matrix"]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
