"""The training job's specification: who it is (name, namespace, owner) and how it runs (the `cluster:`
settings), built from a configuration by job_spec(). Pure: imports no Kubernetes client.

    spec = job_spec(cfg, owner=kfp_step_owner())   # what the train step and `cafe job render` both use
    job = job_object(spec)                          # cafe_core.cluster.kinds: a PyTorchJob or a TrainJob

The pieces every replica shares (torchrun, env, volumes, resources) are here too; cafe_core.cluster.pytorchjob
and cafe_core.cluster.trainjob place them in their API's object.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cafe_core.cluster.settings import (
    DNS1035,
    DNS1123_LABEL,
    LABEL_VALUE,
    QUALIFIED_NAME,
    ClusterConfig,
    check_env_name,
)

if TYPE_CHECKING:
    from cafe_core.config import CafeConfig

SPEC_DIGEST = "cafe/spec-digest"  # annotation: tells a retried step's own job from a stranger of the same name
MAX_NAME = 48  # pods are "<name>-worker-<i>" / hostnames "<name>-node-0-<i>", which must stay within 63 characters
CACHE_MOUNT = "/var/cache/cafe"  # a node-local emptyDir: the data shards and model the pod's ranks share
S3_SECRET = "cafe-s3"  # the Secret with the S3 keys (manifests/base/s3-secret.template.yaml)
# key: optional. All optional: without the Secret (or a key), boto3's default chain applies (IRSA, pod identity).
S3_KEYS = {"AWS_ACCESS_KEY_ID": True, "AWS_SECRET_ACCESS_KEY": True, "AWS_ENDPOINT_URL": True}
CONFIG_ENV = "CAFE_CONFIG_YAML"  # what every replica's `cafe train --config env:CAFE_CONFIG_YAML` reads
IN_CLUSTER_ENV = "CAFE_IN_CLUSTER"  # cafe_core.connect.in_cluster(): no embedded S3, credentials checked at start
GPU_ENV = {
    "NCCL_DEBUG": "WARN",  # NCCL's own warnings reach the log; INFO is very verbose, set it via env to debug
    # A rank stuck in a collective after a peer died raises instead of hanging until the deadline. The older
    # NCCL_ASYNC_ERROR_HANDLING name is deprecated in torch >= 2.2.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


def current_namespace(default: str = "default") -> str:
    """The namespace this process runs in: $POD_NAMESPACE, else the in-cluster service account's, else default."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SA_NAMESPACE_FILE.read_text().strip() or default
    except OSError:
        return default


def job_name(run_id: str, prefix: str = "cafe-train") -> str:
    """A valid job name for a run id: lowercased, other characters replaced by '-', a short hash of the run id
    appended when that changed it (so 'Run_1' and 'run-1' stay apart), at most MAX_NAME characters."""
    clean = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    name = f"{prefix}-{clean}" if clean else prefix
    if clean != run_id or len(name) > MAX_NAME:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:6]
        name = f"{name[: MAX_NAME - 7].rstrip('-')}-{digest}"
    return name


class PodOwner(BaseModel):
    """A pod, as an owner reference: in the job's own namespace (a reference across namespaces counts as an
    absent owner, and the garbage collector would delete the job at once)."""

    model_config = ConfigDict(extra="forbid")
    name: str
    uid: str
    namespace: str

    def reference(self) -> dict[str, Any]:
        # blockOwnerDeletion false: setting it true needs delete rights on the pod (its finalizers).
        return {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid, "controller": False,
                "blockOwnerDeletion": False}


def kfp_step_owner() -> PodOwner | None:
    """The KFP step's own pod, from the KFP_POD_NAME / KFP_POD_UID the KFP v2 backend sets in every step (and
    the pod's namespace); None outside a KFP step."""
    name, uid = os.environ.get("KFP_POD_NAME"), os.environ.get("KFP_POD_UID")
    if not (name and uid):
        return None
    return PodOwner(name=name, uid=uid, namespace=current_namespace())


class TrainingJobSpec(BaseModel):
    """Everything one training job needs: its identity and the `cluster:` settings. job_object() (kinds)
    turns it into the API object of settings.api."""

    model_config = ConfigDict(extra="forbid")

    name: str  # the job's name; job_name(run_id) makes one
    namespace: str = Field(default_factory=current_namespace)
    # What each replica runs after torchrun, e.g. ["-m", "cafe_core.cli", "train", "--config", FILE, "k=v"].
    argv: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)  # the step's own plain env (the config, the region)
    labels: dict[str, str] = Field(default_factory=dict)  # on the job and its pods
    # The pod that launches the job (the KFP step's, kfp_step_owner()): the job's owner, so that Kubernetes
    # deletes it with the step's pod (a cancelled, evicted or garbage-collected step leaves no job holding GPUs).
    owner: PodOwner | None = None
    settings: ClusterConfig = ClusterConfig()
    cache_max_gb: float = Field(100.0, gt=0)  # train.cache.max_gb: sizes the cache volume by default

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > MAX_NAME or not DNS1035.match(v):
            raise ValueError(
                f"job name {v!r} is not valid: use at most {MAX_NAME} lowercase letters, digits and '-', starting "
                "with a letter and ending with a letter or digit (the operators name pods and Services after it, "
                "which must be DNS-1035 labels); job_name(run_id) builds one"
            )
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if len(v) > 63 or not DNS1123_LABEL.match(v):
            raise ValueError(f"namespace {v!r} is not a valid Kubernetes namespace name (a DNS-1123 label)")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if key != CONFIG_ENV:
                check_env_name(key, "env")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not QUALIFIED_NAME.match(key) or not LABEL_VALUE.match(value):
                raise ValueError(f"label {key}={value!r} is not a valid Kubernetes label (key and value)")
        return v

    @model_validator(mode="after")
    def _owner_in_namespace(self) -> "TrainingJobSpec":
        if self.owner is not None and self.owner.namespace != self.namespace:
            raise ValueError(
                f"the job's owner pod {self.owner.name} is in namespace {self.owner.namespace} and the job in "
                f"{self.namespace}: an owner must share the job's namespace (create the job in "
                f"{self.owner.namespace}, or launch without an owner)")
        return self

    @model_validator(mode="after")
    def _argv(self) -> "TrainingJobSpec":
        if self.argv[0] not in ("-m", "--module") and not self.argv[0].endswith(".py"):
            raise ValueError(f"argv must start with '-m MODULE' or a script path for torchrun, got {self.argv[0]!r}")
        return self

    @model_validator(mode="after")
    def _env_agrees(self) -> "TrainingJobSpec":
        for key, value in self.env.items():
            if key in self.settings.env and self.settings.env[key] != value:
                raise ValueError(f"cluster.env.{key}={self.settings.env[key]!r} contradicts the {value!r} the train "
                                 f"step sets from the configuration (s3.region for AWS_REGION): remove it from "
                                 "cluster.env")
        return self


# --- from a configuration ----------------------------------------------------------------------------


def job_argv() -> list[str]:
    """What every replica runs under torchrun: `cafe train` on the run's configuration from the env."""
    return ["-m", "cafe_core.cli", "train", "--config", f"env:{CONFIG_ENV}"]


def job_spec(cfg: "CafeConfig", owner: PodOwner | None = None, namespace: str | None = None) -> TrainingJobSpec:
    """The training job of a configuration: what the train step creates (with its pod as owner) and what
    `cafe job render` prints. namespace: cluster.namespace, else this process's (current_namespace())."""
    c = cfg.cluster
    # The pod's ranks share its node-local cache volume: one copy of the shards and the model per node.
    job_cfg = cfg.model_copy(deep=True)
    job_cfg.train.cache.dir, job_cfg.model.cache_dir = f"{CACHE_MOUNT}/data", f"{CACHE_MOUNT}/models"
    env = {CONFIG_ENV: job_cfg.to_yaml()}
    if cfg.s3.region:  # boto3 and the AWS SDKs in the image (STS for IRSA, too) read these, not the cafe config
        env.update(AWS_REGION=cfg.s3.region, AWS_DEFAULT_REGION=cfg.s3.region)
    return TrainingJobSpec(
        name=job_name(cfg.run_id), namespace=namespace or c.namespace or current_namespace(), argv=job_argv(),
        env=env, owner=owner, settings=c, cache_max_gb=cfg.train.cache.max_gb)


def example_spec(api: str = "pytorchjob") -> TrainingJobSpec:
    """The documented example (2 nodes x 8 GPUs; manifests/base/<api>-template.yaml is its job)."""
    return TrainingJobSpec(
        name="cafe-train-example",
        namespace="cafe",
        argv=["-m", "cafe_core.cli", "train", "--config", "/app/configs/cluster.yaml", "run_id=example"],
        settings=ClusterConfig(api=api, image="registry.example.com/cafe-train:0.1.0", nodes=2, gpus_per_node=8),
        cache_max_gb=400,  # configs/cluster.yaml's train.cache.max_gb
    )


# --- what every replica has, whatever the API --------------------------------------------------------


def torchrun_command(spec: TrainingJobSpec, rank: str, addr: str, port: str) -> list[str]:
    """torchrun with static rendezvous on the address, port and node rank the operator puts in env vars
    `rank`, `addr`, `port` (their names differ between the APIs; the pytorchjob and trainjob modules say which).

    Static, not c10d: the job is not elastic (fixed nodes), the operators already hand every pod a fixed node
    rank and the rank-0 pod's address, and static keeps node rank 0 - hence global rank 0, the one that logs,
    checkpoints and writes the outputs - on the pod whose log cafe_core.cluster.jobs follows. c10d would hand
    out node ranks in arrival order and gains nothing without elasticity. The same command works for one node
    and for N. Kubernetes expands `$(VAR)` from the container's env (including what the operator injects).
    """
    s = spec.settings
    return [
        "python", "-m", "torch.distributed.run",
        f"--nnodes={s.nodes}",
        f"--nproc_per_node={s.procs_per_node()}",
        f"--node_rank=$({rank})",
        f"--master_addr=$({addr})",
        f"--master_port=$({port})",
        "--rdzv_backend=static",
    ]


def plain_env(spec: TrainingJobSpec) -> dict[str, str]:
    """Plain env: NCCL settings on GPU, CAFE_IN_CLUSTER, cluster.env (wins over the defaults), the step's own."""
    gpu = GPU_ENV if spec.settings.gpus_per_node else {}
    return {**gpu, IN_CLUSTER_ENV: "1", **spec.settings.env, **spec.env}


def container_env(spec: TrainingJobSpec) -> list[dict[str, Any]]:
    """The container's env list: plain_env() then the S3 keys by reference to the Secret (never as values)."""
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plain_env(spec).items()]
    secret = spec.settings.s3_secret
    if secret:
        for key, optional in S3_KEYS.items():
            ref: dict[str, Any] = {"name": secret, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def volumes(spec: TrainingJobSpec) -> list[dict[str, Any]]:
    """/dev/shm in memory and the node-local cache, both with a size limit (the kubelet evicts past it)."""
    res = spec.settings.resources(spec.cache_max_gb)
    return [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
            {"name": "cafe-cache", "emptyDir": {"sizeLimit": res.cache_size}}]


def pod_placement(spec: TrainingJobSpec) -> dict[str, Any]:
    """The pod-spec fields both APIs set alike from the settings: account, pull secrets, where pods may run
    (priorityClassName only where the API carries it: a TrainJob's priority comes from its runtime or Kueue)."""
    s = spec.settings
    fields: dict[str, Any] = {
        "serviceAccountName": s.service_account,
        "imagePullSecrets": [{"name": n} for n in s.image_pull_secrets] or None,
        "nodeSelector": dict(s.node_selector) or None,
        "affinity": s.affinity or None,
        "tolerations": s.all_tolerations() or None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def volume_mounts() -> list[dict[str, Any]]:
    return [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "cafe-cache", "mountPath": CACHE_MOUNT}]


def job_labels(spec: TrainingJobSpec) -> dict[str, str]:
    """Labels on the job: the app's, the caller's, and Kueue's queue and priority when set."""
    s = spec.settings
    kueue = {**({KUEUE_QUEUE_LABEL: s.kueue_queue} if s.kueue_queue else {}),
             **({KUEUE_PRIORITY_LABEL: s.kueue_priority_class} if s.kueue_priority_class else {})}
    return {**pod_labels(spec), **kueue}


def pod_labels(spec: TrainingJobSpec) -> dict[str, str]:
    """Labels on the job's pods: the app's, then the caller's."""
    return {"app.kubernetes.io/name": "cafe", "app.kubernetes.io/component": "train", **spec.labels}


def queued_at_creation(spec: TrainingJobSpec) -> bool:
    """Create the job suspended when Kueue is to admit it: nothing starts before admission, whatever the
    order of Kueue's webhook (which would suspend it too); Kueue unsuspends it when it admits the workload."""
    return spec.settings.kueue_queue is not None


def spec_digest(job: dict[str, Any]) -> str:
    """A short hash of a job object without its digest annotation and owner (a retried step's pod is another
    owner of the same job)."""
    blob = json.loads(json.dumps(job))
    blob.get("metadata", {}).get("annotations", {}).pop(SPEC_DIGEST, None)
    blob.get("metadata", {}).pop("ownerReferences", None)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def finish_metadata(job: dict[str, Any], spec: TrainingJobSpec) -> dict[str, Any]:
    """Add the owner reference and the spec digest annotation to a built job object."""
    if spec.owner is not None:
        job["metadata"]["ownerReferences"] = [spec.owner.reference()]
    job["metadata"]["annotations"] = {SPEC_DIGEST: spec_digest(job)}
    return job
