"""Study files: an experiment described in TOML (paths relative to the file)."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import TrainConfig
from ..errors import TransferlabError

STUDY_KEYS = {"data_dir", "out", "question", "strategies", "optimizers", "heads", "backbones", "seeds", "eval_on",
              "epochs", "class_map", "train", "audit", "time_limit"}

PATH_OPTIONS = ("test_dir", "labels", "cache_dir", "weights")



def load_study(path: str | os.PathLike) -> dict:
    """A study TOML file -> the fields of an :class:`~transferlab.experiment.spec.ExperimentSpec` (keyword
    arguments of :func:`transferlab.run_experiment`). Paths are relative to the file.

    Keys: data_dir, out, question, strategies, optimizers, heads, backbones, seeds (lists or
    comma-separated strings), eval_on (list of folders), epochs, class_map (table), and a ``[train]``
    table of any other TrainConfig option (val_size, batch_size, ...).
    """
    import tomllib

    path = Path(path)
    try:
        study = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TransferlabError(f"{path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TransferlabError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(study) - STUDY_KEYS)
    if unknown:
        raise TransferlabError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(STUDY_KEYS))})")
    base = path.resolve().parent

    def rel(value):
        return str(base / value) if value is not None else None

    kwargs = {k: v for k, v in study.items() if k not in ("train",)}
    for key in ("data_dir", "out"):
        if key in kwargs:
            kwargs[key] = rel(kwargs[key])
    if "eval_on" in kwargs:
        eval_on = kwargs["eval_on"]
        kwargs["eval_on"] = [rel(p) for p in ([eval_on] if isinstance(eval_on, str) else eval_on)]
    train = dict(study.get("train", {}))
    unknown = sorted(set(train) - set(TrainConfig.field_names()))
    if unknown:
        raise TransferlabError(f"{path}: [train] has unknown option '{unknown[0]}'")
    for key in PATH_OPTIONS:
        if train.get(key) and train[key] not in ("default", "none"):
            candidate = base / train[key]
            if key != "weights" or candidate.exists():
                train[key] = str(candidate)
    kwargs["options"] = train
    kwargs["study_file"] = str(path.resolve())
    return kwargs

