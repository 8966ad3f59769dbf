"""The ablation pipeline end to end through kfp.local, on a small synthetic run with local storage
(ParallelFor over one ratio, then the LM-only variant, the collected comparison table and plot; the
sorting of many ratios is test_pipelines.py's). `cafe run` (the cafe pipeline) runs end to end
in test_gate_integration.py, which also runs the cluster build's release steps on that run."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import SMALL_ABLATION

pytestmark = pytest.mark.slow


SCRIPT = """
import json, sys
from cafe_core.config import load_config
from cafe_core.kfp_local import run_pipeline
from cafe_core.storage import Storage
root, overrides = sys.argv[1], json.loads(sys.argv[2])
overrides = [f"root={root}", "run_id=abl", "train.max_steps=2", *overrides]
cfg = load_config("configs/local.yaml", overrides)
print(json.dumps(run_pipeline(cfg, Storage(), "configs/local.yaml", overrides, "cafe-ablation", ratios=[0.1])))
"""


def test_ablation_pipeline_runs_locally_and_compares_the_ratios(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(SMALL_ABLATION)], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "Pipeline 'cafe-ablation' finished with status SUCCESS" in re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
    table = (tmp_path / "runs" / "abl" / "ablation" / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| 0", "| LM only"))]
    assert [r.split(" | ")[1] for r in rows] == ["abl-lm0.1", "abl-lmonly"]  # the ratio's and the LM-only variant
    assert "ablation.png" in table and (tmp_path / "runs" / "abl" / "ablation" / "ablation.png").is_file()
    assert (tmp_path / "runs" / "abl" / "ablation" / "gap_after_abl-lm0.1.png").is_file()  # 1:10's gap scatter
    for variant, a_lm in (("abl-lm0.1", 1.0), ("abl-lmonly", 1.0)):
        config = (tmp_path / "runs" / variant / "train" / "final" / "config.yaml").read_text()
        assert f"a_lm: {a_lm}" in config and f"data: {tmp_path}/runs/abl/convert" in config  # the shared pairs
        assert ("a_con: 0.0" in config) == (variant == "abl-lmonly")
        metrics = json.loads((tmp_path / "runs" / variant / "evaluate" / "metrics.json").read_text())["metrics"]
        assert "retrieval/shapes/i2t_R@1" in metrics and "pope/average/f1" in metrics
    assert all("n/a" not in row for row in rows)
