"""The pipelines end to end through kfp.local, on small synthetic runs with local storage: the ablation
(ParallelFor over two ratios, the collected comparison table) and the cafe pipeline built for promote.mode
ci (parity check and promotion request under PASS). (`cafe run` in promote.mode auto, the default, is
tested end to end in test_gate_integration.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import SMALL_ABLATION, SMALL_RUN

pytestmark = pytest.mark.slow


SCRIPT = """
import json, sys
from cafe_core.config import load_config
from cafe_core.kfp_local import run_pipeline
from cafe_core.storage import Storage
root, overrides = sys.argv[1], json.loads(sys.argv[2])
overrides = [f"root={root}", "run_id=abl", "train.max_steps=2", *overrides]
cfg = load_config("configs/local.yaml", overrides)
print(json.dumps(run_pipeline(cfg, Storage(), "configs/local.yaml", overrides, "cafe-ablation", ratios=[0.0, 0.1])))
"""


def test_ablation_pipeline_runs_locally_and_compares_the_ratios(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(SMALL_ABLATION)], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "Pipeline 'cafe-ablation' finished with status SUCCESS" in out.stdout.replace("\x1b[95m", "").replace("\x1b[0m", "").replace("\x1b[92m", "")
    table = (tmp_path / "runs" / "abl" / "ablation" / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 0")]
    assert [r.split(" | ")[1] for r in rows] == ["abl-lm0", "abl-lm0.1"]  # both variants, sorted by ratio
    for variant, a_lm in (("abl-lm0", 0.0), ("abl-lm0.1", 1.0)):
        config = (tmp_path / "runs" / variant / "train" / "final" / "config.yaml").read_text()
        assert f"a_lm: {a_lm}" in config and f"data: {tmp_path}/runs/abl/convert" in config  # the shared pairs
        metrics = json.loads((tmp_path / "runs" / variant / "evaluate" / "metrics.json").read_text())["metrics"]
        assert "retrieval/shapes/i2t_R@1" in metrics and "pope/average/f1" in metrics
    assert "n/a" not in rows[0] and "n/a" not in rows[1]


CI_SCRIPT = """
import json, sys
from cafe_core.config import load_config
from cafe_core.kfp_local import run_pipeline
from cafe_core.storage import Storage
root, overrides = sys.argv[1], json.loads(sys.argv[2])
cfg = load_config("configs/local.yaml", [f"root={root}", "run_id=ci1", *overrides])
print(json.dumps(run_pipeline(cfg, Storage(), "configs/local.yaml", [f"root={root}", "run_id=ci1", *overrides])))
"""


def test_the_ci_build_checks_parity_and_requests_promotion_without_promoting(tmp_path):
    """promote.mode ci through kfp.local: after a PASS the parity check runs on the model's files and the
    request (no CI configured) says how to start the promote workflow; the registry gets no champion."""
    passing = ["gate.rules_from=null", "gate.rules=[{metric: 'mmeb/overall/p@1', min: 0.0}]", "promote.mode=ci"]
    out = subprocess.run([sys.executable, "-c", CI_SCRIPT, str(tmp_path), json.dumps([*SMALL_RUN, *passing])],
                         capture_output=True, text=True, timeout=900)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    assert out.returncode == 0, text[-6000:]
    for task in ("gate", "verify-release", "request-promotion"):
        assert f"Task '{task}' finished with status SUCCESS" in text, task
    assert "gh workflow run" in text  # the request, by hand: no promote.ci in configs/local.yaml
    assert "Executing task 'promote'" not in text
    parity = list((tmp_path / "runs" / "ci1").rglob("parity.json"))
    assert parity and json.loads(parity[0].read_text())["passed"] is True
    assert not (tmp_path / "registry").exists() or not list((tmp_path / "registry").rglob("aliases.json"))
