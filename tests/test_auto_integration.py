"""--strategy auto with real weights on real data, under a time limit (hymenoptera, EfficientNet-Lite0)."""

from __future__ import annotations

import json
import time

from conftest import need_shared

import transferlab
from transferlab.io.rundir import RunDir


def test_auto_on_hymenoptera_within_a_minute(tmp_path):
    data = need_shared("hymenoptera")
    limit = 60.0
    started = time.perf_counter()
    run = transferlab.train(data, out=tmp_path / "auto", strategy="auto", backbone="efficientnet_lite0",
                            time_limit=limit)
    elapsed = time.perf_counter() - started
    record = json.loads(RunDir(run.directory).auto.read_text())
    print(f"\nauto on hymenoptera: chose {record['chosen']} ({record['reason']}); test accuracy "
          f"{run.metrics['accuracy']:.4f}; {elapsed:.0f} s with a {limit:.0f} s limit")
    for c in record["candidates"]:
        print(f"  {c['backbone']}@{c['image_size']} head {c['head']}: cv {c['cv_accuracy']} {c['skipped'] or ''}")
    sizes = {c["image_size"] for c in record["candidates"]}
    assert sizes == {224, 320}
    assert any(c["cv_accuracy"] is not None for c in record["candidates"])
    tuned = [f for f in record["finalists"] if f["strategy"] == "unfreeze" and f["skipped"] is None]
    epoch = max((float(r["seconds"]) for f in tuned for r in RunDir(run.directory / f["run_dir"]).read_history()
                 if r["stage"] == "finetune"), default=0.0)
    assert elapsed <= limit + epoch + 5.0, (elapsed, epoch)
    assert run.metrics["accuracy"] >= 0.93  # the frozen default scores 0.954 on these 153 images
