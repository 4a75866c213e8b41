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
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import TransferlabError
from .fileio import atomic_path, read_json, sha256_file, write_json

log = logging.getLogger("transferlab")

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"


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


def save_checkpoint(run_dir: Path, stage: str, epoch: int, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, history: list[dict], callbacks_state: dict,
                    extra_tensors: dict[str, torch.Tensor], config: dict) -> None:
    from safetensors.torch import save_file

    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    optim_tensors, optim_meta = _optimizer_parts(optimizer)
    tensors = {f"module.{k}": v for k, v in module.state_dict().items()} | optim_tensors | extra_tensors
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    name = f"state-{stage}-{epoch}.safetensors"
    with atomic_path(folder / name) as tmp:
        save_file(tensors, str(tmp))
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    write_json(folder / STATE_FILE, {
        "stage": stage, "epoch": epoch, "tensor_file": name, "sha256": sha256_file(folder / name),
        "history": history, "optimizer": optim_meta, "scheduler": scheduler_state,
        "callbacks": callbacks_state, "config": config,
    })
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(run_dir: Path, config: dict) -> Checkpoint | None:
    """The checkpoint in RUN_DIR, or None. A checkpoint of another configuration is an error."""
    from safetensors.torch import load_file

    folder = run_dir / CHECKPOINT_DIR
    if not (folder / STATE_FILE).is_file():
        return None
    meta = read_json(folder / STATE_FILE)
    if json.dumps(meta.get("config"), sort_keys=True) != json.dumps(config, sort_keys=True):
        raise TransferlabError(f"{run_dir}: holds a checkpoint of a different configuration; use another --out, "
                               f"or delete {folder} to start over")
    tensor_path = folder / meta["tensor_file"]
    if not tensor_path.is_file() or sha256_file(tensor_path) != meta["sha256"]:
        raise TransferlabError(f"{tensor_path}: checkpoint damaged (missing or SHA-256 mismatch); delete {folder} "
                               "to start over")
    return Checkpoint(meta["stage"], int(meta["epoch"]), load_file(str(tensor_path)), meta)


def remove_checkpoint(run_dir: Path) -> None:
    folder = run_dir / CHECKPOINT_DIR
    if folder.is_dir():
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        folder.rmdir()
