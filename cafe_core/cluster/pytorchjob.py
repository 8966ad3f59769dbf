"""The PyTorchJob that runs `cafe train` on Kubernetes, built from a TrainingJobSpec: pure, no cluster needed.

    spec = TrainingJobSpec(
        name=job_name("r7"), image="registry.example.com/cafe:0.1.0", nodes=2, gpus_per_node=8,
        argv=["-m", "cafe_core.cli", "train", "--config", "/app/configs/cluster.yaml", "run_id=r7"],
    )
    job = pytorchjob(spec)   # the kubeflow.org/v1 PyTorchJob object, a plain dict

cafe_core.cluster.jobs creates that object and follows it to the end (run_training_job). This module imports
no Kubernetes client. `python -m cafe_core.cluster.pytorchjob example` prints the committed example,
manifests/base/pytorchjob-template.yaml.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"  # the operator injects its env and finds the master port only in a container of this name
PORT_NAME, PORT = "pytorchjob-port", 23456  # the operator's default name and port for the rendezvous
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # set by the operator on every pod of a job
SPEC_DIGEST = "cafe/spec-digest"  # annotation: tells a retried step's own job from a stranger of the same name
MAX_NAME = 48  # pods are "<name>-worker-<i>" and their hostnames must stay within 63 characters
CACHE_MOUNT = "/var/cache/cafe"  # a node-local emptyDir: the data shards and model the pod's ranks share
S3_SECRET = "cafe-s3"  # the Secret with the S3 keys (manifests/base/s3-secret.template.yaml)
# key: optional. All optional: without the Secret (or a key), boto3's default chain applies (IRSA, pod identity).
S3_KEYS = {"AWS_ACCESS_KEY_ID": True, "AWS_SECRET_ACCESS_KEY": True, "AWS_ENDPOINT_URL": True}
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
OPERATOR_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")  # and every PET_* name
GPU_ENV = {
    "NCCL_DEBUG": "WARN",  # NCCL's own warnings reach the log; INFO is very verbose, set it via env to debug
    # A rank stuck in a collective after a peer died raises instead of hanging until the deadline. The older
    # NCCL_ASYNC_ERROR_HANDLING name is deprecated in torch >= 2.2.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
# Kubernetes resource quantities, as in the CRD's schema.
_NUMBER = r"(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
_QUANTITY = re.compile(rf"^{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE]{_NUMBER}))?$")


# --- the job specification ---------------------------------------------------------------------------


def current_namespace(default: str = "default") -> str:
    """The namespace this process runs in: $POD_NAMESPACE, else the in-cluster service account's, else default."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return SA_NAMESPACE_FILE.read_text().strip() or default
    except OSError:
        return default


def job_name(run_id: str, prefix: str = "cafe-train") -> str:
    """A valid PyTorchJob name for a run id: lowercased, other characters replaced by '-', a short hash of the
    run id appended when that changed it (so 'Run_1' and 'run-1' stay apart), at most MAX_NAME characters."""
    clean = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    name = f"{prefix}-{clean}" if clean else prefix
    if clean != run_id or len(name) > MAX_NAME:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:6]
        name = f"{name[: MAX_NAME - 7].rstrip('-')}-{digest}"
    return name


class TrainingJobSpec(BaseModel):
    """Everything needed to run one training job; `pytorchjob()` turns it into the PyTorchJob object."""

    model_config = ConfigDict(extra="forbid")

    name: str  # the PyTorchJob's name; job_name(run_id) makes one
    namespace: str = Field(default_factory=current_namespace)
    image: str = Field(min_length=1)
    # What each replica runs after torchrun, e.g. ["-m", "cafe_core.cli", "train", "--config", FILE, "k=v"].
    argv: list[str] = Field(min_length=1)
    nodes: int = Field(1, ge=1, le=256)  # pods: 1 Master + (nodes - 1) Workers
    gpus_per_node: int = Field(0, ge=0, le=16)  # processes per node; 0 = a CPU job with one process per node
    # Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and (optional) AWS_ENDPOINT_URL; None = no S3 env
    # (e.g. credentials from the node's IAM role).
    s3_secret: str | None = S3_SECRET
    env: dict[str, str] = Field(default_factory=dict)  # extra plain env; never credentials
    cpu_request: str = "4"
    memory_request: str = "16Gi"
    cpu_limit: str | None = None
    memory_limit: str | None = None
    shm_size: str = "8Gi"  # /dev/shm (a memory emptyDir) for NCCL and DataLoader workers
    # The pod's cache volume at CACHE_MOUNT (an emptyDir on the node's disk); None: no size limit of its own
    # (the kubelet evicts a pod whose emptyDir passes its limit, so a limit must exceed train.cache.max_gb
    # plus the model).
    cache_size: str | None = None
    service_account: str | None = None  # the training pods' own; they need no Kubernetes API access
    node_selector: dict[str, str] = Field(default_factory=dict)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    active_deadline_seconds: int = Field(3 * 24 * 3600, ge=1)  # the operator fails the job after this
    backoff_limit: int = Field(2, ge=0)  # container restarts (restartPolicy OnFailure) before the job fails
    pending_timeout_seconds: float = Field(900.0, ge=0)  # how long pods may be unable to start
    # Delete the job at the end: always; on_success (and when run_training_job() gives up on a job that is
    # still alive: stuck, timed out, interrupted), keeping failed jobs for inspection; never.
    cleanup: Literal["always", "on_success", "never"] = "on_success"
    # The operator deletes a finished job (and its pods) this long after it ends: a Failed job kept for
    # inspection does not stay forever. None: kept until deleted.
    ttl_seconds_after_finished: int | None = Field(3 * 24 * 3600, ge=0)
    labels: dict[str, str] = Field(default_factory=dict)  # on the job and its pods
    # The pod that launches the job (the KFP step's, kfp_step_owner()): the job's owner, so that Kubernetes
    # deletes it with the step's pod (a cancelled, evicted or garbage-collected step leaves no job holding GPUs).
    owner: "PodOwner | None" = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > MAX_NAME or not _DNS1035.match(v):
            raise ValueError(
                f"job name {v!r} is not valid: use at most {MAX_NAME} lowercase letters, digits and '-', starting "
                "with a letter and ending with a letter or digit (the operator names pods and Services after it, "
                "which must be DNS-1035 labels); job_name(run_id) builds one"
            )
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if len(v) > 63 or not _DNS1123_LABEL.match(v):
            raise ValueError(f"namespace {v!r} is not a valid Kubernetes namespace name (a DNS-1123 label)")
        return v

    @field_validator("s3_secret", "service_account")
    @classmethod
    def _object_name(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 253 or not _DNS1123_SUBDOMAIN.match(v)):
            raise ValueError(f"{v!r} is not a valid Kubernetes object name (lowercase DNS-1123 subdomain)")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not _ENV_NAME.match(key):
                raise ValueError(f"env name {key!r} is not a valid environment variable name")
            if key in SECRET_ENV:
                raise ValueError(f"env {key} must not be a plain value: put it in the Secret named by s3_secret")
            if key in OPERATOR_ENV or key.startswith("PET_"):
                raise ValueError(f"env {key} is set by the Training Operator for the rendezvous; remove it")
        return v

    @field_validator("cpu_request", "memory_request", "cpu_limit", "memory_limit", "shm_size", "cache_size")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        if v is not None and not _QUANTITY.match(v):
            raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. '4', '500m', '16Gi')")
        return v

    @field_validator("labels", "node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
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


def example_spec() -> TrainingJobSpec:
    """The documented example: 2 nodes x 8 GPUs; manifests/base/pytorchjob-template.yaml is its job."""
    return TrainingJobSpec(
        name="cafe-train-example",
        namespace="cafe",
        image="registry.example.com/cafe:0.1.0",
        nodes=2,
        gpus_per_node=8,
        argv=["-m", "cafe_core.cli", "train", "--config", "/app/configs/cluster.yaml", "run_id=example"],
        cpu_request="32",
        memory_request="256Gi",
        memory_limit="512Gi",
        shm_size="64Gi",
    )


# --- the PyTorchJob object ---------------------------------------------------------------------------


def procs_per_node(spec: TrainingJobSpec) -> int:
    """Training processes per pod: one per GPU, or one on a CPU job."""
    return spec.gpus_per_node or 1


def torchrun_command(spec: TrainingJobSpec) -> list[str]:
    """The container command: torchrun with static rendezvous on the operator's master address.

    The Training Operator v1.9 sets in every replica's `pytorch` container: MASTER_ADDR=<job>-master-0 (the
    Master pod, reachable through the Service the operator creates for it), MASTER_PORT=23456 (the port named
    pytorchjob-port), PET_MASTER_ADDR/PET_MASTER_PORT (the same), PET_NNODES=<replicas>, PET_NPROC_PER_NODE=
    <nprocPerNode>, PET_NODE_RANK=RANK=<node index> (Master 0, Worker i -> i+1), WORLD_SIZE=<replicas x
    nprocPerNode> and PYTHONUNBUFFERED. Worker pods also get an init container that waits until the master's
    name resolves.

    Static rendezvous, not c10d: the job is not elastic (fixed nodes, no elasticPolicy), the operator already
    hands every pod a fixed node rank and the master's address, and static keeps node rank 0 - hence global
    rank 0, the one that logs, checkpoints and writes the outputs - on the Master pod whose log
    cafe_core.cluster.jobs.run_training_job() follows. c10d would hand out node ranks in arrival order and
    gains nothing without elasticity. The same command works for one node (Master only, rank 0, the store on
    itself) and for N nodes.

    `$(VAR)` is expanded by Kubernetes from the container's env (which includes what the operator injects),
    so the flags spell out what torchrun would otherwise read implicitly from PET_* variables.
    """
    return [
        "python", "-m", "torch.distributed.run",
        f"--nnodes={spec.nodes}",
        f"--nproc_per_node={procs_per_node(spec)}",
        "--node_rank=$(PET_NODE_RANK)",
        "--master_addr=$(MASTER_ADDR)",
        "--master_port=$(MASTER_PORT)",
        "--rdzv_backend=static",
    ]


def container_env(spec: TrainingJobSpec) -> list[dict[str, Any]]:
    """Plain env (NCCL settings on GPU, then spec.env, which wins) followed by the S3 keys from the Secret."""
    # CAFE_IN_CLUSTER (cafe_core.connect.in_cluster): no embedded S3 server, credentials checked at start.
    plain = {**(GPU_ENV if spec.gpus_per_node else {}), "CAFE_IN_CLUSTER": "1", **spec.env}
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in plain.items()]
    if spec.s3_secret:
        for key, optional in S3_KEYS.items():
            ref: dict[str, Any] = {"name": spec.s3_secret, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def container_resources(spec: TrainingJobSpec) -> dict[str, Any]:
    """Requests, and limits where set; GPUs as an `nvidia.com/gpu` limit (the request follows it)."""
    requests = {"cpu": spec.cpu_request, "memory": spec.memory_request}
    limits: dict[str, Any] = {}
    if spec.cpu_limit:
        limits["cpu"] = spec.cpu_limit
    if spec.memory_limit:
        limits["memory"] = spec.memory_limit
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = spec.gpus_per_node
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


def pod_spec(spec: TrainingJobSpec) -> dict[str, Any]:
    """One replica's pod: the `pytorch` container, /dev/shm in memory, a node-local cache volume, no API token
    (training needs none)."""
    container = {
        "name": CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": torchrun_command(spec),
        "args": list(spec.argv),
        "env": container_env(spec),
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "resources": container_resources(spec),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "cafe-cache", "mountPath": CACHE_MOUNT}],
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
            {"name": "cafe-cache", "emptyDir": {"sizeLimit": spec.cache_size} if spec.cache_size else {}},
        ],
        "automountServiceAccountToken": False,
    }
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.gpus_per_node:  # GPU node pools are commonly tainted so that only GPU pods land there
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return pod


def job_labels(spec: TrainingJobSpec) -> dict[str, str]:
    """Labels on the job and its pods: the app's, then the caller's."""
    return {"app.kubernetes.io/name": "cafe", "app.kubernetes.io/component": "train", **spec.labels}


def replica_spec(spec: TrainingJobSpec, replicas: int) -> dict[str, Any]:
    """A Master or Worker replica set; failed containers restart in place, counted against backoffLimit."""
    return {
        "replicas": replicas,
        "restartPolicy": "OnFailure",
        "template": {"metadata": {"labels": job_labels(spec)}, "spec": pod_spec(spec)},
    }


def spec_digest(job: dict[str, Any]) -> str:
    """A short hash of a job object without its digest annotation and owner (a retried step's pod is another
    owner of the same job)."""
    blob = json.loads(json.dumps(job))
    blob.get("metadata", {}).get("annotations", {}).pop(SPEC_DIGEST, None)
    blob.get("metadata", {}).pop("ownerReferences", None)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def pytorchjob(spec: TrainingJobSpec) -> dict[str, Any]:
    """The PyTorchJob (kubeflow.org/v1) for a spec: a Master, nodes-1 Workers, torchrun in each."""
    replicas = {"Master": replica_spec(spec, 1)}
    if spec.nodes > 1:
        replicas["Worker"] = replica_spec(spec, spec.nodes - 1)
    job: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": job_labels(spec)},
        "spec": {
            "nprocPerNode": str(procs_per_node(spec)),
            "runPolicy": {
                "activeDeadlineSeconds": spec.active_deadline_seconds,
                "backoffLimit": spec.backoff_limit,
                "cleanPodPolicy": "Running",  # stop what still runs at the end; finished pods keep their logs
                **({"ttlSecondsAfterFinished": spec.ttl_seconds_after_finished}
                   if spec.ttl_seconds_after_finished is not None else {}),
            },
            "pytorchReplicaSpecs": replicas,
        },
    }
    if spec.owner is not None:
        job["metadata"]["ownerReferences"] = [spec.owner.reference()]
    job["metadata"]["annotations"] = {SPEC_DIGEST: spec_digest(job)}
    return job


TEMPLATE_HEADER = """\
# GENERATED by `python -m cafe_core.cluster.pytorchjob example > manifests/base/pytorchjob-template.yaml`
# from cafe_core.cluster.pytorchjob.example_spec(); tests/test_manifests.py fails when it drifts from pytorchjob().
# An example of what the pipeline's train step creates (2 nodes x 8 GPUs). Not in kustomization.yaml:
# applying it would start a training job. To run it by hand (namespace cafe; edit metadata.namespace for
# another): kubectl create -f manifests/base/pytorchjob-template.yaml
"""


def job_yaml(job: dict[str, Any]) -> str:
    """A job object as the committed template's YAML (header comment, keys in build order)."""
    return TEMPLATE_HEADER + yaml.safe_dump(job, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    """`python -m cafe_core.cluster.pytorchjob example`: print the example PyTorchJob (the committed template)."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["example"]:
        print("usage: python -m cafe_core.cluster.pytorchjob example > manifests/base/pytorchjob-template.yaml",
              file=sys.stderr)
        return 2
    sys.stdout.write(job_yaml(pytorchjob(example_spec())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
