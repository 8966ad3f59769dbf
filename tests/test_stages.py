"""The stage layer and its two adapters: the command line and the KFP components run the same stage
function, end with the same line and exit status on the same bad input, and publish a Result the same way.
Every component's python_func is called directly here (stages faked where they would need a model)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

import components
from cafe_core import stages
from cafe_core.cli import main
from cafe_core.config import FAMILIES, load_config
from cafe_core.errors import BadInput, StageFailed
from cafe_core.ports import free_port
from cafe_core.stages.base import Result, stage
from cafe_core.storage import Storage, StorageUnavailable


class FakeArtifact:
    """What KFP hands a component for an Input/Output artifact: a local path and metadata."""

    def __init__(self, path: Path, metadata: dict | None = None):
        self.path, self.metadata, self.logged = str(path), dict(metadata or {}), {}

    def log_metric(self, name: str, value: float) -> None:
        self.logged[name] = value
        self.metadata[name] = value


def artifacts(tmp_path: Path, *names: str) -> dict[str, FakeArtifact]:
    return {n: FakeArtifact(tmp_path / n) for n in names}


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# --- the same bad input through both adapters --------------------------------------------------------


def both_ways(capsys, tmp_path, overrides: list[str]) -> tuple[tuple[int, str], tuple[int, str]]:
    """`cafe convert` and the pipeline's convert step on the same configuration: (exit code, last line)."""
    code = main(["convert", "--config", "configs/local.yaml", *overrides])
    cli = (code, last_line(capsys.readouterr().err))
    cfg = load_config("configs/local.yaml", overrides)
    with pytest.raises(SystemExit) as ended:
        components.convert.python_func(run_config=cfg.to_yaml(), **artifacts(tmp_path, "synthetic", "pairs"))
    return cli, (ended.value.code, last_line(capsys.readouterr().err))


def test_missing_source_is_bad_input_the_same_way_in_the_command_line_and_the_step(capsys, tmp_path):
    cli, step = both_ways(capsys, tmp_path, [f"root={tmp_path}", "run_id=r1",
                                             f"data.sources.0.uri={tmp_path}/nowhere"])
    assert cli == step
    assert cli[0] == 2 and cli[1].startswith("error: convert: ") and f"{tmp_path}/nowhere" in cli[1]


def test_storage_outage_names_endpoint_object_attempts_and_that_nothing_was_committed(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cli, step = both_ways(capsys, tmp_path, ["root=s3://cafe-down", "run_id=r2", f"s3.endpoint_url={endpoint}",
                                             "s3.embedded=never", "s3.max_attempts=2"])
    assert cli == step
    code, line = cli
    assert code == 2 and line.startswith(f"error: convert: S3 endpoint {endpoint} did not answer: ")
    assert " s3://cafe-down/" in line and "failed after 2 attempts" in line  # the object it was working on
    assert line.endswith("nothing was committed at s3://cafe-down/runs/r2/convert")
    assert "Traceback" not in capsys.readouterr().err


def test_stage_wrapper_keeps_the_kind_and_prefixes_the_stage_name():
    cfg = load_config(None, ["root=/tmp/x", "run_id=r"])

    @stage("demo", lambda c: f"{c.root}/out")
    def failing(cfg, store, error):
        raise error

    with pytest.raises(BadInput, match=r"^demo: no such thing$"):
        failing(cfg, Storage(), BadInput("no such thing"))
    with pytest.raises(StageFailed, match=r"^demo: 3 hard checks failed$"):
        failing(cfg, Storage(), StageFailed("demo: 3 hard checks failed"))  # not prefixed twice
    with pytest.raises(BadInput, match=r"^demo: S3 endpoint x did not answer; nothing was committed at /tmp/x/out$"):
        failing(cfg, Storage(), StorageUnavailable("S3 endpoint x did not answer"))
    with pytest.raises(KeyError):  # a bug is not an input error: it keeps its traceback
        failing(cfg, Storage(), KeyError("bug"))


def test_gate_fail_is_exit_1_on_the_command_line_and_a_branch_value_in_the_pipeline(capsys, tmp_path, monkeypatch):
    def fake_gate(cfg, store, dry_run=False):
        return Result("gate", f"{cfg.root}/g", "FAIL: run r", meta={"decision": "FAIL", "decision_uri": f"{cfg.root}/g/d.json"},
                      documents={"why.md": "FAIL: run r\n"}, failure="gate: FAIL (retrieval too low)")

    monkeypatch.setattr(stages.release, "gate", fake_gate)
    monkeypatch.setitem(stages.STAGES, "gate", fake_gate)
    assert main(["gate", f"root={tmp_path}", "run_id=r"]) == 1
    assert last_line(capsys.readouterr().err) == "FAILED: gate: FAIL (retrieval too low)"
    cfg = load_config(None, [f"root={tmp_path}", "run_id=r"])
    out = artifacts(tmp_path, "metrics", "decision_record", "why")
    assert components.gate.python_func(run_config=cfg.to_yaml(), **out) == "FAIL"
    assert Path(out["why"].path).read_text() == "FAIL: run r\n"
    assert out["decision_record"].metadata["decision"] == "FAIL"
    assert Path(out["decision_record"].path).read_text() == f"{tmp_path}/g/d.json\n"  # the record itself


# --- every component's python_func -------------------------------------------------------------------


def fake(name: str, calls: list, **result_kwargs):
    def run(cfg, store, **kwargs):
        calls.append((name, kwargs))
        return Result(name, f"{cfg.root}/runs/{cfg.run_id}/{name}", f"{name}: done", meta={"n": 1}, **result_kwargs)

    return run


@pytest.fixture
def run_config(tmp_path) -> str:
    return load_config("configs/local.yaml", [f"root={tmp_path}", "run_id=c1"]).to_yaml()


def test_data_components_publish_the_stage_result(tmp_path, run_config, monkeypatch):
    calls: list = []
    monkeypatch.setattr(stages.data, "synth", fake("synth", calls))
    monkeypatch.setattr(stages.data, "convert", fake("convert", calls))
    monkeypatch.setattr(stages.data, "validate", fake("validate", calls, documents={"summary.md": "# ok\n"}))
    out = artifacts(tmp_path, "synthetic", "pairs", "summary")
    components.prepare_data.python_func(run_config=run_config, synthetic=out["synthetic"])
    components.convert.python_func(run_config=run_config, synthetic=out["synthetic"], pairs=out["pairs"])
    components.validate.python_func(run_config=run_config, pairs=out["pairs"], summary=out["summary"])
    assert [c[0] for c in calls] == ["synth", "convert", "validate"]
    assert Path(out["pairs"].path).read_text() == f"{tmp_path}/runs/c1/convert\n"
    assert out["pairs"].metadata == {"uri": f"{tmp_path}/runs/c1/convert", "n": 1, "seconds": 0.0}
    assert Path(out["summary"].path).read_text() == "# ok\n"


def test_train_component_runs_locally_or_as_a_cluster_job(tmp_path, run_config, monkeypatch):
    calls: list = []
    monkeypatch.setattr(stages.train, "train", fake("train", calls))
    monkeypatch.setattr(stages.train, "train_in_cluster", fake("train_in_cluster", calls))
    out = artifacts(tmp_path, "pairs", "model")
    common = dict(run_config=run_config, pairs=out["pairs"], model=out["model"])
    components.train.python_func(mode="local", **common)
    components.train.python_func(mode="cluster", **common)
    # The job's whole description is the run configuration's cluster section: nothing else is passed.
    assert calls == [("train", {}), ("train_in_cluster", {})]
    assert out["model"].metadata["uri"].endswith("/train_in_cluster")


def test_evaluation_components_log_metrics_and_reports(tmp_path, run_config, monkeypatch):
    calls: list = []
    metrics = {"retrieval/shapes/i2t_R@1": 0.5}
    monkeypatch.setattr(stages.evaluate, "export", fake("export", calls))
    monkeypatch.setattr(stages.evaluate, "evaluate_family", fake("evaluate_family", calls, metrics=metrics))
    monkeypatch.setattr(stages.evaluate, "merge_evaluation",
                        fake("merge_evaluation", calls, metrics=metrics, documents={"report.html": "<html>"}))
    monkeypatch.setattr(stages.evaluate, "evaluate", fake("evaluate", calls, metrics=metrics))
    monkeypatch.setattr(stages.evaluate, "compare_ablation", fake(
        "compare_ablation", calls, documents={"comparison.md": "| a |", "comparison.html": "<table>"}))
    out = artifacts(tmp_path, "model", "embeddings", "metrics", "report", "table", *FAMILIES)
    components.export.python_func(run_config=run_config, model=out["model"], embeddings=out["embeddings"])
    components.evaluate.python_func(run_config=run_config, family="pope", model=out["model"],
                                    embeddings=out["embeddings"], metrics=out["pope"])
    components.merge_evaluation.python_func(run_config=run_config, **{f: out[f] for f in FAMILIES},
                                            metrics=out["metrics"], report=out["report"])
    components.evaluate_all.python_func(run_config=run_config, families=["retrieval"], model=out["model"],
                                        embeddings=out["embeddings"], metrics=out["mc"])
    components.compare_ablation.python_func(run_config=run_config, variants=[out["metrics"]], lm_only=out["mc"],
                                            table=out["table"], report=out["report"])
    assert [c for c in calls if c[0] in ("evaluate_family", "evaluate")] == [
        ("evaluate_family", {"family": "pope"}), ("evaluate", {"families": ["retrieval"]})]
    assert out["pope"].logged == metrics and out["pope"].metadata["cafe_output"]["uri"].endswith("/evaluate_family")
    assert Path(out["table"].path).read_text() == "| a |" and Path(out["report"].path).read_text() == "<table>"
    variants = calls[-1][1]["variants"]
    assert variants[0]["retrieval/shapes/i2t_R@1"] == 0.5 and "cafe_output" in variants[0]
    assert len(variants) == 2 and variants[1] == dict(out["mc"].metadata)  # the LM-only variant's, last


def test_promote_and_resolve_config_components(tmp_path, run_config, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(stages.release, "promote", fake("promote", calls))
    out = artifacts(tmp_path, "decision_record", "model", "champion")
    components.promote.python_func(run_config=run_config, **out)
    assert calls == [("promote", {})] and json.dumps(out["champion"].metadata)
    job = dict(nodes=1, gpus_per_node=0, namespace="", train_image="cafe-train:1", s3_secret="cafe-s3",
               kueue_queue="", priority_class="", pending_timeout_seconds=900, tolerations=[], node_selector={})
    text = components.resolve_config.python_func(
        kfp_run_id="kfp-9", root=str(tmp_path), run_id="", config="configs/local.yaml", data_uri="",
        model_preset="tiny", model_checkpoint="", a_con=10.0, temperature=0.05, max_steps=5, train_mode="local",
        overrides=["train.seed=4"], lm_ratio=0.1, **job)
    cfg = load_config(None, [])
    cfg = type(cfg).model_validate(__import__("yaml").safe_load(text))
    assert cfg.run_id == "kfp-9-lm0.1" and cfg.ablation.lm_ratio == 0.1 and cfg.train.seed == 4
    bad = dict(kfp_run_id="k", root=str(tmp_path), run_id="", config="configs/local.yaml", data_uri="",
               model_preset="tiny", model_checkpoint="", a_con=10.0, temperature=0.05, max_steps=5,
               train_mode="local", overrides=[], **job)
    for change, named in (({"kfp_run_id": ""}, "no KFP run id"), ({"nodes": 0}, "nodes"),
                          ({"train_mode": "Local"}, "train_mode")):  # typed from the KFP UI: exit 2, one line
        with pytest.raises(SystemExit) as ended:
            components.resolve_config.python_func(**{**bad, **change})
        assert ended.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err and "Traceback" not in err


def test_help_comes_from_the_stage_list(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert stages.PIPELINE_ORDER in text
    for name, fn in stages.STAGES.items():
        if name != "synth":  # under `cafe data`
            assert stages.help_of(fn).split(" (")[0] in text, name


def test_tasks_that_need_no_model_import_no_torch():
    """resolve config, prepare data, convert, merge evaluation, gate and compare run without torch,
    transformers or deepspeed (each task is its own process; those imports cost seconds)."""
    import subprocess
    import sys

    code = ("import sys; import components, pipelines.compile, cafe_core.cli, cafe_core.stages, cafe_core.params, "
            "cafe_core.data.synth, cafe_core.data.convert, cafe_core.data.validate, cafe_core.evaluate.merge, "
            "cafe_core.evaluate.report, "
            "cafe_core.gate, cafe_core.registry, cafe_core.records, cafe_core.connect; "
            "print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_evaluate_command_line_options_map_to_the_stage(capsys, tmp_path, monkeypatch):
    seen = []

    def fake_evaluate(cfg, store, families=None, merge=True, progress=False):
        seen.append((families, merge))
        return Result("evaluate", cfg.evaluate.output, "evaluate: done")

    monkeypatch.setitem(stages.STAGES, "evaluate", fake_evaluate)
    common = [f"root={tmp_path}", "run_id=r"]
    assert main(["evaluate", *common]) == 0
    assert main(["evaluate", "--family", "pope", "--family", "gap", *common]) == 0
    assert main(["evaluate", "--merge", *common]) == 0
    assert seen == [(None, True), (["pope", "gap"], False), ([], True)]
    assert main(["evaluate", "--merge", "--family", "pope", *common]) == 2
    assert "give one of them" in capsys.readouterr().err


class FailingAfter(Storage):
    """A local Storage whose endpoint 'dies' after `n` source files: what a stage sees when S3 goes away
    in the middle of reading its input."""

    def __init__(self, n: int):
        super().__init__()
        self.left = n

    @contextlib.contextmanager
    def local_copy(self, uri: str):
        self.left -= 1
        if self.left < 0:
            raise StorageUnavailable(f"S3 endpoint http://s3.test did not answer: get {uri} failed after 6 attempts")
        with super().local_copy(uri) as path:
            yield path


def test_outage_in_the_middle_of_convert_commits_nothing_and_rejects_nothing(tmp_path):
    """Not a reject (an image that cannot be read) and not a reject-limit failure: the stage stops with
    the outage and the output stays uncommitted."""
    from cafe_core.commit import read_manifest
    from cafe_core.storage import NotCommittedError

    cfg = load_config("configs/local.yaml", [f"root={tmp_path}", "run_id=o1", "synth.train_size=40",
                                             "synth.train_shard_rows=10",
                                             "synth.retrieval_images=2", "synth.pope_images=1", "synth.mc_questions=2",
                                             "synth.mmeb_rows_per_dataset=1", "synth.caption_images=1",
                                             "data.workers=0"])
    stages.data.synth(cfg, Storage())
    with pytest.raises(BadInput) as err:
        stages.data.convert(cfg, FailingAfter(2))  # 2 of the 4 source shards read, then the outage
    assert str(err.value).startswith("convert: S3 endpoint http://s3.test did not answer: get ")
    assert str(err.value).endswith(f"nothing was committed at {tmp_path}/runs/o1/convert")
    with pytest.raises(NotCommittedError):
        read_manifest(Storage(), f"{tmp_path}/runs/o1/convert")


def test_embedding_families_and_the_torchrun_parent_import_no_transformers():
    """The retrieval, MMEB and gap tasks read exported embeddings, and the parent of a multi-process training
    only checks and starts torchrun: torch, not the model stack."""
    import subprocess
    import sys

    code = ("import sys; import cafe_core.evaluate.run, cafe_core.stages.evaluate, cafe_core.train.preflight, "
            "cafe_core.train.torchrun; "
            "print(sorted(m for m in ('transformers', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
