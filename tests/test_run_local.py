"""Integration: `cafe run` and the stages refuse bad input and failed checks through the `cafe` command against a
real SeaweedFS (the whole default run, end to end, is tests/test_gate_integration.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cafe_core.commit import read_manifest
from cafe_core.storage import NotCommittedError, Storage
from tests.conftest import SMALL_RUN

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def cafe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cafe_core.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def root(s3_env, bucket):
    return bucket


def test_reject_limit_fails_the_run(root):
    out = cafe("run", "--config", "configs/local.yaml", f"root={root}", "run_id=strict", *SMALL_RUN, "data.max_reject_rate=0.001")
    assert out.returncode == 1
    assert "reject rate" in out.stderr and "data.max_reject_rate=0.10%" in out.stderr
    with pytest.raises(NotCommittedError):
        read_manifest(Storage(), f"{root}/runs/strict/convert")


def test_hard_validation_failure_and_bad_input_in_process(root, capsys):
    """The stages in this process (no pipeline around them): a hard check fails validate (exit 1), a typo
    is refused before any work (exit 2), an uncommitted input is refused (exit 2)."""
    from cafe_core.cli import main

    common = ["--config", "configs/local.yaml", f"root={root}", "run_id=v", *SMALL_RUN]
    assert main(["data", "synth", *common]) == 0 and main(["convert", *common]) == 0
    assert main(["validate", *common, "validate.min_rows=100000"]) == 1
    assert "hard check" in capsys.readouterr().err
    summary = Storage().read_text(f"{root}/runs/v/validate/summary.txt")
    assert "row_count" in summary and "FAIL" in summary
    assert main(["convert", "--config", "configs/local.yaml", f"root={root}", "run_id=w", "data.caption_rul=first"]) == 2
    assert "did you mean 'caption_rule'" in capsys.readouterr().err
    assert main(["validate", "--config", "configs/local.yaml", f"root={root}", "run_id=none"]) == 2
    assert "not a committed output" in capsys.readouterr().err
    assert not Storage().list(f"{root}/runs/w") and not Storage().list(f"{root}/runs/none")
