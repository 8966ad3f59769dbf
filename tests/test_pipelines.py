"""The pipelines: they compile, the committed YAML is current, and the compiled spec has the structure the
issue asks for (parallel families, caching off where it must be, credentials only from a Secret, promote
only under the gate's PASS, the ablation's ParallelFor and collected table), their parameters are
cafe_core.params', and the parameters resolve to the run's configuration."""

from __future__ import annotations

import filecmp

import pytest
import yaml

from cafe_core.config import ConfigError
from cafe_core.params import AblationParams, RunParams, resolve_config
from cafe_core.stages.step import config_of
from cafe_core.storage import Storage
from pipelines.compile import COMPILED, compile_all

SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}


def load(name: str) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all((COMPILED / name).read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_committed_yaml_is_current_and_reproducible(tmp_path):
    first = compile_all(tmp_path / "a")
    second = compile_all(tmp_path / "b")
    for path in first:
        assert filecmp.cmp(path, tmp_path / "b" / path.name, shallow=False), f"{path.name} is not reproducible"
        assert filecmp.cmp(path, COMPILED / path.name, shallow=False), (
            f"pipelines/compiled/{path.name} is stale: run `cafe compile` and commit it")
    assert {p.name for p in second} == {"cafe.yaml", "cafe-ablation.yaml"}


def test_cafe_pipeline_structure():
    spec, executors = load("cafe.yaml")
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("data_uri", "model_preset", "model_checkpoint", "a_lm", "a_con", "temperature", "nodes",
                 "gpus_per_node", "base_image", "train_image", "gate_rules", "root", "run_id"):
        assert name in params and "defaultValue" in params[name], name
    assert not any("SECRET" in p.upper() or "KEY" in p.upper() for p in params), "credentials are never parameters"
    tasks = spec["root"]["dag"]["tasks"]
    evaluations = [t for t in tasks if t.startswith("evaluate")]
    assert len(evaluations) == 6
    for name in evaluations:  # the families run in parallel: each depends on export only
        assert tasks[name]["dependentTasks"] == ["export", "resolve-config", "train"] or "export" in tasks[name]["dependentTasks"]
        assert not {"evaluate", "evaluate-2"} & set(tasks[name].get("dependentTasks", []))
    for name in ("train", "gate", "merge-evaluation", *evaluations):
        assert not tasks[name].get("cachingOptions", {}).get("enableCache"), f"{name} must not be cached"
    condition = next(t for t in tasks.values() if "triggerPolicy" in t)
    assert condition["triggerPolicy"]["condition"].endswith("== 'PASS'")
    branch = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert list(branch) == ["promote"] and not branch["promote"].get("cachingOptions", {}).get("enableCache")
    for executor, settings in executors.items():  # every task gets the S3 keys from the Secret
        (secret,) = settings["secretAsEnv"]
        assert secret["secretName"] == "cafe-s3" and {k["envVar"] for k in secret["keyToEnv"]} == SECRET_KEYS, executor
        assert secret["optional"] is True, executor  # without it, boto3's chain: IRSA / pod identity


def test_ablation_parallelism_is_set_at_compile_time(tmp_path, cafe_main):
    assert cafe_main("compile", "--out", str(tmp_path), "--ablation-parallelism", "3") == 0
    spec, _ = yaml.safe_load_all((tmp_path / "cafe-ablation.yaml").read_text())
    (loop,) = [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]
    assert loop["iteratorPolicy"] == {"parallelismLimit": 3}


def test_ablation_pipeline_structure():
    spec, _ = load("cafe-ablation.yaml")
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["ratios"]["defaultValue"] == [0.0, 0.05, 0.1, 0.2, 1.0]
    tasks = spec["root"]["dag"]["tasks"]
    loop_name, loop = next((n, t) for n, t in tasks.items() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("ratios")
    # One variant at a time by default: each is a (multi-node GPU) training job.
    assert loop["iteratorPolicy"] == {"parallelismLimit": 1}
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert {"train", "export", "evaluate-all"} <= set(inner)
    compare = tasks["compare-ablation"]
    assert compare["inputs"]["artifacts"]["variants"]["taskOutputArtifact"]["producerTask"] == loop_name


@pytest.mark.parametrize("name, kind", [("cafe.yaml", RunParams), ("cafe-ablation.yaml", AblationParams)])
def test_pipeline_parameters_are_the_typed_parameters(name, kind):
    """One definition: the compiled pipeline's parameters, types and defaults are cafe_core.params'."""
    spec, _ = load(name)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(kind.model_fields)
    kinds = {str: "STRING", float: "NUMBER_DOUBLE", int: "NUMBER_INTEGER", list: "LIST"}
    for field, info in kind.model_fields.items():
        default = kind().model_dump()[field]
        assert params[field]["defaultValue"] == default, field
        assert params[field]["parameterType"] == kinds[type(default)], field


def test_resolve_config_maps_parameters(tmp_path):
    cfg = resolve_config(RunParams(root=str(tmp_path), data_uri="s3://data/onevision", model_preset="",
                                   model_checkpoint="s3://models/llava-ov", a_lm=0.5, temperature=0.07, max_steps=50,
                                   gpus_per_node=8, gate_rules="s3://cfg/gate.yaml", overrides=["train.seed=3"]),
                         kfp_run_id="kfp-123")
    assert cfg.run_id == "kfp-123" and cfg.train.output == f"{tmp_path}/runs/kfp-123/train"
    assert cfg.data.sources[0].uri == "s3://data/onevision"
    assert cfg.model.preset is None and cfg.model.checkpoint == "s3://models/llava-ov"
    assert (cfg.train.loss.a_lm, cfg.train.loss.a_con, cfg.train.loss.temperature) == (0.5, 10.0, 0.07)
    assert cfg.train.nproc_per_node == 8 and cfg.train.precision == "bf16" and cfg.train.seed == 3
    assert cfg.gate.rules_from == "s3://cfg/gate.yaml" and cfg.ablation is None
    variant = resolve_config(AblationParams(root=str(tmp_path), run_id="r9", max_steps=5), "x", lm_ratio=0.2)
    assert variant.run_id == "r9-lm0.2" and variant.train.loss.a_lm == pytest.approx(2.0)
    assert variant.ablation.lm_ratio == 0.2 and variant.ablation.base_run_id == "r9"  # the ratio is config
    assert variant.train.data == f"{tmp_path}/runs/r9/convert"  # the base run's pairs
    with pytest.raises(ConfigError, match="not divisible by 3 nodes"):
        resolve_config(RunParams(root=str(tmp_path), run_id="r", nodes=3))
    with pytest.raises(ConfigError, match="no KFP run id"):
        resolve_config(RunParams(root=str(tmp_path)))


def test_parameters_reproduce_a_locally_resolved_config(tmp_path):
    """`cafe run` resolves once and passes parameters that give the same configuration back."""
    from cafe_core.config import load_config
    from cafe_core.params import of_config

    overrides = [f"root={tmp_path}", "run_id=auto", "train.max_steps=7", "train.loss.a_lm=0.25",
                 "model.preset=null", f"model.checkpoint={tmp_path}/hf"]
    cfg = load_config("configs/local.yaml", overrides)
    again = resolve_config(of_config(cfg, "configs/local.yaml", overrides, train_mode="local"))
    assert again == cfg and again.digest() == cfg.digest()  # the same run id, though the override says auto
    variant = resolve_config(of_config(cfg, "configs/local.yaml", overrides, AblationParams), lm_ratio=0.5)
    assert variant.run_id == f"{cfg.run_id}-lm0.5" and variant.train.output == f"{tmp_path}/runs/{variant.run_id}/train"
    assert variant.train.data == cfg.data.output and variant.train.loss.a_lm == 5.0


def test_typed_parameters_reject_what_the_pipeline_cannot_take():
    from cafe_core.params import parse

    with pytest.raises(ConfigError, match="did you mean 'max_steps'") as err:
        parse(RunParams, {"max_stepz": 3})
    assert "gpus_per_node" in str(err.value) and "eval_sets" not in str(err.value)  # the parameters, not config keys
    with pytest.raises(ConfigError, match="train_mode"):
        parse(RunParams, {"train_mode": "gpu"})
    with pytest.raises(ConfigError, match="ratios"):
        parse(RunParams, {"ratios": [0.1]})  # an ablation parameter, not the main pipeline's


def test_compare_ablation_table(tmp_path):
    from cafe_core.stages.evaluate import compare_ablation

    cfg = resolve_config(AblationParams(root=str(tmp_path), run_id="abl"))
    variants = [
        {"retrieval/shapes/i2t_R@1": 0.4, "retrieval/shapes/t2i_R@1": 0.3, "mmeb/overall/p@1": 0.3,
         "pope/average/f1": 0.66, "pope/average/accuracy": 0.5, "mc/mmstar/accuracy": 0.2,
         "mc/mmstar/coarse/accuracy": 0.9, "cafe_output": {"run_id": "abl-lm0.1", "lm_ratio": 0.1}},
        {"retrieval/shapes/i2t_R@1": 0.45, "pope/average/f1": 0.1,
         "cafe_output": {"run_id": "abl-lm0", "lm_ratio": 0.0}},
    ]
    result = compare_ablation(cfg, Storage(), variants)
    markdown, html = result.documents["comparison.md"], result.documents["comparison.html"]
    lines = markdown.splitlines()
    assert lines[4].startswith("| 0 | abl-lm0 | 0.4500 |") and "n/a" in lines[4]  # sorted by ratio
    assert lines[5].startswith("| 0.1 | abl-lm0.1 | 0.4000 | 0.3000 | 0.3000 | 0.6600 | 0.5000 | 0.2000 |")
    assert "<table" in html
    assert (tmp_path / "runs" / "abl" / "ablation" / "comparison.md").read_text() == markdown
    assert result.uri == f"{tmp_path}/runs/abl/ablation"


def test_command_line_compiles_and_refuses_a_five_field_cron(tmp_path):
    import subprocess
    import sys

    def cafe(*args):
        return subprocess.run([sys.executable, "-m", "cafe_core.cli", *args], capture_output=True, text=True, timeout=120)

    out = cafe("compile", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert filecmp.cmp(tmp_path / "cafe.yaml", COMPILED / "cafe.yaml", shallow=False)
    cron = cafe("schedule", "--host", "http://127.0.0.1:9", "--cron", "0 3 * * *")
    assert cron.returncode == 2 and "did you mean '0 0 3 * * *'" in cron.stderr  # refused before any connection
    unknown = cafe("submit", "--host", "http://127.0.0.1:9", "max_stepz=3")
    assert unknown.returncode == 2 and "max_steps" in unknown.stderr


def test_cluster_training_step_launches_a_job_that_runs_cafe_train_on_the_run_config(tmp_path, monkeypatch):
    """The train step in cluster mode: one PyTorchJob whose replicas read the run's resolved config from the
    environment; the step's outcome is the committed final output the job wrote."""
    import cafe_core.cluster.jobs as jobs
    from cafe_core.cluster.pytorchjob import job_name
    from cafe_core.commit import OutputWriter
    from cafe_core.config import load_config
    from cafe_core.stages.train import train_in_cluster

    cfg = resolve_config(RunParams(root=str(tmp_path), nodes=2, gpus_per_node=8, max_steps=5), "8f3c-RUN_1")
    run_config = cfg.to_yaml()
    launched = []

    def fake_launch(spec):
        launched.append(spec)
        out = OutputWriter(Storage(), f"{tmp_path}/runs/8f3c-RUN_1/train/final", kind="trained-model")
        out.put_text("model/config.json", "{}")
        out.commit(meta={"steps": 5, "heldout/i2t_top1": 0.5})

    monkeypatch.setattr(jobs, "run_training_job", fake_launch)
    monkeypatch.setenv("KFP_POD_NAME", "cafe-run-train-pod")  # what KFP v2 sets in every step
    monkeypatch.setenv("KFP_POD_UID", "uid-1")
    monkeypatch.setenv("POD_NAMESPACE", "ml")
    # namespace "" (the parameter's default): the step's own, where its profile's Secret and RBAC are
    result = train_in_cluster(cfg, Storage(), "registry/cafe-train:1", 2, 8, "", "cafe-s3")
    (spec,) = launched
    assert (spec.owner.name, spec.owner.uid) == ("cafe-run-train-pod", "uid-1")  # the job goes with the step
    assert (spec.image, spec.nodes, spec.gpus_per_node, spec.namespace, spec.s3_secret) == (
        "registry/cafe-train:1", 2, 8, "ml", "cafe-s3")
    assert spec.name == job_name("8f3c-RUN_1")
    assert spec.argv[-2:] == ["--config", "env:CAFE_CONFIG_YAML"]
    monkeypatch.setenv("CAFE_CONFIG_YAML", spec.env["CAFE_CONFIG_YAML"])
    replica = load_config("env:CAFE_CONFIG_YAML")  # what every replica's `cafe train` reads
    # The run's configuration, with the caches on the pod's node-local volume (shared by its 8 ranks).
    assert (replica.train.cache.dir, replica.model.cache_dir) == ("/var/cache/cafe/data", "/var/cache/cafe/models")
    replica.train.cache.dir, replica.model.cache_dir = cfg.train.cache.dir, cfg.model.cache_dir
    assert replica == config_of(run_config) and replica.train.nproc_per_node == 8
    assert result.uri.endswith("/train/final") and result.meta["steps"] == 5 and result.meta["heldout/i2t_top1"] == 0.5
