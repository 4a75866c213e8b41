"""Training checkpoints: resume a killed or interrupted run from its last finished epoch.

RUN_DIR/checkpoint/state-<stage>-<epoch>.safetensors  tensors: trained module, optimizer state, best weights
RUN_DIR/checkpoint/state.json                         scalars: stage, epoch, history, scheduler, optimizer
                                                      hyper-parameters, callback state, config, SHA-256

The tensor file is written first, then state.json (atomic rename) points at it with its SHA-256, then
older tensor files are removed: a kill at any moment leaves one complete, consistent checkpoint.
Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from ..errors import TransferlabError
from .digest import sha256_file
from .files import atomic_path, read_json, write_json
from .rundir import RunDir

log = logging.getLogger("transferlab")


@dataclass
class Checkpoint:
    stage: str
    epoch: int
    tensors: dict[str, torch.Tensor]
    meta: dict

    def part(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    meta = checkpoint.meta["optimizer"]
    state: dict[int, dict] = {}
    for key, value in checkpoint.part("optim.").items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@dataclass
class TrainingState:
    """What a checkpoint captures of a training stage after one of its epochs."""

    stage: str
    epoch: int
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    history: list[dict]  # rows of every stage so far
    callbacks: dict = field(default_factory=dict)  # callback name -> JSON-able state
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # callbacks' tensors


def save_checkpoint(run_dir: RunDir, state: TrainingState, config: dict) -> None:
    from safetensors.torch import save_file

    run_dir.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    optim_tensors, optim_meta = _optimizer_parts(state.optimizer)
    tensors = {f"module.{k}": v for k, v in state.module.state_dict().items()} | optim_tensors | state.extra_tensors
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path = run_dir.checkpoint_tensors(state.stage, state.epoch)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    scheduler_state = {k: v for k, v in state.scheduler.state_dict().items() if k != "lr_lambdas"}
    write_json(run_dir.checkpoint_state, {
        "stage": state.stage, "epoch": state.epoch, "tensor_file": path.name, "sha256": sha256_file(path),
        "history": state.history, "optimizer": optim_meta, "scheduler": scheduler_state,
        "callbacks": state.callbacks, "config": config,
    })
    for old in run_dir.checkpoint_dir.glob(run_dir.checkpoint_tensors("*", "*").name):
        if old != path:
            old.unlink(missing_ok=True)


def load_checkpoint(run_dir: RunDir, config: dict) -> Checkpoint | None:
    """The checkpoint in RUN_DIR, or None. A checkpoint of another configuration is an error."""
    from safetensors.torch import load_file

    folder = run_dir.checkpoint_dir
    if not run_dir.checkpoint_state.is_file():
        return None
    meta = read_json(run_dir.checkpoint_state)
    if json.dumps(meta.get("config"), sort_keys=True) != json.dumps(config, sort_keys=True):
        raise TransferlabError(f"{run_dir.path}: holds a checkpoint of a different configuration; use another --out, "
                               f"or delete {folder} to start over")
    tensor_path = folder / meta["tensor_file"]
    if not tensor_path.is_file() or sha256_file(tensor_path) != meta["sha256"]:
        raise TransferlabError(f"{tensor_path}: checkpoint damaged (missing or SHA-256 mismatch); delete {folder} "
                               "to start over")
    return Checkpoint(meta["stage"], int(meta["epoch"]), load_file(str(tensor_path)), meta)


def remove_checkpoint(run_dir: RunDir) -> None:
    folder = run_dir.checkpoint_dir
    if folder.is_dir():
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        folder.rmdir()
