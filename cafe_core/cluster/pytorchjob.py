"""The Kubeflow Training Operator v1 PyTorchJob (kubeflow.org/v1, operator v1.9) for a TrainingJobSpec: pure,
no cluster needed.

    spec = job_spec(cfg)          # cafe_core.cluster.spec, with cfg.cluster.api == "pytorchjob"
    job = pytorchjob(spec)        # a plain dict: a Master and nodes-1 Workers, torchrun in each

cafe_core.cluster.jobs creates that object and follows it to the end. `python -m cafe_core.cluster.pytorchjob
example` prints the committed example, manifests/base/pytorchjob-template.yaml.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

# Re-exported (__all__): the job's specification used to live here, and callers import it from here.
from cafe_core.cluster.spec import (
    CACHE_MOUNT,
    GPU_ENV,
    MAX_NAME,
    S3_KEYS,
    S3_SECRET,
    SPEC_DIGEST,
    PodOwner,
    TrainingJobSpec,
    container_env,
    current_namespace,
    example_spec,
    finish_metadata,
    job_labels,
    job_name,
    kfp_step_owner,
    pod_labels,
    queued_at_creation,
    spec_digest,
    pod_placement,
    volume_mounts,
    volumes,
)
from cafe_core.cluster.spec import torchrun_command as _torchrun

__all__ = [
    "CACHE_MOUNT", "CONTAINER", "GPU_ENV", "GROUP", "JOB_NAME_LABEL", "KIND", "MAX_NAME", "PLURAL", "PORT",
    "PORT_NAME", "S3_KEYS", "S3_SECRET", "SPEC_DIGEST", "VERSION", "PodOwner", "TrainingJobSpec", "current_namespace",
    "example_spec", "job_name", "job_yaml", "kfp_step_owner", "main", "pod_spec", "pytorchjob", "spec_digest",
    "torchrun_command",
]

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"  # the operator injects its env and finds the master port only in a container of this name
PORT_NAME, PORT = "pytorchjob-port", 23456  # the operator's default name and port for the rendezvous
JOB_NAME_LABEL = "training.kubeflow.org/job-name"  # set by the operator on every pod of a job
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"  # "master" / "worker"
REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"


def torchrun_command(spec: TrainingJobSpec) -> list[str]:
    """torchrun on the operator's rendezvous env.

    The Training Operator v1.9 sets in every replica's `pytorch` container: MASTER_ADDR=<job>-master-0 (the
    Master pod, reachable through the Service the operator creates for it), MASTER_PORT=23456 (the port named
    pytorchjob-port), PET_MASTER_ADDR/PET_MASTER_PORT (the same), PET_NNODES=<replicas>, PET_NPROC_PER_NODE=
    <nprocPerNode>, PET_NODE_RANK=RANK=<node index> (Master 0, Worker i -> i+1), WORLD_SIZE=<replicas x
    nprocPerNode> and PYTHONUNBUFFERED. Worker pods also get an init container that waits until the master's
    name resolves. See cafe_core.cluster.spec.torchrun_command for why the rendezvous is static.
    """
    return _torchrun(spec, rank="PET_NODE_RANK", addr="MASTER_ADDR", port="MASTER_PORT")


def pod_spec(spec: TrainingJobSpec) -> dict[str, Any]:
    """One replica's pod: the `pytorch` container, /dev/shm in memory, a node-local cache volume, no API token
    (training needs none), placement from the settings."""
    s = spec.settings
    container = {
        "name": CONTAINER,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        "command": torchrun_command(spec),
        "args": list(spec.argv),
        "env": container_env(spec),
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "resources": s.resources(spec.cache_max_gb).requirements(),
        "volumeMounts": volume_mounts(),
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes(spec),
        "automountServiceAccountToken": False,
    }
    if s.priority_class:
        pod["priorityClassName"] = s.priority_class
    return {**pod, **pod_placement(spec)}


def replica_spec(spec: TrainingJobSpec, replicas: int) -> dict[str, Any]:
    """A Master or Worker replica set; restartPolicy from the settings (OnFailure: failed containers restart
    in place, counted against backoffLimit)."""
    return {
        "replicas": replicas,
        "restartPolicy": spec.settings.restart_policy,
        "template": {"metadata": {"labels": pod_labels(spec)}, "spec": pod_spec(spec)},
    }


def run_policy(spec: TrainingJobSpec) -> dict[str, Any]:
    s = spec.settings
    policy: dict[str, Any] = {
        "activeDeadlineSeconds": s.active_deadline_seconds,
        "backoffLimit": s.backoff_limit,
        "cleanPodPolicy": "Running",  # stop what still runs at the end; finished pods keep their logs
    }
    if s.ttl_seconds_after_finished is not None:
        policy["ttlSecondsAfterFinished"] = s.ttl_seconds_after_finished
    if s.scheduling is not None:
        gang = {"minAvailable": s.scheduling.min_available, "queue": s.scheduling.queue,
                "priorityClass": s.scheduling.priority_class}
        policy["schedulingPolicy"] = {k: v for k, v in gang.items() if v is not None}
    if queued_at_creation(spec):
        policy["suspend"] = True
    return policy


def pytorchjob(spec: TrainingJobSpec) -> dict[str, Any]:
    """The PyTorchJob (kubeflow.org/v1) for a spec: a Master, nodes-1 Workers, torchrun in each."""
    replicas = {"Master": replica_spec(spec, 1)}
    if spec.settings.nodes > 1:
        replicas["Worker"] = replica_spec(spec, spec.settings.nodes - 1)
    job: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": job_labels(spec)},
        "spec": {
            "nprocPerNode": str(spec.settings.procs_per_node()),
            "runPolicy": run_policy(spec),
            "pytorchReplicaSpecs": replicas,
        },
    }
    return finish_metadata(job, spec)


# --- reading a PyTorchJob back -----------------------------------------------------------------------


def pod_selector(name: str) -> str:
    """The label selector of a job's pods (the operator labels every pod with its job's name)."""
    return f"{JOB_NAME_LABEL}={name}"


def is_rank0(pod: dict[str, Any], name: str) -> bool:
    """The Master pod: node rank 0, hence global rank 0."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if REPLICA_TYPE_LABEL in labels:
        return labels[REPLICA_TYPE_LABEL].lower() == "master" and labels.get(REPLICA_INDEX_LABEL) == "0"
    return meta.get("name") == f"{name}-master-0"


def is_suspended(job: dict[str, Any]) -> bool:
    return bool(((job.get("spec") or {}).get("runPolicy") or {}).get("suspend"))


# --- the committed example ---------------------------------------------------------------------------

TEMPLATE_HEADER = """\
# GENERATED by `python -m cafe_core.cluster.pytorchjob example > manifests/base/pytorchjob-template.yaml`
# from cafe_core.cluster.spec.example_spec(); tests/test_manifests.py fails when it drifts from pytorchjob().
# An example of what the pipeline's train step creates with cluster.api=pytorchjob (2 nodes x 8 GPUs, the
# defaults that scale with them). Not in kustomization.yaml: applying it would start a training job. To run it
# by hand (namespace cafe; edit metadata.namespace for another):
#   kubectl create -f manifests/base/pytorchjob-template.yaml
# `cafe job render --config FILE [key=value ...]` prints the job of any configuration.
"""


def job_yaml(job: dict[str, Any], header: str = TEMPLATE_HEADER) -> str:
    """A job object as the committed template's YAML (header comment, keys in build order)."""
    return header + yaml.safe_dump(job, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    """`python -m cafe_core.cluster.pytorchjob example`: print the example PyTorchJob (the committed template)."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["example"]:
        print("usage: python -m cafe_core.cluster.pytorchjob example > manifests/base/pytorchjob-template.yaml",
              file=sys.stderr)
        return 2
    sys.stdout.write(job_yaml(pytorchjob(example_spec("pytorchjob"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
