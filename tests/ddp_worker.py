"""Launched by torchrun from tests/test_ddp.py: ``transferlab.train`` through the Python API with a callback
that records, per process and epoch, a digest of the weights and how many samples the process trained on,
and that can kill rank 0 after a given epoch (a killed run).

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py DATA OUT RECORD_DIR OPTIONS_JSON [STAGE:EPOCH]
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import transferlab
from transferlab.training.loop import Callback


class Record(Callback):
    order = 50  # after SaveCheckpoint (40): a kill after an epoch leaves its checkpoint, as a real kill may

    def __init__(self, path: Path, kill_after: str | None):
        self.path, self.kill_after = path, kill_after
        self.rank = int(os.environ.get("RANK", "0"))
        self.samples: list[int] = []

    def before_epoch(self, loop) -> None:
        self.samples = []

    def after_batch(self, loop) -> None:
        self.samples.append(int(loop.y.shape[0]))

    def after_epoch(self, loop, row: dict) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(loop.module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        entry = {"rank": self.rank, "stage": loop.stage, "epoch": row["epoch"], "digest": digest.hexdigest(),
                 "batch_sizes": self.samples}
        with open(self.path / f"rank{self.rank}.jsonl", "a") as fp:
            fp.write(json.dumps(entry) + "\n")
        if self.rank == 0 and self.kill_after == f"{loop.stage}:{row['epoch']}":
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    data, out, record_dir, options = sys.argv[1:5]
    kill_after = sys.argv[5] if len(sys.argv) > 5 else None
    Path(record_dir).mkdir(parents=True, exist_ok=True)
    transferlab.train(data, out=out, callbacks=[Record(Path(record_dir), kill_after)], export=False,
                      **json.loads(options))


if __name__ == "__main__":
    main()
