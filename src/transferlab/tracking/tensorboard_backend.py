"""TensorBoard (the ``transferlab[tensorboard]`` extra): one event folder per run (see
:mod:`~transferlab.tracking.targets`). Per-epoch scalars; at the end the final numbers with the parameters in the
HParams dashboard (``add_hparams`` into the run's own folder), the figures as images and the configuration and
the run directory's path as text. TensorBoard has no artifact store: the run directory is where the files are."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import TransferlabError
from .records import FinalRecord, RunInfo
from .targets import TENSORBOARD_DIR, TrackTarget, tensorboard_folder


@dataclass
class _Handle:
    writer: object  # torch.utils.tensorboard.SummaryWriter
    info: RunInfo
    step: int = 0


class TensorBoardBackend:
    def __init__(self, target: TrackTarget, out: str | os.PathLike, per_run: bool):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TransferlabError("--track tensorboard needs the tensorboard extra: pip install "
                                   "'transferlab[tensorboard]'") from None
        self.writer_class = SummaryWriter
        self.target, self.out, self.per_run = target, Path(out), per_run
        where = target.location or self.out / TENSORBOARD_DIR
        self.label = f"tensorboard ({where})"

    def start(self, info: RunInfo) -> _Handle:
        writer = self.writer_class(str(tensorboard_folder(self.target, self.out, info.name, self.per_run)))
        writer.add_text("config", "```\n" + json.dumps(info.params, indent=2, default=str) + "\n```")
        if info.tags:
            writer.add_text("tags", "\n".join(f"- {k}: {v}" for k, v in sorted(info.tags.items())))
        return _Handle(writer, info)

    def log_epoch(self, handle: _Handle, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            handle.writer.add_scalar(name, value, step)
        handle.step = max(handle.step, step)

    def finish(self, handle: _Handle, final: FinalRecord) -> None:
        import numpy as np
        from PIL import Image

        writer = handle.writer
        for path, name in final.figures:
            with Image.open(path) as image:
                writer.add_image(f"figures/{name}", np.asarray(image.convert("RGB")), handle.step,
                                 dataformats="HWC")
        writer.add_text("run_dir", str(final.run_dir.resolve()))
        hparams = {k: v if isinstance(v, bool | int | float | str) else str(v)
                   for k, v in {**handle.info.params, **handle.info.tags}.items()}
        # run_name=".": the run's own folder (the default would open a new sub-folder per call)
        writer.add_hparams(hparams, final.metrics, run_name=".", global_step=handle.step)
        writer.flush()

    def end(self, handle: _Handle, status: str) -> None:
        handle.writer.close()
