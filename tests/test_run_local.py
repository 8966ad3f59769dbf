"""Integration: the whole `cafe run` (synth -> ... -> gate) through the `cafe` command against a real SeaweedFS."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from cafe_core.commit import read_manifest, verify_output
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


def test_run_end_to_end(root):
    # A bound no model meets (on top of the shipped rules): the gate's FAIL branch, whatever 3 steps learn.
    never = 'gate.rules=[{metric: "retrieval/*/i2t_R@1", min: 1.5}]'
    out = cafe("run", "--config", "configs/local.yaml", f"root={root}", "run_id=it1", *SMALL_RUN, never)
    assert out.returncode == 0, out.stdout + out.stderr
    run = f"{root}/runs/it1"
    for where in (f"{root}/datasets/shapes-v1", f"{run}/convert/", f"{run}/validate/summary.txt",
                  f"{run}/validate/data_docs/index.html", f"{run}/train/final/model/", f"{run}/train/checkpoints/"):
        assert where in out.stdout, where
    # The decision is written, promotion is skipped.
    assert "FAIL: run it1" in out.stdout and "promote: skipped (the gate did not pass)" in out.stdout
    log = re.sub(r"\x1b\[[0-9;]*m", "", open(".cafe/logs/run-it1.log").read())  # kfp.local's own record
    assert "Task 'gate' finished with status SUCCESS" in log and "Executing task 'promote'" not in log
    for where in (f"{run}/export/index.parquet", f"{run}/evaluate/report.html", f"{run}/gate/decision.json"):
        assert where in out.stdout, where
    store = Storage()
    synth = verify_output(store, f"{root}/datasets/shapes-v1")
    converted = verify_output(store, f"{run}/convert")
    validated = verify_output(store, f"{run}/validate")
    assert validated.meta["success"] is True
    trained = verify_output(store, f"{run}/train/final")  # the training step wrote its model to S3
    assert trained.meta["steps"] == 3 and "model/model.safetensors" in trained.names()
    assert store.read_json(f"{run}/train/checkpoints/latest.json")["step"] == 2

    stats = json.loads(store.read_bytes(f"{run}/convert/stats.json"))
    bad = sum(synth.meta["bad_rows"].values())
    assert stats["input"] == 300 == stats["accepted"] + stats["rejected"] + stats["deduped"]
    assert stats["rejected"] + stats["deduped"] == bad > 0  # every broken row is caught, nothing else
    broken = dict(synth.meta["bad_rows"])
    assert stats["deduped"] == broken.pop("duplicate_content")
    assert stats["rejected_by_reason"] == {k: v for k, v in broken.items() if v}  # each caught for its reason
    rejects = store.read_text(f"{run}/convert/rejects.jsonl").splitlines()
    assert len(rejects) == stats["rejected"]

    # The local config converts with the first-gpt-turn rule: captions are the description only.
    shard = next(n for n in converted.names() if n.startswith("pairs/"))
    with store.local_copy(f"{run}/convert/{shard}") as path:
        table = pq.read_table(path)
    caption, conversation = table.column("caption")[0].as_py(), table.column("conversations")[0].as_py()
    assert caption == conversation[1]["value"] and len(conversation) > 2

    config = store.read_text(f"{run}/convert/config.yaml")
    assert "run_id: it1" in config and "secret" not in config.lower()

    # The synthetic data is reused by the next run; the run's artifacts can be listed, checked and fetched.
    again = cafe("data", "synth", "--config", "configs/local.yaml", f"root={root}", "run_id=it2", *SMALL_RUN)
    assert again.returncode == 0 and "up to date" in again.stdout
    listing = cafe("artifacts", "ls", "it1", f"root={root}")
    assert listing.returncode == 0 and "convert/pairs/part-00000.parquet" in listing.stdout
    assert "objects" in listing.stdout.splitlines()[-1]
    verify = cafe("artifacts", "verify", f"{run}/convert", f"root={root}")
    assert verify.returncode == 0 and "all sha256 match" in verify.stdout
    got = cafe("artifacts", "get", f"{run}/convert/stats.json", f"root={root}")
    assert got.returncode == 0 and json.loads(got.stdout)["input"] == 300
    shown = cafe("config", "show", "--config", "configs/local.yaml", f"root={root}", "run_id=it1")
    assert shown.returncode == 0 and f"output: {root}/runs/it1/convert" in shown.stdout


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
