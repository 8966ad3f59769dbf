"""One run layout: the configuration's defaults, the summary and the ablation read cafe_core.layout; and
the local runner's pure helpers (which line explains a failed run, each task's own time)."""

from __future__ import annotations

import json

from cafe_core.config import load_config
from cafe_core.kfp_local import failure_reason, step_seconds, where_everything_went
from cafe_core.layout import RunLayout, run_prefix


def test_layout_names_every_stage_output():
    run = RunLayout("s3://b/x/", "r7")
    assert run.run == run_prefix("s3://b/x", "r7") == "s3://b/x/runs/r7"
    assert (run.convert, run.validate, run.train, run.final, run.export, run.evaluate, run.gate, run.ablation) == (
        "s3://b/x/runs/r7/convert", "s3://b/x/runs/r7/validate", "s3://b/x/runs/r7/train",
        "s3://b/x/runs/r7/train/final", "s3://b/x/runs/r7/export", "s3://b/x/runs/r7/evaluate",
        "s3://b/x/runs/r7/gate", "s3://b/x/runs/r7/ablation")
    assert (run.metrics, run.decision, run.why) == (
        "s3://b/x/runs/r7/evaluate/metrics.json", "s3://b/x/runs/r7/gate/decision.json", "s3://b/x/runs/r7/gate/why.md")
    assert (run.synthetic, run.eval_data, run.registry) == (
        "s3://b/x/datasets/shapes-v1", "s3://b/x/datasets/shapes-v1/eval", "s3://b/x/registry")


def test_configuration_defaults_are_the_layout():
    cfg = load_config("configs/local.yaml", ["root=s3://b", "run_id=r1"])
    run = RunLayout(cfg.root, cfg.run_id)
    assert cfg.synth.output == run.synthetic and cfg.registry.uri == run.registry
    assert cfg.data.output == cfg.validate_.input == cfg.train.data == run.convert
    assert cfg.validate_.output == run.validate and cfg.train.output == run.train
    assert cfg.export.checkpoint == cfg.evaluate.checkpoint == cfg.gate.checkpoint == run.final
    assert cfg.export.output == cfg.evaluate.embeddings == run.export
    assert cfg.evaluate.output == cfg.gate.metrics == run.evaluate
    assert cfg.gate.output == run.gate and cfg.promote.decision == run.decision
    assert cfg.eval_sets.retrieval["shapes"] == f"{run.eval_data}/retrieval"
    moved = load_config("configs/local.yaml", ["root=s3://b", "run_id=r1", "export.output=s3://elsewhere/e"])
    assert any("s3://elsewhere/e/index.parquet" in line for line in where_everything_went(moved))  # what the config says


def test_failure_reason_prefers_the_stage_line(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("\x1b[91mTraceback (most recent call last):\x1b[0m\n"
                   "  File x\nValueError: something deep\n"
                   "error: convert: source shapes: s3://b/nowhere is empty; check data.sources.0.uri\n"
                   "RuntimeError: Pipeline 'cafe' finished with status FAILURE\n")
    assert failure_reason(log) == "error: convert: source shapes: s3://b/nowhere is empty; check data.sources.0.uri"
    log.write_text("Traceback (most recent call last):\nKeyError: 'x'\n")
    assert failure_reason(log) == "KeyError: 'x'"


def test_step_seconds_reads_each_tasks_own_time(tmp_path):
    for task, meta in (("convert", {"uri": "u", "seconds": 2.5}), ("evaluate", {"cafe_output": {"seconds": 4.0}})):
        (tmp_path / task).mkdir()
        out = {"artifacts": {"a": {"artifacts": [{"metadata": meta}]}}}
        (tmp_path / task / "executor_output.json").write_text(json.dumps(out))
    assert step_seconds(tmp_path) == {"convert": 2.5, "evaluate": 4.0}
