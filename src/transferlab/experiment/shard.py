"""``experiment --shard K/N``: worker K of N (K counted from 1, as Slurm array indices usually are) trains its
share of the grid, on one machine or on many over a shared EXP_DIR.

The share is a stable assignment by run hash: the grid's runs sorted by their hash (then name) are dealt out in
turn, so every worker that builds the same grid computes the same partition without talking to the others, no
run belongs to two workers, and the shares differ in size by at most one. A finished run is skipped and an
interrupted one resumes from its checkpoint, so a killed worker started again picks up where it stopped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import TransferlabError
from .grid import RunSpec

_FORMAT = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    index: int  # K, 1-based
    count: int  # N

    @classmethod
    def parse(cls, value: str | Shard) -> Shard:
        """``"2/4"`` -> Shard(2, 4); anything else is a one-line error naming ``--shard``."""
        if isinstance(value, Shard):
            return value
        match = _FORMAT.fullmatch(str(value))
        if match is None:
            raise TransferlabError(f"--shard {value}: expected K/N, e.g. 1/4 (worker K of N, K counted from 1)")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 1 <= index <= count:
            raise TransferlabError(f"--shard {value}: K must be between 1 and N, N at least 1 (worker K of N, "
                                   "K counted from 1)")
        return cls(index, count)

    def select(self, runs: list[RunSpec]) -> list[RunSpec]:
        """This worker's runs, in grid order."""
        dealt = sorted(runs, key=lambda r: (r.hash, r.name))
        mine = {r.name for i, r in enumerate(dealt) if i % self.count == self.index - 1}
        return [r for r in runs if r.name in mine]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
