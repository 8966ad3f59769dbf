"""What a pipeline run may set: the KFP run parameters, typed once.

The pipelines' signatures take their defaults from here, their config-resolving task rebuilds the model
from its inputs, `cafe run` and `cafe submit` validate against it, and `resolve_config` turns it into the
run's configuration (base file + these settings + free-form overrides, in that order).
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cafe_core.ci_trigger import TOKEN_ENV as CI_TOKEN_ENV  # the key of the ci_token_secret Secret, and the env
from cafe_core.cluster.settings import ClusterConfig
from cafe_core.config import TEMPERATURE_RANGE, CafeConfig, ConfigError, load_config
from cafe_core.layout import RunLayout

BASE_IMAGE = "cafe-base:latest"  # images/base: every CPU task of the pipelines
TRAIN_IMAGE = ClusterConfig.model_fields["image"].default  # images/train: the job's pods, the GPU inference tasks
DEFAULT_RATIOS = [0.0, 0.05, 0.1, 0.2, 1.0]  # a_lm / a_con, the paper's Table 7
S3_SECRET = ClusterConfig.model_fields["s3_secret"].default  # the training job's default: one name for all
# Kubernetes object names (RFC 1123 subdomain), for the Secrets the parameters name.
OBJECT_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str = Field("s3://cafe", description="S3 prefix of the run's artifacts ({root}/runs/{run_id}/)")
    run_id: str = Field("", description="empty: the KFP run's id")
    config: str = Field("configs/local.yaml", description="base configuration file (a path in the image)")
    data_uri: str = Field("", description="LLaVA-OneVision parquet prefix; empty: the synthetic shapes data")
    model_preset: str = Field("", description="empty: the config's model; tiny | llava-onevision-qwen2-0.5b-si | "
                                             "...-7b-si (random init)")
    model_checkpoint: str = Field("", description="a Hugging Face folder (s3:// or path); replaces model_preset")
    a_con: float = Field(10.0, ge=0, description="weight of the contrastive loss")
    temperature: float = Field(0.05, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1],
                               description="InfoNCE temperature (fixed, or the learnable one's start)")
    max_steps: int = Field(400, ge=0, description="optimizer steps; 0: the base file's (train.epochs)")
    train_mode: Literal["cluster", "local"] = Field(
        "cluster", description="cluster: a training job of nodes x gpus_per_node; local: torchrun in the step")
    # The training job: each becomes cluster.* of the run's configuration, which describes the whole job.
    nodes: int = Field(1, ge=1, description="the training job's nodes (pods)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per training pod; 0: CPU processes "
                                                    "(train.nproc_per_node of the config)")
    namespace: str = Field("", description="where the training job is created; empty: the train step's own "
                                         "namespace (in multi-user Kubeflow, the run's profile namespace)")
    train_image: str = Field(TRAIN_IMAGE, description="the training job's image, also that of the GPU inference "
                                                      "tasks (export, evaluate, the release parity check)")
    s3_secret: str = Field(S3_SECRET, pattern=OBJECT_NAME, description=(
        "the Secret whose S3 keys every task and the training job get (a name, never a credential); without "
        "it, boto3's default chain (the service account's role)"))
    kueue_queue: str = Field("", description="the Kueue LocalQueue the training job is queued in; empty: none")
    priority_class: str = Field("", description="PriorityClass of the training job's pods; empty: the default")
    pending_timeout_seconds: int = Field(900, ge=0, description=(
        "how long the training job's pods may stay unable to start (unschedulable, image pull) before the train "
        "step fails; time queued in Kueue does not count"))
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description=(
        'taints the training job and the GPU inference tasks tolerate (JSON), e.g. [{"key": "nvidia.com/gpu", '
        '"operator": "Exists", "effect": "NoSchedule"}] (Kubernetes\' fields, as in a pod spec)'))
    node_selector: dict[str, str] = Field(default_factory=dict, description=(
        'node labels the training job and the GPU inference tasks need (JSON), e.g. '
        '{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}'))
    # The GPU inference tasks: task settings, not configuration (TASK_SETTINGS).
    inference_accelerator: str = Field("nvidia.com/gpu", pattern=r"^([a-z0-9.-]+/)?[A-Za-z0-9][-A-Za-z0-9_.]*$",
                                       description="the extended resource of the inference tasks' GPUs")
    inference_gpus: int = Field(0, ge=0, description="GPUs per inference task (export, evaluate, parity check); "
                                                     "0: on CPU")
    inference_memory: str = Field("16Gi", pattern=r"^[0-9]+([KMGTPE]i?)?$", description=(
        "memory request and limit of each inference task (a 7B model in bf16 needs about 32Gi)"))
    base_image: str = Field(BASE_IMAGE, description="the image of every other task")
    overrides: list[str] = Field(default_factory=list, description="further key=value config overrides")


class RunParams(_Params):
    """The cafe pipeline's parameters."""

    a_lm: float = Field(1.0, ge=0, description="weight of the next-token loss")
    gate_rules: str = Field("configs/gate.yaml", description="the gate's rules file (path or s3://)")
    ci_token_secret: str = Field("cafe-ci", pattern=OBJECT_NAME, description=(
        f"the Secret whose {CI_TOKEN_ENV} key the promotion request sends to the CI (a name, never the token); "
        "without it, the request prints how to start the CI's promote workflow by hand"))


class AblationParams(_Params):
    """The cafe-ablation pipeline's parameters: one training per ratio, no gate."""

    ratios: list[float] = Field(default_factory=lambda: list(DEFAULT_RATIOS),
                                description="a_lm / a_con per variant (0 = contrastive only; 0.1 = 1:10)")


# Parameters that set the pipeline's tasks (images, resources, Secrets) or its shape, not the run's
# configuration: every other parameter is an input of the config-resolving task (a test keeps it so).
TASK_SETTINGS = frozenset({"base_image", "inference_accelerator", "inference_gpus", "inference_memory",
                           "ci_token_secret", "ratios"})

PARAMS_OF = {"cafe": RunParams, "cafe-ablation": AblationParams}


def parse(kind: type[_Params], values: dict[str, Any]) -> _Params:
    """Validate parameters; errors name the parameter and, for a typo, the closest one."""
    try:
        return kind.model_validate(values)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            name = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                close = difflib.get_close_matches(name, list(kind.model_fields), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                lines.append(f"- {name}: not a parameter; {hint}parameters: {', '.join(kind.model_fields)}")
            else:
                lines.append(f"- {name}: {err['msg']} (given: {err.get('input')!r})")
        raise ConfigError("invalid pipeline parameters:\n" + "\n".join(lines)) from None


# Parameter -> key under the configuration's `cluster:` section (cafe_core.cluster.settings.ClusterConfig).
CLUSTER_KEYS = {"train_image": "image", "nodes": "nodes", "gpus_per_node": "gpus_per_node", "namespace": "namespace",
                "s3_secret": "s3_secret", "kueue_queue": "kueue_queue", "priority_class": "priority_class",
                "pending_timeout_seconds": "pending_timeout_seconds", "tolerations": "tolerations",
                "node_selector": "node_selector"}


# String parameters whose "" (a KFP parameter cannot be null) is the configuration's null: none.
NONE_IF_EMPTY = frozenset({"kueue_queue", "priority_class"})


def _cluster_value(params: _Params, name: str) -> Any:
    value = getattr(params, name)
    return None if value == "" and name in NONE_IF_EMPTY else value


def of_config(cfg: CafeConfig, config: str, overrides: list[str], kind: type[_Params] = RunParams,
              **fields: Any) -> _Params:
    """The parameters that reproduce a configuration resolved here from `config` and `overrides` (`cafe
    run`): every parameter is what `cfg` already says, so the pipeline's config-resolving task gets back
    `cfg` itself, with its run id (also where an override said run_id=auto)."""
    t, m = cfg.train, cfg.model
    values: dict[str, Any] = dict(root=cfg.root, run_id=cfg.run_id, config=config, model_preset=m.preset or "",
                                  model_checkpoint=m.checkpoint or "", a_con=t.loss.a_con,
                                  temperature=t.loss.temperature, max_steps=t.max_steps or 0, overrides=overrides)
    cluster = cfg.cluster.model_dump(mode="json", by_alias=True)  # tolerations as in a pod spec (camelCase)
    cluster["tolerations"] = [{k: v for k, v in t.items() if v is not None} for t in cluster["tolerations"]]
    for name, key in CLUSTER_KEYS.items():
        if cluster[key] is not None:
            values[name] = cluster[key]
        elif name in NONE_IF_EMPTY:
            values[name] = ""
        else:  # no parameter value says "none" (s3_secret: every task needs a Secret name): an override does
            values["overrides"] = [*values["overrides"], f"cluster.{key}=null"]
    if kind is RunParams:
        values.update(a_lm=t.loss.a_lm, gate_rules=cfg.gate.rules_from or "")
    return parse(kind, {**values, **fields})


def resolve_config(params: _Params, kfp_run_id: str = "", lm_ratio: float | None = None,
                   promote_mode: str | None = None, lm_only: bool = False) -> CafeConfig:
    """The run's configuration: the base file, then the parameters, then `params.overrides`; a run_id
    parameter wins over the overrides, the KFP run's id does not. An ablation variant (lm_ratio set) runs
    as `<run id>-lm<ratio>` with a_lm = lm_ratio * a_con, on the base run's converted pairs; lm_only: the
    ablation's LM-only variant, `<run id>-lmonly` with a_con = 0 (a_lm as configured). promote_mode:
    the promotion the pipeline is built for (`promote.mode`; it wins over the overrides: the configuration
    must say what the pipeline does)."""
    if not (params.run_id or kfp_run_id):
        raise ConfigError("run_id is empty and no KFP run id was given: set run_id")
    args = [f"root={params.root}", f"run_id={params.run_id or kfp_run_id}", f"train.loss.a_con={params.a_con}",
            f"train.loss.temperature={params.temperature}"]
    if params.max_steps:
        args.append(f"train.max_steps={params.max_steps}")
    if isinstance(params, RunParams):
        args.append(f"train.loss.a_lm={params.a_lm}")
        if params.gate_rules:
            args.append(f"gate.rules_from={params.gate_rules}")
    if params.data_uri:
        args.append(f"data.sources.0.uri={params.data_uri}")
    if params.model_checkpoint:
        args += ["model.preset=null", f"model.checkpoint={params.model_checkpoint}"]
    elif params.model_preset:
        args += [f"model.preset={params.model_preset}", "model.checkpoint=null"]
    if params.gpus_per_node > 0:  # one process per GPU, bf16; on CPU the base file's process count stays
        args += [f"train.nproc_per_node={params.gpus_per_node}", "train.precision=bf16"]
    # JSON is YAML: strings stay strings (a namespace "123"), lists and mappings arrive whole.
    args += [f"cluster.{key}={json.dumps(_cluster_value(params, name))}" for name, key in CLUSTER_KEYS.items()]
    args += params.overrides
    if params.run_id:
        args.append(f"run_id={params.run_id}")
    if promote_mode:
        args.append(f"promote.mode={promote_mode}")
    cfg = load_config(params.config, args)
    if lm_ratio is not None or lm_only:
        base = RunLayout(cfg.root, cfg.run_id)
        loss = (["train.loss.a_con=0", "ablation.lm_ratio=null", f"run_id={base.run_id}-lmonly"] if lm_only else
                [f"train.loss.a_lm={lm_ratio * cfg.train.loss.a_con}", f"ablation.lm_ratio={lm_ratio}",
                 f"run_id={base.run_id}-lm{lm_ratio:g}"])
        cfg = load_config(params.config, [*args, *loss, f"train.data={base.convert}",
                                          f"ablation.base_run_id={base.run_id}"])
    job = cfg.cluster
    procs = job.nodes * max(job.gpus_per_node, 1) * cfg.train.grad_accum
    if job.nodes > 1 and cfg.train.global_batch_size % procs:
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by {job.nodes} "
                          f"nodes x {max(job.gpus_per_node, 1)} processes x grad_accum {cfg.train.grad_accum}")
    return cfg
