"""Integration: with the default thresholds shipped in configs/, the trained tiny model passes the gate and
is promoted; the untrained model fails it and cannot be promoted (real SeaweedFS, the `cafe` command)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cafe_core.cli import main
from cafe_core.storage import Storage
from tests.test_export_evaluate import write_model

# The one test that runs the whole default `make run` (400 training steps, ~4-5 min on an idle 2-core
# machine): its timeout leaves a wide margin for a loaded one.
pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_trained_passes_the_shipped_gate_and_untrained_fails(s3_env, bucket, capsys):
    root = f"root={bucket}"
    trained = subprocess.run([sys.executable, "-m", "cafe_core.cli", "run", "--config", "configs/local.yaml", root,
                              "run_id=trained"], capture_output=True, text=True, timeout=1700)
    assert trained.returncode == 0, trained.stdout[-4000:] + trained.stderr[-4000:]
    assert "PASS: run trained" in trained.stdout and "registered v1: champion v1" in trained.stdout
    assert "train: 2 processes under torchrun" in trained.stdout  # torchrun inside the pipeline's train step
    assert "re-embedded 16 items from the promoted files" in trained.stdout
    assert "| retrieval/shapes/i2t_R@1 |" in trained.stdout  # the metrics table
    assert "Executing task 'promote'" in trained.stdout  # the pipeline's dsl.If branch ran
    store = Storage()
    aliases = store.read_json(f"{bucket}/registry/cafe-llava-onevision/aliases.json")
    assert aliases["champion"] == "v1"

    # The same data and sets, the model without training: export, evaluate, gate -> FAIL, promote refused
    # (the stages in this process: the pipeline around them is what the run above showed).
    write_model(store, f"{bucket}/runs/untrained/train/final", seed=0)
    # The embedding families only: the generative ones are the slow part, and their missing metrics only add
    # reasons to a FAIL that retrieval at chance already decides (asserted below).
    untrained = ["--config", "configs/local.yaml", root, "run_id=untrained", "evaluate.families=[retrieval,mmeb,gap]"]
    capsys.readouterr()
    for stage in ("export", "evaluate"):
        assert main([stage, *untrained]) == 0, capsys.readouterr().err[-3000:]
    assert main(["gate", *untrained]) == 1
    gate = capsys.readouterr().out
    assert "FAIL: run untrained" in gate
    assert "retrieval/shapes/i2t_R@1" in gate.split("## Failed checks", 1)[1]  # at chance: below min
    assert "compared with: champion v1" in gate
    assert main(["promote", *untrained]) == 1
    assert "FAIL decision" in capsys.readouterr().err
    assert store.read_json(f"{bucket}/registry/cafe-llava-onevision/aliases.json")["champion"] == "v1"
