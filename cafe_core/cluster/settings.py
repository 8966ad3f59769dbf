"""The `cluster:` section of the configuration: how the train step's training job runs on Kubernetes.

    cluster:
      api: pytorchjob          # or trainjob (Kubeflow Trainer v2)
      image: registry.example.com/cafe-train:0.1.0
      nodes: 2
      gpus_per_node: 8
      kueue_queue: gpu-queue

Pure: no Kubernetes client. Every value is checked here, with the key and the fix in the message, so a bad
setting fails when the configuration is loaded, not when the API server refuses the job an hour later.
cafe_core.cluster.spec turns a configuration into the job's specification; docs/training-jobs.md lists the
keys and their defaults.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# --- names and values Kubernetes accepts -------------------------------------------------------------

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A qualified name: label keys, resource names (nvidia.com/gpu), taint keys.
QUALIFIED_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
# Kubernetes resource quantities, as in the CRDs' schemas.
_NUMBER = r"(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
QUANTITY = re.compile(rf"^{_NUMBER}(([KMGTPE]i)|[numkMGTPE]|([eE]{_NUMBER}))?$")
_SUFFIX = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6,
           "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
           "Pi": 2**50, "Ei": 2**60}

# Env that is never a plain value: credentials come from the Secret (s3_secret) or the pod's identity.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Env the operators set for torchrun's rendezvous (the Training Operator; the Trainer's torch plugin refuses
# any PET_* of its own, TorchRunReservedEnvNames), and every PET_* name.
OPERATOR_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")
# Env the train step itself sets in the job (cafe_core.cluster.spec).
JOB_ENV = ("CAFE_CONFIG_YAML", "CAFE_IN_CLUSTER")

WEEK_SECONDS = 7 * 24 * 3600
THREE_DAYS = 3 * 24 * 3600


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes quantity as a number: '500m' -> 0.5, '16Gi' -> 17179869184, '1e3' -> 1000."""
    m = re.fullmatch(rf"(?P<number>{_NUMBER})(?P<suffix>[KMGTPE]i|[numkMGTPE]|[eE]{_NUMBER})?", text)
    if not m:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. '4', '500m', '16Gi')")
    number, suffix = Decimal(m["number"]), m["suffix"] or ""
    if len(suffix) > 1 and suffix[0] in "eE":  # an exponent; a bare "E" is exa
        try:
            return number * Decimal(10) ** Decimal(suffix[1:])
        except InvalidOperation:
            raise ValueError(f"{text!r}: exponent out of range") from None
    return number * _SUFFIX[suffix]


def gib(text: str) -> float:
    """A quantity in GiB (for messages)."""
    return float(parse_quantity(text) / 2**30)


# --- the section's parts -----------------------------------------------------------------------------


class _Strict(BaseModel):
    # Same policy as cafe_core.config.Strict (not imported: config imports this module).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class Toleration(_Strict):
    """A pod toleration (Kubernetes' fields; toleration_seconds is tolerationSeconds)."""

    key: str | None = None  # None with operator Exists: tolerate every taint
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None  # None: every effect
    toleration_seconds: int | None = Field(None, ge=0, alias="tolerationSeconds")

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        if v is not None and not QUALIFIED_NAME.match(v):
            raise ValueError(f"toleration key {v!r} is not a valid taint key (e.g. nvidia.com/gpu)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Toleration":
        if self.operator == "Exists" and self.value:
            raise ValueError(f"toleration {self.key}: operator Exists takes no value; remove value or use Equal")
        if self.operator == "Equal" and not self.key:
            raise ValueError("a toleration without key must use operator Exists (it then tolerates every taint)")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError(f"toleration {self.key}: toleration_seconds only applies to effect NoExecute")
        return self

    def manifest(self) -> dict[str, Any]:
        """As in a pod spec (camelCase, unset fields left out)."""
        out = {"key": self.key, "operator": self.operator, "value": self.value, "effect": self.effect,
               "tolerationSeconds": self.toleration_seconds}
        return {k: v for k, v in out.items() if v is not None}


class SchedulingPolicy(_Strict):
    """PyTorchJob runPolicy.schedulingPolicy: gang scheduling with Volcano or scheduler-plugins (the Training
    Operator creates a PodGroup when its gang scheduler is enabled). Not for Kueue: use kueue_queue."""

    min_available: int | None = Field(None, ge=1)  # pods that must start together; None: all of them
    queue: str | None = None  # the Volcano queue
    priority_class: str | None = None  # the PodGroup's PriorityClass

    @field_validator("queue", "priority_class")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and (len(v) > 253 or not DNS1123_SUBDOMAIN.match(v)):
            raise ValueError(f"{v!r} is not a valid Kubernetes object name (lowercase DNS-1123 subdomain)")
        return v


@dataclass(frozen=True)
class Resources:
    """A replica's resources with the defaults filled in (ClusterConfig.resources())."""

    cpu: str
    memory: str
    cpu_limit: str | None
    memory_limit: str | None
    ephemeral_storage: str
    shm_size: str
    cache_size: str
    gpus: int
    gpu_resource: str
    extra: dict[str, str]

    def requirements(self) -> dict[str, Any]:
        """Kubernetes ResourceRequirements. GPUs and extra resources (RDMA devices, ...) are extended
        resources, which cannot be overcommitted: requests equal limits."""
        requests: dict[str, Any] = {"cpu": self.cpu, "memory": self.memory, "ephemeral-storage": self.ephemeral_storage}
        limits: dict[str, Any] = {}
        if self.cpu_limit:
            limits["cpu"] = self.cpu_limit
        if self.memory_limit:
            limits["memory"] = self.memory_limit
        devices = {**({self.gpu_resource: str(self.gpus)} if self.gpus else {}), **self.extra}
        requests.update(devices)
        limits.update(devices)
        return {"requests": requests, "limits": limits} if limits else {"requests": requests}


# --- defaults that scale with the GPUs of a node -----------------------------------------------------
#
# Per GPU, sized for 8 x H100 / H200 nodes (2 x 48-56 core CPUs = 192-224 vCPUs, 1.8-2 TiB memory: AWS p5 /
# p5en, GCP a3-high / a3-ultra, Azure ND H100 v5, DGX H100/H200), so that 8 GPUs ask for well under what such
# a node can allocate after its system reservations and DaemonSets:
# - cpu 12 (96 of ~192): DataLoader workers, image decoding and tokenization for one rank, plus NCCL's and
#   DeepSpeed's threads. No CPU limit by default: CFS quotas throttle NCCL's progress threads and the data
#   loaders in bursts, which stalls every rank; the request already guarantees the share.
# - memory 96Gi (768Gi), limit 160Gi (1280Gi): each rank loads the checkpoint (a 7B model is ~16 GiB in
#   bf16) and ZeRO-2 keeps optimizer state on the GPU, so host memory goes to loading, checkpoint gathering
#   and the data pipeline; the limit leaves room for those peaks and /dev/shm (a memory volume counts against
#   the pod's memory) while still stopping a leak before it takes the node down.
# - shm 8Gi (64Gi): DataLoader workers hand batches to their rank through /dev/shm, NCCL's intra-node
#   transport keeps its buffers there; Docker's 64 MiB default breaks both.
# - ephemeral storage: 20Gi + 5Gi per GPU for the container's writable layer, logs, /tmp and the compilers'
#   caches (triton/inductor, per rank), plus the cache volume below, which lives on the same node disk: the
#   scheduler then only picks nodes with that much disk, instead of the kubelet evicting the pod later.
# A CPU job (gpus_per_node 0, one process per node, small runs and smoke tests) asks for 4 CPUs, 16Gi
# (limit 32Gi), 2Gi of shm and 20Gi of disk (its cache volume is bounded by its sizeLimit, not requested).
#
# The cache volume (node-local, shared by the node's ranks) does not scale with GPUs but with what it holds:
# train.cache.max_gb of training shards (cafe_core.cache never exceeds it) plus the model checkpoint fetched
# from S3 (MODEL_ALLOWANCE_GI: a 32B model in bf16 fits). The kubelet evicts a pod whose emptyDir outgrows
# its sizeLimit, so the limit must cover both.
PER_GPU = {"cpu": 12, "memory_gi": 96, "memory_limit_gi": 160, "shm_gi": 8, "disk_gi": 5}
CPU_JOB = {"cpu": "4", "memory": "16Gi", "memory_limit": "32Gi", "shm_size": "2Gi"}
BASE_DISK_GI = 20
MODEL_ALLOWANCE_GI = 64


def default_cache_size(cache_max_gb: float) -> str:
    """The cache volume's size limit for train.cache.max_gb of shards plus the model."""
    return f"{math.ceil(cache_max_gb) + MODEL_ALLOWANCE_GI}Gi"


# --- the section -------------------------------------------------------------------------------------

QUANTITY_KEYS = ("cpu", "memory", "cpu_limit", "memory_limit", "ephemeral_storage", "shm_size", "cache_size")
# Settings a TrainJob (Kubeflow Trainer v2.3) has no field for: they belong to the ClusterTrainingRuntime.
PYTORCHJOB_ONLY = {
    "restart_policy": "the runtime's Job template sets the pods' restartPolicy",
    "backoff_limit": "retries are the runtime's JobSet failurePolicy / Job backoffLimit",
    "ttl_seconds_after_finished": "a TrainJob has no TTL (the runtime's JobSet may have one); cleanup deletes it",
    "scheduling": "gang scheduling is the runtime's podGroupPolicy",
    "priority_class": "set priorityClassName in the runtime's pod template, or use kueue_priority_class",
    "image_pull_policy": "the runtime's container sets imagePullPolicy",
}


class ClusterConfig(_Strict):
    """The train step's training job in the cluster (`cluster.*`). Quantities left at None get defaults that
    scale with gpus_per_node (see PER_GPU)."""

    # --- which API ---
    api: Literal["pytorchjob", "trainjob"] = "pytorchjob"  # Training Operator v1 PyTorchJob | Trainer v2 TrainJob
    runtime: str = "torch-distributed"  # trainjob: the ClusterTrainingRuntime the job refers to

    # --- what runs where ---
    image: str = Field("cafe-train:latest", min_length=1)
    nodes: int = Field(1, ge=1, le=256)  # pods, one per node
    gpus_per_node: int = Field(0, ge=0, le=16)  # processes per pod; 0 = a CPU job with one process per pod
    namespace: str = ""  # "" = the train step's own (current_namespace()), where its Secret and Role are
    # Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL (each optional); None or "": no S3
    # env from a Secret (credentials from the pods' identity: IRSA, pod identity, instance role).
    s3_secret: str | None = "cafe-s3"

    # --- per replica resources (None: scaled default, see PER_GPU) ---
    cpu: str | None = None
    memory: str | None = None
    cpu_limit: str | None = None
    memory_limit: str | None = None
    ephemeral_storage: str | None = None  # the request; includes the cache volume
    shm_size: str | None = None  # /dev/shm, a memory emptyDir
    cache_size: str | None = None  # the node-local cache volume's sizeLimit (train.cache.max_gb + the model)
    gpu_resource: str = "nvidia.com/gpu"  # the device plugin's resource name (amd.com/gpu, ...)
    # Further extended resources per pod, requests = limits, e.g. {"rdma/rdma_shared_device_a": "1"}.
    extra_resources: dict[str, str] = Field(default_factory=dict)

    # --- placement ---
    node_selector: dict[str, str] = Field(default_factory=dict)
    # Added to the toleration every GPU job gets for the `<gpu_resource>` taint GPU node pools commonly carry.
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = None  # a Kubernetes Affinity object, as in a pod spec
    priority_class: str | None = None  # the pods' PriorityClass (pytorchjob)
    kueue_queue: str | None = None  # the Kueue LocalQueue: label kueue.x-k8s.io/queue-name, created suspended
    kueue_priority_class: str | None = None  # a Kueue WorkloadPriorityClass: label kueue.x-k8s.io/priority-class
    scheduling: SchedulingPolicy | None = None  # pytorchjob: runPolicy.schedulingPolicy (Volcano, coscheduling)

    # --- pods ---
    service_account: str | None = None  # the replicas' own; training calls no Kubernetes API
    image_pull_secrets: list[str] = Field(default_factory=list)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    env: dict[str, str] = Field(default_factory=dict)  # plain env, e.g. NCCL_SOCKET_IFNAME; never credentials

    # --- lifecycle ---
    active_deadline_seconds: int = Field(THREE_DAYS, ge=1)  # the operator fails the job after this
    # The operator deletes a finished job (and its pods) this long after it ends, so that a Failed job kept
    # for inspection does not stay forever. None: kept until deleted.
    ttl_seconds_after_finished: int | None = Field(THREE_DAYS, ge=0)
    backoff_limit: int = Field(2, ge=0)  # restarts (restart_policy OnFailure/ExitCode) before the job fails
    # OnFailure: a failed container restarts in place (the pod keeps its node and cache). Never: a failed pod
    # fails the job. ExitCode: restart only on retryable exit codes (128+: signals, e.g. a preempted node).
    restart_policy: Literal["OnFailure", "Never", "ExitCode"] = "OnFailure"
    pending_timeout_seconds: float = Field(900.0, ge=0)  # how long admitted pods may be unable to start
    # Delete the job at the end: always; on_success (and when the step gives up on a job that is still
    # alive: stuck, timed out, interrupted), keeping failed jobs for inspection; never.
    cleanup: Literal["always", "on_success", "never"] = "on_success"

    # --- field checks ---

    @field_validator(*QUANTITY_KEYS, mode="before")
    @classmethod
    def _number_as_quantity(cls, v: Any) -> Any:
        # `cluster.cpu=8` and `cpu: 8` arrive as numbers.
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator(*QUANTITY_KEYS)
    @classmethod
    def _quantity(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not QUANTITY.match(v):
            raise ValueError(f"cluster.{info.field_name}={v!r} is not a Kubernetes quantity (e.g. '4', '500m', "
                             "'16Gi')")
        if v is not None and parse_quantity(v) <= 0:
            raise ValueError(f"cluster.{info.field_name}={v!r} must be positive (null for the default)")
        return v

    @field_validator("s3_secret", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v == "" else v  # a pipeline parameter cannot be null

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if v and (len(v) > 63 or not DNS1123_LABEL.match(v)):
            raise ValueError(f"cluster.namespace={v!r} is not a namespace name (a DNS-1123 label); \"\" is the "
                             "train step's own")
        return v

    @field_validator("runtime", "s3_secret", "service_account", "priority_class", "kueue_priority_class")
    @classmethod
    def _object_name(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and (len(v) > 253 or not DNS1123_SUBDOMAIN.match(v)):
            raise ValueError(f"cluster.{info.field_name}={v!r} is not a valid Kubernetes object name (lowercase "
                             "letters, digits, '-' and '.')")
        return v

    @field_validator("kueue_queue")
    @classmethod
    def _queue(cls, v: str | None) -> str | None:
        # A LocalQueue name, used as a label value: both rules apply.
        if v is not None and (len(v) > 63 or not DNS1123_SUBDOMAIN.match(v) or not LABEL_VALUE.match(v)):
            raise ValueError(f"cluster.kueue_queue={v!r} is not a LocalQueue name usable as a label value "
                             "(at most 63 lowercase letters, digits, '-' and '.')")
        return v

    @field_validator("image_pull_secrets")
    @classmethod
    def _secret_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
                raise ValueError(f"cluster.image_pull_secrets: {name!r} is not a valid Secret name")
        return v

    @field_validator("gpu_resource")
    @classmethod
    def _resource_name(cls, v: str) -> str:
        if "/" not in v or not QUALIFIED_NAME.match(v):
            raise ValueError(f"cluster.gpu_resource={v!r} is not an extended resource name (e.g. nvidia.com/gpu)")
        return v

    @field_validator("extra_resources", mode="before")
    @classmethod
    def _extra_numbers(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for k, x in v.items()}
        return v

    @field_validator("extra_resources")
    @classmethod
    def _extra(cls, v: dict[str, str]) -> dict[str, str]:
        for name, amount in v.items():
            if "/" not in name or not QUALIFIED_NAME.match(name):
                raise ValueError(f"cluster.extra_resources: {name!r} is not an extended resource name (e.g. "
                                 "rdma/rdma_shared_device_a); cpu, memory and GPUs have their own keys")
            if not QUANTITY.match(amount):
                raise ValueError(f"cluster.extra_resources.{name}={amount!r} is not a Kubernetes quantity")
        return v

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not QUALIFIED_NAME.match(key) or not LABEL_VALUE.match(value):
                raise ValueError(f"cluster.node_selector: {key}={value!r} is not a valid node label (key and value)")
        return v

    @field_validator("affinity")
    @classmethod
    def _affinity(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        allowed = {"nodeAffinity", "podAffinity", "podAntiAffinity"}
        if v is not None and not set(v) <= allowed:
            raise ValueError(f"cluster.affinity: unknown keys {sorted(set(v) - allowed)}; a Kubernetes Affinity has "
                             f"{sorted(allowed)} (camelCase, as in a pod spec)")
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env_numbers(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for key, value in v.items():
                if isinstance(value, bool):
                    raise ValueError(f"cluster.env.{key}: quote the value ('{str(value).lower()}'); env values "
                                     "are text")
            return {k: str(x) if isinstance(x, (int, float)) else x for k, x in v.items()}
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            check_env_name(key, "cluster.env")
        return v

    # --- checks across fields ---

    @model_validator(mode="after")
    def _limits_cover_requests(self) -> "ClusterConfig":
        res = self.resources(cache_max_gb=1)  # the cache does not enter these comparisons
        for request, limit in (("cpu", "cpu_limit"), ("memory", "memory_limit")):
            have, cap = getattr(res, request), getattr(res, limit)
            if cap is not None and parse_quantity(have) > parse_quantity(cap):
                raise ValueError(
                    f"cluster.{request}={have} is more than cluster.{limit}={cap} (set explicitly or scaled with "
                    f"gpus_per_node={self.gpus_per_node}): Kubernetes refuses a request above its limit; raise "
                    f"{limit} or lower {request}")
        if res.memory_limit and parse_quantity(res.shm_size) >= parse_quantity(res.memory_limit):
            raise ValueError(f"cluster.shm_size={res.shm_size} does not fit in cluster.memory_limit="
                             f"{res.memory_limit}: /dev/shm is memory and counts against the pod's limit")
        return self

    @model_validator(mode="after")
    def _fits_the_api(self) -> "ClusterConfig":
        if self.scheduling is not None and self.scheduling.min_available and self.scheduling.min_available > self.nodes:
            raise ValueError(f"cluster.scheduling.min_available={self.scheduling.min_available} is more than the "
                             f"job's {self.nodes} pods (cluster.nodes): the gang could never start")
        if self.api != "trainjob":
            return self
        for key, why in PYTORCHJOB_ONLY.items():
            if getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"cluster.{key}={getattr(self, key)!r}: a TrainJob has no such setting ({why}); "
                                 f"remove it, or use cluster.api=pytorchjob")
        return self

    # --- derived values ---

    def procs_per_node(self) -> int:
        """Training processes per pod: one per GPU, or one on a CPU job."""
        return self.gpus_per_node or 1

    def resources(self, cache_max_gb: float) -> Resources:
        """Each replica's resources, defaults filled in from gpus_per_node and train.cache.max_gb."""
        g = self.gpus_per_node
        if g:
            scaled = {"cpu": str(PER_GPU["cpu"] * g), "memory": f"{PER_GPU['memory_gi'] * g}Gi",
                      "memory_limit": f"{PER_GPU['memory_limit_gi'] * g}Gi", "shm_size": f"{PER_GPU['shm_gi'] * g}Gi"}
        else:
            scaled = dict(CPU_JOB)
        cache = self.cache_size or default_cache_size(cache_max_gb)
        # GPU jobs train on real data (hundreds of GiB): the disk request covers the cache volume, so that the
        # scheduler finds the disk. A CPU job (smoke runs, small clusters) asks only for its base; its cache
        # stays bounded by the volume's sizeLimit.
        disk = self.ephemeral_storage or (
            f"{BASE_DISK_GI + PER_GPU['disk_gi'] * g + math.ceil(gib(cache))}Gi" if g else f"{BASE_DISK_GI}Gi")
        # An explicit memory without an explicit limit: the scaled limit would no longer fit, so none.
        memory_limit = self.memory_limit or (None if self.memory else scaled["memory_limit"])
        return Resources(
            cpu=self.cpu or scaled["cpu"], memory=self.memory or scaled["memory"], cpu_limit=self.cpu_limit,
            memory_limit=memory_limit, ephemeral_storage=disk, shm_size=self.shm_size or scaled["shm_size"],
            cache_size=cache, gpus=g, gpu_resource=self.gpu_resource, extra=dict(self.extra_resources))

    def all_tolerations(self) -> list[dict[str, Any]]:
        """The GPU taint's toleration on GPU jobs, then cluster.tolerations."""
        base = [{"key": self.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}] if self.gpus_per_node else []
        return base + [t.manifest() for t in self.tolerations if t.manifest() not in base]


def check_env_name(key: str, where: str) -> None:
    """Refuse an env name that is not one, a credential, or one the operators or the train step set."""
    if not ENV_NAME.match(key):
        raise ValueError(f"{where}: {key!r} is not a valid environment variable name")
    if key in SECRET_ENV:
        raise ValueError(f"{where}.{key} must not be a plain value: put it in the Secret named by cluster.s3_secret "
                         "(or give the pods an identity: IRSA, pod identity)")
    if key in OPERATOR_ENV or key.startswith("PET_"):
        raise ValueError(f"{where}.{key} is set by the Training Operator / Trainer for torchrun's rendezvous; "
                         "remove it")
    if key in JOB_ENV:
        raise ValueError(f"{where}.{key} is set by the train step itself; remove it")
