"""Integration: with the default thresholds shipped in configs/, the trained tiny model passes the gate and
is promoted; the untrained model fails it and cannot be promoted (real SeaweedFS, the `cafe` command)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cafe_core.storage import Storage
from tests.test_export_evaluate import write_model

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def cafe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cafe_core.cli", *args, "--config", "configs/local.yaml"],
                          capture_output=True, text=True, timeout=900)


def test_trained_passes_the_shipped_gate_and_untrained_fails(s3_env, bucket):
    root = f"root={bucket}"
    trained = cafe("run", root, "run_id=trained")  # the default run: 400 steps, all stages
    assert trained.returncode == 0, trained.stdout[-4000:] + trained.stderr[-4000:]
    assert "PASS: run trained" in trained.stdout and "registered v1: champion v1" in trained.stdout
    assert "re-embedded 16 items from the promoted files" in trained.stdout
    assert "| retrieval/shapes/i2t_R@1 |" in trained.stdout  # the metrics table
    assert "Executing task 'promote'" in trained.stdout  # the pipeline's dsl.If branch ran
    store = Storage()
    aliases = store.read_json(f"{bucket}/registry/cafe-llava-onevision/aliases.json")
    assert aliases["champion"] == "v1"

    # The same data and sets, the model without training: export, evaluate, gate -> FAIL, promote refused.
    write_model(store, f"{bucket}/runs/untrained/train/final", seed=0)
    for stage in ("export", "evaluate"):
        out = cafe(stage, root, "run_id=untrained")
        assert out.returncode == 0, out.stderr[-3000:]
    gate = cafe("gate", root, "run_id=untrained")
    assert gate.returncode == 1 and "FAIL: run untrained" in gate.stdout
    assert "retrieval/shapes/i2t_R@1" in gate.stdout.split("## Failed checks", 1)[1]  # at chance: below min
    assert "compared with: champion v1" in gate.stdout
    refused = cafe("promote", root, "run_id=untrained")
    assert refused.returncode == 1 and "FAIL decision" in refused.stderr
    assert store.read_json(f"{bucket}/registry/cafe-llava-onevision/aliases.json")["champion"] == "v1"
