"""Integration: the whole default `cafe run` (synth -> convert -> validate -> train -> export -> evaluate ->
gate -> promote) through the `cafe` command against a real SeaweedFS: every stage's output is committed and
accounted for, and with the thresholds shipped in configs/ the three models of CAFe's argument are told
apart: the CAFe fine-tuned base passes the gate and is promoted; the contrastive-only fine-tuning (a_lm = 0)
fails on the generative slices and the un-fine-tuned base fails on retrieval, and neither can be promoted.

The one end-to-end pipeline run of the suite (the slowest test): the checks of each stage's outputs ride on
it rather than on a second, smaller run."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from cafe_core.cli import main
from cafe_core.commit import verify_output
from cafe_core.config import load_config
from cafe_core.gate import evaluate_rules, load_rules
from cafe_core.s3server import LOCAL_CREDENTIALS
from cafe_core.storage import Storage
from tests.conftest import REPO
from tests.test_export_evaluate import commit_folder

# The one test that runs the whole default `make run` (400 training steps, ~4-5 min on an idle 2-core
# machine): its timeout leaves a wide margin for a loaded one.
pytestmark = [pytest.mark.s3, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_cafe_passes_the_shipped_gate_contrastive_only_and_the_base_fail(s3_env, bucket, capsys):
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
    check_run_outputs(bucket, "trained", trained.stdout, store)

    # The cluster's build (promote.mode ci) ends the same PASS with its two release steps: the parity check on
    # the run's real files, then the request to the CI (none configured: the command to start it by hand).
    released = ["--config", "configs/local.yaml", root, "run_id=trained", "promote.mode=ci"]
    capsys.readouterr()
    assert main(["verify-release", *released]) == 0, capsys.readouterr().err[-3000:]
    assert "verify-release: parity record" in capsys.readouterr().out
    record = store.read_json(f"{bucket}/runs/trained/gate/parity/parity.json")
    decision = store.read_json(f"{bucket}/runs/trained/gate/decision.json")
    assert record["passed"] is True and record["checkpoint_digest"] == decision["checkpoint_digest"]
    assert main(["request-promotion", *released]) == 0
    assert f"gh workflow run promote.yml -f decision_uri={bucket}/runs/trained/gate/decision.json" in capsys.readouterr().out

    # Contrastive fine-tuning alone (a_lm = 0) from the same base embeds but loses the answers: the gate's
    # generative slices fail it and it is not promoted. (Fewer steps than the run above, to keep the suite
    # short: at 200 steps POPE accuracy is already 0.65 / 0.58 / 0.60, yes-ratio 0.33; docs/base-model.md.)
    alm0 = ["--config", "configs/local.yaml", root, "run_id=alm0", f"train.data={bucket}/runs/trained/convert",
            "train.loss.a_lm=0",
            f"train.max_steps={CONTRASTIVE_ONLY_STEPS}", "evaluate.families=[retrieval,mmeb,pope,mc,caption]"]
    gate = failed_gate(alm0, capsys, "train", "export", "evaluate")
    failed = gate.split("## Failed checks", 1)[1].split("## All checks", 1)[0]
    assert all(f"pope/{split}/accuracy" in failed for split in ("random", "popular", "adversarial")), failed
    assert all(f"pope/{split}/f1" in failed for split in ("random", "popular", "adversarial")), failed
    why = store.read_text(f"{bucket}/runs/alm0/gate/why.md")
    assert "pope/adversarial/accuracy" in why.split("## All checks", 1)[0]  # the record names the slices
    refused(alm0, capsys, store, bucket)

    # The pretrained base itself, not fine-tuned: it answers (its card's numbers pass every generative bound)
    # but its last-token embeddings do not retrieve: the gate fails it on retrieval.
    card = json.loads((REPO / "models/shapes-base/metrics.json").read_text())["metrics"]
    rules = load_rules(store, "configs/gate.yaml")
    assert {v.metric for v in evaluate_rules(rules, card, None) if not v.passed} == {
        "retrieval/shapes/i2t_R@1_strict", "retrieval/shapes/t2i_R@1_strict", "mmeb/overall/p@1_strict"}  # (mmeb: not in the card)
    commit_folder(store, REPO / "models/shapes-base", f"{bucket}/runs/base/train/final")
    # The embedding families only: the generative ones are the slow part, and the card above has them.
    base = ["--config", "configs/local.yaml", root, "run_id=base", "evaluate.families=[retrieval,mmeb,gap]"]
    gate = failed_gate(base, capsys, "export", "evaluate")
    failed = gate.split("## Failed checks", 1)[1].split("## All checks", 1)[0]
    assert "retrieval/shapes/i2t_R@1_strict" in failed and "retrieval/shapes/t2i_R@1_strict" in failed
    refused(base, capsys, store, bucket)


CONTRASTIVE_ONLY_STEPS = 200


def failed_gate(argv: list[str], capsys, *stages: str) -> str:
    """Run the stages in this process, then the gate, which must FAIL against champion v1; its report."""
    capsys.readouterr()
    for stage in stages:
        assert main([stage, *argv]) == 0, capsys.readouterr().err[-3000:]
    assert main(["gate", *argv]) == 1
    gate = capsys.readouterr().out
    assert "FAIL: run" in gate and "compared with: champion v1" in gate
    return gate


def refused(argv: list[str], capsys, store: Storage, bucket: str) -> None:
    assert main(["promote", *argv]) == 1
    assert "FAIL decision" in capsys.readouterr().err
    assert store.read_json(f"{bucket}/registry/cafe-llava-onevision/aliases.json")["champion"] == "v1"


def cafe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cafe_core.cli", *args], capture_output=True, text=True, timeout=600)


def check_run_outputs(root: str, run_id: str, stdout: str, store: Storage) -> None:
    """What one pipeline run leaves behind: each stage's committed output where the summary says, the
    conversion's reject accounting, and the artifact commands over them."""
    run = f"{root}/runs/{run_id}"
    for where in (f"{root}/datasets/shapes-v1", f"{run}/convert/", f"{run}/validate/summary.txt",
                  f"{run}/validate/data_docs/index.html", f"{run}/train/final/model/", f"{run}/train/checkpoints/",
                  f"{run}/export/index.parquet", f"{run}/evaluate/report.html", f"{run}/gate/decision.json"):
        assert where in stdout, where
    log = re.sub(r"\x1b\[[0-9;]*m", "", open(f".cafe/logs/run-{run_id}.log").read())  # kfp.local's own record
    assert "Task 'gate' finished with status SUCCESS" in log
    synth = verify_output(store, f"{root}/datasets/shapes-v1")
    converted = verify_output(store, f"{run}/convert")
    assert verify_output(store, f"{run}/validate").meta["success"] is True
    trained = verify_output(store, f"{run}/train/final")  # the training step wrote its model to S3
    t = load_config(REPO / "configs/local.yaml").train
    assert trained.meta["steps"] == t.max_steps and "model/model.safetensors" in trained.names()
    # Checkpoints every checkpoint_every steps; the last step writes the final output instead of one more.
    last = (t.max_steps - 1) // t.checkpoint_every * t.checkpoint_every
    assert store.read_json(f"{run}/train/checkpoints/latest.json")["step"] == last > 0

    # input = accepted + rejected + deduplicated; every deliberately broken row is caught, for its reason.
    stats = json.loads(store.read_bytes(f"{run}/convert/stats.json"))
    broken = dict(synth.meta["bad_rows"])
    assert stats["input"] == synth.meta["counts"]["train_rows"] == stats["accepted"] + stats["rejected"] + stats["deduped"]
    assert stats["rejected"] + stats["deduped"] == sum(broken.values()) > 0
    assert stats["deduped"] == broken.pop("duplicate_content")
    assert stats["rejected_by_reason"] == {k: v for k, v in broken.items() if v}
    assert len(store.read_text(f"{run}/convert/rejects.jsonl").splitlines()) == stats["rejected"]

    # The local config converts with the last-gpt-turn rule: captions are the description only.
    shard = next(n for n in converted.names() if n.startswith("pairs/"))
    with store.local_copy(f"{run}/convert/{shard}") as path:
        table = pq.read_table(path)
    caption, conversation = table.column("caption")[0].as_py(), table.column("conversations")[0].as_py()
    assert caption == conversation[-1]["value"] and len(conversation) > 2
    config = store.read_text(f"{run}/convert/config.yaml")
    assert f"run_id: {run_id}" in config
    assert LOCAL_CREDENTIALS["aws_secret_access_key"] not in config  # credentials never reach a config

    # The synthetic data is reused by the next run; the run's artifacts can be listed, checked and fetched.
    again = cafe("data", "synth", "--config", "configs/local.yaml", f"root={root}", "run_id=next")
    assert again.returncode == 0 and "up to date" in again.stdout
    listing = cafe("artifacts", "ls", run_id, f"root={root}")
    assert listing.returncode == 0 and "convert/pairs/part-00000.parquet" in listing.stdout
    assert "objects" in listing.stdout.splitlines()[-1]
    verify = cafe("artifacts", "verify", f"{run}/convert", f"root={root}")
    assert verify.returncode == 0 and "all sha256 match" in verify.stdout
    got = cafe("artifacts", "get", f"{run}/convert/stats.json", f"root={root}")
    assert got.returncode == 0 and json.loads(got.stdout)["input"] == stats["input"]
    shown = cafe("config", "show", "--config", "configs/local.yaml", f"root={root}", f"run_id={run_id}")
    assert shown.returncode == 0 and f"output: {run}/convert" in shown.stdout
