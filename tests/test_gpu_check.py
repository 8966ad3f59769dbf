"""The GPU acceptance check (benchmarks/gpu_check.py): its CPU plumbing run and its wheel-slimming rules."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_plumbing_two_ranks_gloo_zero2(tmp_path):
    """--cpu: data through `cafe data synth` + `cafe convert`, then `cafe train` on 2 ranks (torchrun, gloo,
    ZeRO-2) for 4 steps: finished, finite and falling losses, one table, exit 0 (~25 s on 2 cores)."""
    rows_json = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--work", str(tmp_path / "work"), "--json",
                           str(rows_json)], cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(rows_json.read_text())
    assert [(r["part"], r["status"]) for r in rows] == [("-", "PASS"), ("a", "PASS")]
    assert "ZeRO-2" in rows[1]["name"] and "2 ranks" in rows[1]["name"] and "loss" in rows[1]["figures"]
    assert "all rows passed" in proc.stdout


def test_slimming_rules_and_loss_judgement():
    g = _module()
    names = {"pyarrow/libarrow_python.so", "pyarrow/libarrow_python.so.2600", "pyarrow/libarrow_python.so.2600.1.0",
             "pyarrow/libarrow.so.2600", "pyarrow/_flight.cpython-311-x86_64-linux-gnu.so", "pyarrow/lib.pyx"}
    kept = {n for n in names if not g._drop("pyarrow", n, names)}
    assert kept == {"pyarrow/libarrow_python.so.2600", "pyarrow/libarrow.so.2600"}  # the SONAMEs the loader asks for
    ft = {"fontTools/__init__.py", "fontTools/agl.py", "fontTools/misc/textTools.py", "fontTools/misc/bezierTools.py",
          "fontTools/misc/bezierTools.cpython-311-x86_64-linux-gnu.so", "fontTools/varLib/__init__.py"}
    assert {n for n in ft if not g._drop("fonttools", n, ft)} == {
        "fontTools/__init__.py", "fontTools/agl.py", "fontTools/misc/textTools.py", "fontTools/misc/bezierTools.py"}
    assert g._drop("transformers", "transformers/models/bert/modeling_bert.py", set())
    assert not g._drop("transformers", "transformers/models/llava_onevision/modeling_llava_onevision.py", set())
    assert not g._drop("botocore", "botocore/data/s3/2006-03-01/service-2.json.gz", set())
    assert g._drop("botocore", "botocore/data/ec2/2016-11-15/service-2.json.gz", set())

    falling = [{"step": i + 1, "loss": 5.0 - 0.1 * i, "loss_lm": 1.0} for i in range(6)]
    assert g.judge_losses(falling, 6)[0]
    assert not g.judge_losses(falling[::-1], 6)[0]  # rising
    assert not g.judge_losses(falling[:5], 6)[0]  # a step missing
    assert not g.judge_losses([{**m, "loss_lm": float("nan")} for m in falling], 6)[0]
