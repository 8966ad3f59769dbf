"""The pipelines: they compile, the committed YAML is current, and the compiled spec has the structure the
issue asks for (parallel families, caching off where it must be, credentials only from Secrets the
parameters name, in the cluster's build no promotion but a parity check and a request to the CI under the
gate's PASS, the ablation's ParallelFor and collected table, resources, a timeout and retries per task,
the model's tasks on the inference GPUs), their parameters are cafe_core.params', and the parameters
resolve to the run's configuration, the training job's to its cluster section."""

from __future__ import annotations

import filecmp
import json
import re

import pytest
import yaml

from cafe_core.config import ConfigError
from cafe_core.params import OBJECT_NAME, AblationParams, RunParams, resolve_config
from cafe_core.stages.step import config_of
from cafe_core.storage import Storage
from pipelines.compile import COMPILED, compile_all

SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}


def load(name: str) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all((COMPILED / name).read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_committed_yaml_is_current(tmp_path):
    """Compiled here, byte for byte the committed files (test_command_line_compiles... compiles them again in
    another process: the output is reproducible, not only current)."""
    written = compile_all(tmp_path)
    assert {p.name for p in written} == {"cafe.yaml", "cafe-ablation.yaml"}
    for path in written:
        assert filecmp.cmp(path, COMPILED / path.name, shallow=False), (
            f"pipelines/compiled/{path.name} is stale: run `cafe compile` and commit it")


def container_tasks(spec: dict):
    """(name, task, executor label) of every container task, in the root DAG and nested ones (If, ParallelFor)."""

    def walk(dag: dict):
        for name, task in dag["tasks"].items():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                yield from walk(component["dag"])
            else:
                yield name, task, component["executorLabel"]

    yield from walk(spec["root"]["dag"])


def param(name: str) -> str:
    """How a task's container field refers to the pipeline parameter `name`."""
    return "{{$.inputs.parameters['pipelinechannel--%s']}}" % name


def from_parameter(setting: dict) -> str:
    """The pipeline parameter a Kubernetes setting of a task takes its value from (nested DAGs get it as an
    input of their own, `pipelinechannel--<name>`)."""
    return setting["componentInputParameter"].removeprefix("pipelinechannel--")


def test_cafe_pipeline_structure():
    spec, executors = load("cafe.yaml")
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("data_uri", "model_preset", "model_checkpoint", "a_lm", "a_con", "temperature", "nodes",
                 "gpus_per_node", "base_image", "train_image", "gate_rules", "root", "run_id"):
        assert name in params and "defaultValue" in params[name], name
    # Credentials are never parameters: a parameter about one only names the Secret that holds it.
    for name, spec_ in params.items():
        if re.search(r"secret|key|token|password|credential", name, re.I):
            assert name.endswith("_secret") and re.fullmatch(OBJECT_NAME, spec_["defaultValue"]), name
    tasks = spec["root"]["dag"]["tasks"]
    evaluations = [t for t in tasks if t.startswith("evaluate")]
    assert len(evaluations) == 6
    for name in evaluations:  # the families run in parallel: each depends on export only
        assert tasks[name]["dependentTasks"] == ["export", "resolve-config", "train"] or "export" in tasks[name]["dependentTasks"]
        assert not {"evaluate", "evaluate-2"} & set(tasks[name].get("dependentTasks", []))
    for name in ("train", "gate", "merge-evaluation", *evaluations):
        assert not tasks[name].get("cachingOptions", {}).get("enableCache"), f"{name} must not be cached"
    # The cluster's pipeline (promote.mode ci) never promotes: on PASS, the parity check, then the request.
    assert "promote" not in {name for name, _, _ in container_tasks(spec)}
    condition = next(t for t in tasks.values() if "triggerPolicy" in t)
    assert condition["triggerPolicy"]["condition"].endswith("== 'PASS'")
    branch = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert set(branch) == {"verify-release", "request-promotion"}
    assert branch["request-promotion"]["dependentTasks"] == ["verify-release"]
    assert branch["request-promotion"]["inputs"]["artifacts"]["parity"]["taskOutputArtifact"]["producerTask"] == \
        "verify-release"
    assert not any(t.get("cachingOptions", {}).get("enableCache") for t in branch.values())
    resolved = tasks["resolve-config"]["inputs"]["parameters"]["promote_mode"]["runtimeValue"]["constant"]
    assert resolved == "ci"  # the run's configuration says what the pipeline does
    for executor, settings in executors.items():  # every task gets the S3 keys from the Secret the parameter names
        s3 = settings["secretAsEnv"][0]
        assert from_parameter(s3["secretNameParameter"]) == "s3_secret", executor
        assert {k["envVar"] for k in s3["keyToEnv"]} == SECRET_KEYS, executor
        assert s3["optional"] is True, executor  # without it, boto3's chain: IRSA / pod identity
        others = settings["secretAsEnv"][1:]
        if executor == "exec-request-promotion":  # the CI's token: on the request task only, optional
            (ci,) = others
            assert from_parameter(ci["secretNameParameter"]) == "ci_token_secret" and ci["optional"] is True
            assert ci["keyToEnv"] == [{"envVar": "CAFE_CI_TOKEN", "secretKey": "CAFE_CI_TOKEN"}]
        else:
            assert others == [], executor


def _references(tree) -> list[str]:
    """Every componentInputParameter / componentInputArtifact in a (platform) spec fragment."""
    if isinstance(tree, dict):
        found = [v for k, v in tree.items() if k in ("componentInputParameter", "componentInputArtifact")]
        return found + [r for v in tree.values() for r in _references(v)]
    return [r for v in tree for r in _references(v)] if isinstance(tree, list) else []


@pytest.mark.parametrize("name", ["cafe.yaml", "cafe-ablation.yaml"])
def test_every_reference_resolves_where_it_is_used(name):
    """What a task reads from its DAG (inputs, Secret names, tolerations, ...) is an input of that DAG (an If or
    a ParallelFor passes on only what its tasks declare), and what its container's image and resources read
    is an input of the task. kfp.local and the KFP backend both fail a run otherwise, only when it gets there."""
    spec, platform = load(name)
    executors = spec["deploymentSpec"]["executors"]

    def inputs_of(definitions: dict) -> set[str]:
        return {*definitions.get("parameters", {}), *definitions.get("artifacts", {})}

    def walk(dag: dict, available: set[str]) -> None:
        for task_name, task in dag["tasks"].items():
            component = spec["components"][task["componentRef"]["name"]]
            used = _references(task.get("inputs", {}))
            if "dag" in component:
                walk(component["dag"], inputs_of(component.get("inputDefinitions", {})))
            else:
                used += _references(platform.get(component["executorLabel"], {}))
                container = executors[component["executorLabel"]]["container"]
                placeholders = re.findall(r"inputs\.parameters\['([^']+)'\]",
                                          json.dumps([container["image"], container.get("resources", {})]))
                assert set(placeholders) <= set(task["inputs"]["parameters"]), (task_name, placeholders)
            assert set(used) <= available, (task_name, sorted(set(used) - available))

    walk(spec["root"]["dag"], inputs_of(spec["root"]["inputDefinitions"]))


# (KFP numbers a component's second task in one pipeline: the ablation's LM-only variant is "train-2", ...)
GPU_TASKS = {"export", "export-2", "verify-release", "evaluate", *(f"evaluate-{i}" for i in range(2, 7)),
             "evaluate-all", "evaluate-all-2"}
LIGHT_TASKS = {"resolve-config", "merge-evaluation", "gate", "request-promotion", "compare-ablation",
               "resolve-config-2", "resolve-config-3"}
TRAIN_TASKS = {"train", "train-2"}


@pytest.mark.parametrize("name", ["cafe.yaml", "cafe-ablation.yaml"])
def test_tasks_have_resources_timeouts_and_retries(name):
    from cafe_core.cluster.settings import gib, parse_quantity
    from pipelines.common import RETRIES, TRAIN_TIMEOUT

    spec, platform = load(name)
    containers = spec["deploymentSpec"]["executors"]
    seen = set()
    for task_name, task, label in container_tasks(spec):
        seen.add(task_name)
        container, k8s = containers[label]["container"], platform[label]
        res = container["resources"]
        assert 0 < int(k8s["activeDeadlineSeconds"]) <= TRAIN_TIMEOUT, task_name  # every task has a timeout
        if task_name in GPU_TASKS:
            # The model's tasks: the training image, the inference GPUs and memory from the parameters, and the
            # placement the training job gets too.
            assert container["image"] == param("train_image"), task_name
            assert res["accelerator"] == {"resourceType": param("inference_accelerator"),
                                          "resourceCount": param("inference_gpus")}, task_name
            assert res["resourceMemoryRequest"] == res["resourceMemoryLimit"] == param("inference_memory")
            (toleration,) = k8s["tolerations"]
            assert from_parameter(toleration["tolerationJson"]) == "tolerations", task_name
            assert from_parameter(k8s["nodeSelector"]["nodeSelectorJson"]) == "node_selector", task_name
        else:
            assert container["image"] == param("base_image"), task_name
            assert "accelerator" not in res and "tolerations" not in k8s and "nodeSelector" not in k8s, task_name
            for kind in ("Cpu", "Memory"):  # requests and limits, limits above requests
                request, limit = res[f"resource{kind}Request"], res[f"resource{kind}Limit"]
                assert 0 < parse_quantity(request) <= parse_quantity(limit), task_name
        if task_name in LIGHT_TASKS:
            assert parse_quantity(res["resourceCpuRequest"]) <= 0.5 and gib(res["resourceMemoryRequest"]) <= 1
        if task_name in TRAIN_TASKS:  # in cluster mode it only follows the job: a small request, the longest timeout
            assert parse_quantity(res["resourceCpuRequest"]) <= 1 and gib(res["resourceMemoryRequest"]) <= 2
            assert int(k8s["activeDeadlineSeconds"]) == TRAIN_TIMEOUT
            assert task["retryPolicy"]["maxRetryCount"] == 1  # adopts the running job / resumes a failed one
        else:  # idempotent: retried with backoff
            assert task["retryPolicy"] == {"maxRetryCount": RETRIES, "backoffDuration": "60s", "backoffFactor": 2.0,
                                           "backoffMaxDuration": "1800s"}, task_name
    assert {"train", "export", "convert", "validate", "prepare-data"} <= seen


def test_the_auto_build_promotes_and_the_local_build_does_not_retry(tmp_path):
    """promote.mode auto (configs/local.yaml, `cafe run`): the promote task under PASS, on the inference
    settings (it re-embeds a sample); kfp.local's builds have no retries (a failure shows at once)."""
    from kfp import compiler

    from pipelines import ablation, cafe

    compiler.Compiler().compile(cafe.build("auto", local=True), str(tmp_path / "auto.yaml"))
    compiler.Compiler().compile(ablation.build(local=True), str(tmp_path / "ablation.yaml"))
    spec, platform = yaml.safe_load_all((tmp_path / "auto.yaml").read_text())
    condition = next(t for t in spec["root"]["dag"]["tasks"].values() if "triggerPolicy" in t)
    branch = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert list(branch) == ["promote"] and not branch["promote"].get("cachingOptions", {}).get("enableCache")
    executor = spec["components"]["comp-promote"]["executorLabel"]
    assert spec["deploymentSpec"]["executors"][executor]["container"]["image"] == param("train_image")
    resolved = spec["root"]["dag"]["tasks"]["resolve-config"]["inputs"]["parameters"]["promote_mode"]
    assert resolved["runtimeValue"]["constant"] == "auto"
    for path in (tmp_path / "auto.yaml", tmp_path / "ablation.yaml"):
        spec, _ = yaml.safe_load_all(path.read_text())
        assert not [n for n, t, _ in container_tasks(spec) if "retryPolicy" in t], path.name


DIGEST = "sha256:" + "0123456789abcdef" * 4


def test_compile_writes_pinned_images_and_the_ablations_parallelism(tmp_path, cafe_main, capsys):
    base, train = f"registry.example.com:5000/ml/cafe-base@{DIGEST}", "registry.example.com/ml/cafe-train:1.4"
    assert cafe_main("compile", "--out", str(tmp_path), "--base-image", base, "--train-image", train,
                     "--ablation-parallelism", "3") == 0
    err = capsys.readouterr().err
    assert "--train-image registry.example.com/ml/cafe-train:1.4 is a tag, not a digest" in err
    assert "--base-image" not in err  # pinned: no warning
    for name in ("cafe.yaml", "cafe-ablation.yaml"):
        spec, _ = yaml.safe_load_all((tmp_path / name).read_text())
        params = spec["root"]["inputDefinitions"]["parameters"]
        assert (params["base_image"]["defaultValue"], params["train_image"]["defaultValue"]) == (base, train)
    (loop,) = [t for t in spec["root"]["dag"]["tasks"].values() if "parameterIterator" in t]  # the ablation's
    assert loop["iteratorPolicy"] == {"parallelismLimit": 3}


def test_all_variants_at_once_start_the_lm_only_one_with_the_loop(tmp_path):
    from kfp import compiler

    from pipelines import ablation

    compiler.Compiler().compile(ablation.build(parallelism=0), str(tmp_path / "a.yaml"))
    spec, _ = yaml.safe_load_all((tmp_path / "a.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert not any(dep.startswith("for-loop") for dep in tasks["train-2"]["dependentTasks"])


@pytest.mark.parametrize("ref", ["cafe-base", "cafe-base:", "Registry/Cafe:1", "cafe@sha256:abc",
                                 f"cafe@sha512:{'0' * 64}", "cafe:1 ", "cafe:-x"])
def test_compile_refuses_what_is_not_an_image_reference(ref, tmp_path, cafe_main, capsys):
    assert cafe_main("compile", "--out", str(tmp_path), "--train-image", ref) == 2
    assert "NAME@sha256:<64 hex digits> or NAME:TAG" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything is written


def test_image_references():
    from pipelines.compile import check_image

    for pinned in (f"cafe@{DIGEST}", f"ghcr.io/org/cafe-train:v1.2@{DIGEST}", f"localhost:5000/a/b_c__d-e@{DIGEST}"):
        assert check_image(pinned, "--x") is None, pinned
    for tagged in ("cafe:latest", "ghcr.io/org/cafe-train:v1.2", "localhost:5000/cafe:2024-01-01_rc.1"):
        assert "is a tag, not a digest" in check_image(tagged, "--x"), tagged


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
    # The LM-only variant beside the loop: its own configuration (lm_only), training and evaluation.
    assert compare["inputs"]["artifacts"]["lm_only"]["taskOutputArtifact"]["producerTask"] == "evaluate-all-2"
    assert tasks["resolve-config-3"]["inputs"]["parameters"]["lm_only"]["runtimeValue"]["constant"] is True
    assert loop_name in tasks["train-2"]["dependentTasks"]  # one variant at a time: it trains after the loop's


@pytest.mark.parametrize("name, kind", [("cafe.yaml", RunParams), ("cafe-ablation.yaml", AblationParams)])
def test_pipeline_parameters_are_the_typed_parameters(name, kind):
    """One definition: the compiled pipeline's parameters, types and defaults are cafe_core.params'."""
    spec, _ = load(name)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(kind.model_fields)
    kinds = {str: "STRING", float: "NUMBER_DOUBLE", int: "NUMBER_INTEGER", list: "LIST", dict: "STRUCT"}
    for field, info in kind.model_fields.items():
        default = kind().model_dump()[field]
        assert params[field]["defaultValue"] == default, field
        assert params[field]["parameterType"] == kinds[type(default)], field
        assert " ".join(params[field]["description"].split()) == " ".join(info.description.split()), field


@pytest.mark.parametrize("kind", [RunParams, AblationParams])
def test_every_parameter_reaches_the_config_or_sets_tasks(kind):
    """A parameter either is an input of the config-resolving task (so the run's configuration records it) or
    is one of the task settings (images, inference resources, Secrets, the ablation's ratios)."""
    from cafe_core.params import TASK_SETTINGS
    from components import resolve_config as component

    inputs = set(component.component_spec.inputs)
    for field in kind.model_fields:
        assert (field in inputs) != (field in TASK_SETTINGS), field


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
    lm_only = resolve_config(AblationParams(root=str(tmp_path), run_id="r9", max_steps=5), "x", lm_only=True)
    assert lm_only.run_id == "r9-lmonly" and lm_only.train.loss.a_con == 0 and lm_only.train.loss.a_lm > 0
    assert lm_only.ablation.lm_ratio is None and lm_only.train.data == variant.train.data
    assert variant.train.data == f"{tmp_path}/runs/r9/convert"  # the base run's pairs
    # No model parameter: the config file's model (local.yaml: the pretrained base); a preset replaces it.
    assert variant.model.checkpoint == "models/shapes-base" and variant.model.preset is None
    preset = resolve_config(RunParams(root=str(tmp_path), run_id="r", model_preset="tiny"))
    assert preset.model.preset == "tiny" and preset.model.checkpoint is None
    with pytest.raises(ConfigError, match="not divisible by 3 nodes"):
        resolve_config(RunParams(root=str(tmp_path), run_id="r", nodes=3))
    with pytest.raises(ConfigError, match="no KFP run id"):
        resolve_config(RunParams(root=str(tmp_path)))


GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
EVICTION = {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
            "tolerationSeconds": 600}


def test_the_training_jobs_parameters_become_the_configs_cluster_section(tmp_path):
    """The run's configuration holds the job's whole description: what the train step creates is read from it."""
    cfg = resolve_config(RunParams(root=str(tmp_path), run_id="r1", nodes=2, gpus_per_node=8, namespace="team-a",
                                   train_image=f"reg.example.com/cafe-train@sha256:{'a' * 64}", s3_secret="team-s3",
                                   kueue_queue="gpu-queue", priority_class="training", pending_timeout_seconds=1800,
                                   tolerations=[GPU_TAINT, EVICTION], node_selector={"pool": "h100"},
                                   config="configs/cluster.yaml"))
    job = cfg.cluster
    assert (job.image, job.nodes, job.gpus_per_node, job.namespace) == (
        f"reg.example.com/cafe-train@sha256:{'a' * 64}", 2, 8, "team-a")
    assert (job.s3_secret, job.kueue_queue, job.priority_class, job.pending_timeout_seconds) == (
        "team-s3", "gpu-queue", "training", 1800)
    assert [t.manifest() for t in job.tolerations] == [GPU_TAINT, EVICTION] and job.node_selector == {"pool": "h100"}
    # The defaults: no queue and no priority class (a parameter cannot be null: "" is none), the step's namespace.
    plain = resolve_config(RunParams(root=str(tmp_path), run_id="r2"))
    assert (plain.cluster.kueue_queue, plain.cluster.priority_class, plain.cluster.namespace) == (None, None, "")
    assert plain.cluster.s3_secret == "cafe-s3" and plain.cluster.image == "cafe-train:latest"
    # The overrides come after the parameters; the pipeline's promotion mode after everything.
    later = resolve_config(RunParams(root=str(tmp_path), run_id="r3", namespace="a",
                                     overrides=["cluster.namespace=b", "promote.mode=auto"]), promote_mode="ci")
    assert later.cluster.namespace == "b" and later.promote.mode == "ci"
    with pytest.raises(ConfigError, match="cluster.kueue_queue"):  # checked where the configuration is made
        resolve_config(RunParams(root=str(tmp_path), run_id="r4", kueue_queue="Not A Queue"))


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
    # A cluster section of every kind: the parameters carry it (tolerations as in a pod spec), and a null
    # no parameter can say (no S3 Secret for the job) travels as an override.
    job = [*overrides, "cluster.nodes=2", "cluster.gpus_per_node=4", "cluster.namespace=team-a",
           "cluster.kueue_queue=gpu-queue", f"cluster.tolerations={json.dumps([GPU_TAINT, EVICTION])}",
           "cluster.node_selector={pool: h100}", "cluster.s3_secret=null", "cluster.pending_timeout_seconds=60",
           "train.global_batch_size=64", "train.nproc_per_node=4", "train.precision=bf16", "promote.mode=ci"]
    cfg = load_config("configs/local.yaml", job)
    params = of_config(cfg, "configs/local.yaml", job)
    assert params.tolerations == [GPU_TAINT, EVICTION] and params.kueue_queue == "gpu-queue"
    assert params.overrides[-1] == "cluster.s3_secret=null" and params.s3_secret == "cafe-s3"  # the tasks' Secret
    again = resolve_config(params, promote_mode=cfg.promote.mode)
    assert again == cfg and again.cluster.s3_secret is None


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
    variants.insert(0, {"retrieval/shapes/i2t_R@1": 0.05, "pope/average/accuracy": 0.8, "mc/mmstar/accuracy": 0.7,
                        "cafe_output": {"run_id": "abl-lmonly", "lm_ratio": None}})
    result = compare_ablation(cfg, Storage(), variants)
    markdown, html = result.documents["comparison.md"], result.documents["comparison.html"]
    lines = markdown.splitlines()
    assert lines[4].startswith("| 0 | abl-lm0 | 0.4500 |") and "n/a" in lines[4]  # sorted by ratio
    assert lines[5].startswith("| 0.1 | abl-lm0.1 | 0.4000 | 0.3000 | 0.3000 | 0.6600 | 0.5000 | 0.2000 |")
    assert lines[6].startswith("| LM only | abl-lmonly | 0.0500 |")  # after the ratios
    assert "<table" in html and "data:image/png;base64," in html
    out = tmp_path / "runs" / "abl" / "ablation"
    assert (out / "comparison.md").read_text() == markdown and "![ablation.png](ablation.png)" in markdown
    assert (out / "ablation.png").read_bytes().startswith(b"\x89PNG")
    assert result.uri == f"{tmp_path}/runs/abl/ablation"

    # Starting from a base with a card: its row is the reference, and its gap scatter is the "before" picture
    # beside the configured ratio's (1:10) "after".
    card = tmp_path / "base"
    card.mkdir()
    (card / "metrics.json").write_text(json.dumps({"metrics": {"retrieval/shapes/i2t_R@1": 0.02,
                                                                "pope/average/accuracy": 0.9}}))
    (card / "gap_shapes.png").write_bytes(b"\x89PNG before")
    after = tmp_path / "runs" / "abl-lm0.1" / "evaluate" / "gap"
    after.mkdir(parents=True)
    (after / "gap_shapes.png").write_bytes(b"\x89PNG after")
    cfg = resolve_config(AblationParams(root=str(tmp_path), run_id="abl", model_checkpoint=str(card)))
    result = compare_ablation(cfg, Storage(), variants)
    last = result.documents["comparison.md"].splitlines()[7]
    assert last.startswith(f"| base (not fine-tuned) | {card} | 0.0200 |") and "| 0.9000 |" in last
    assert (out / "gap_before.png").read_bytes() == b"\x89PNG before"
    assert (out / "gap_after_abl-lm0.1.png").read_bytes() == b"\x89PNG after"  # the file names the variant


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
    """The train step in cluster mode: one training job, described by the pipeline's parameters through the run
    configuration's cluster section, whose replicas read that configuration from the environment; the step's
    outcome is the committed final output the job wrote."""
    import cafe_core.cluster.jobs as jobs
    from cafe_core.cluster.spec import job_name
    from cafe_core.commit import OutputWriter
    from cafe_core.config import load_config
    from cafe_core.stages.train import train_in_cluster

    cfg = resolve_config(RunParams(root=str(tmp_path), nodes=2, gpus_per_node=8, max_steps=5,
                                   train_image="registry/cafe-train:1", kueue_queue="gpu-queue",
                                   tolerations=[EVICTION], node_selector={"pool": "h100"}), "8f3c-RUN_1")
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
    result = train_in_cluster(cfg, Storage())
    (spec,) = launched
    assert (spec.owner.name, spec.owner.uid) == ("cafe-run-train-pod", "uid-1")  # the job goes with the step
    job = spec.settings
    assert (job.image, job.nodes, job.gpus_per_node, spec.namespace, job.s3_secret, job.kueue_queue) == (
        "registry/cafe-train:1", 2, 8, "ml", "cafe-s3", "gpu-queue")
    assert job.all_tolerations() == [GPU_TAINT, EVICTION] and job.node_selector == {"pool": "h100"}
    assert spec.name == job_name("8f3c-RUN_1")
    assert spec.argv[-2:] == ["--config", "env:CAFE_CONFIG_YAML"]
    monkeypatch.setenv("CAFE_CONFIG_YAML", spec.env["CAFE_CONFIG_YAML"])
    replica = load_config("env:CAFE_CONFIG_YAML")  # what every replica's `cafe train` reads
    # The run's configuration, with the caches on the pod's node-local volume (shared by its 8 ranks).
    assert (replica.train.cache.dir, replica.model.cache_dir) == ("/var/cache/cafe/data", "/var/cache/cafe/models")
    replica.train.cache.dir, replica.model.cache_dir = cfg.train.cache.dir, cfg.model.cache_dir
    assert replica == config_of(run_config) and replica.train.nproc_per_node == 8
    assert result.uri.endswith("/train/final") and result.meta["steps"] == 5 and result.meta["heldout/i2t_top1"] == 0.5


def test_resource_setters_still_refuse_a_pipeline_used_as_a_component():
    """pipelines.common replaces kfp's slow check behind the setters; the check itself is kept."""
    from kfp import dsl

    import pipelines.common  # noqa: F401  (installs the replacement)

    @dsl.component(base_image="python:3.11")
    def step():
        pass

    @dsl.pipeline
    def inner():
        step()

    @dsl.pipeline
    def outer():
        with pytest.raises(ValueError, match="set_cpu_request can only be used on single-step components"):
            inner().set_cpu_request("1")


@pytest.mark.parametrize("ratios, says", [("0,a", "comma-separated numbers"), ("0.1,-1", "finite number >= 0"),
                                          ("nan", "finite number >= 0"), ("inf", "finite number >= 0"),
                                          ("0.1,0.10", "given twice")])
def test_ablation_command_refuses_bad_ratios(ratios, says, capsys):
    from cafe_core.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["ablation", "--ratios", ratios, "--config", "configs/local.yaml"])
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_ablation_command_runs_the_pipeline_and_prints_the_comparison(tmp_path, monkeypatch, capsys):
    from cafe_core import kfp_local
    from cafe_core.cli import main

    calls = []

    def fake_run(cfg, store, config_path, overrides, pipeline, **params):
        calls.append((pipeline, params, config_path))
        store.write_bytes(f"{cfg.root}/runs/{cfg.run_id}/ablation/comparison.md", b"| a_lm:a_con | run |\n")
        return {"wall": 12.0, "steps": {}, "log": "the.log"}

    monkeypatch.setattr(kfp_local, "run_pipeline", fake_run)
    assert main(["ablation", "--ratios", "0,0.1", "--config", "configs/local.yaml", f"root={tmp_path}", "run_id=ab"]) == 0
    assert calls == [("cafe-ablation", {"ratios": [0.0, 0.1]}, "configs/local.yaml")]
    out = capsys.readouterr().out
    assert "ratios 0, 0.1 and LM only" in out and "| a_lm:a_con | run |" in out
    assert f"{tmp_path}/runs/ab/ablation/comparison.html" in out
