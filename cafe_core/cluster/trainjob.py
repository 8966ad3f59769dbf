"""The Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1, Trainer v2.3) for a TrainingJobSpec: pure,
no cluster needed.

    spec = job_spec(cfg)          # cafe_core.cluster.spec, with cfg.cluster.api == "trainjob"
    job = trainjob(spec)          # a plain dict referring to the ClusterTrainingRuntime cluster.runtime

The runtime (torch-distributed by default) holds the JobSet template: one replicated Job `node` whose
container `node` the Trainer fills from spec.trainer (image, command, args, env, numNodes, resourcesPerNode,
numProcPerNode). What spec.trainer cannot say (volumes, placement, pull secrets, pod labels, the service
account) goes into spec.runtimePatches, which the Trainer merges into that template (strategic merge).
`python -m cafe_core.cluster.trainjob example` prints manifests/base/trainjob-template.yaml.
"""

from __future__ import annotations

import sys
from typing import Any

from cafe_core.cluster.pytorchjob import job_yaml
from cafe_core.cluster.spec import (
    TrainingJobSpec,
    container_env,
    example_spec,
    finish_metadata,
    job_labels,
    pod_labels,
    queued_at_creation,
    torchrun_command,
    pod_placement,
    volume_mounts,
    volumes,
)

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME_KIND = "ClusterTrainingRuntime"
# The torch runtimes' replicated Job and trainer container are both named "node" (Trainer constants.Node);
# the torch plugin injects the rendezvous env into that container only.
REPLICATED_JOB = CONTAINER = "node"
# runtimePatches are keyed by manager, a domain-prefixed path (Kueue writes its own, kueue.x-k8s.io/manager).
PATCH_MANAGER = "cafe/train-step"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # the JobSet is named after the TrainJob
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # label (k8s >= 1.28) and annotation of Indexed Jobs


def torchrun(spec: TrainingJobSpec) -> list[str]:
    """torchrun on the Trainer's rendezvous env.

    The Trainer v2.3 torch plugin (pkg/runtime/framework/plugins/torch/torch.go) sets in the container named
    `node`: PET_NNODES=<numNodes>, PET_NPROC_PER_NODE=<numProcPerNode>, PET_NODE_RANK from the pod's Job
    completion index (fieldRef metadata.annotations['batch.kubernetes.io/job-completion-index']),
    PET_MASTER_ADDR=<job>-node-0-0.<job> (the rank-0 pod's hostname under the JobSet's headless Service) and
    PET_MASTER_PORT=29500, and opens that port. It refuses a TrainJob that sets any of these itself.
    """
    return torchrun_command(spec, rank="PET_NODE_RANK", addr="PET_MASTER_ADDR", port="PET_MASTER_PORT")


def trainer(spec: TrainingJobSpec) -> dict[str, Any]:
    """spec.trainer: what the runtime's `node` container runs, on how many nodes, with what resources."""
    s = spec.settings
    return {
        "image": s.image,
        "command": torchrun(spec),
        "args": list(spec.argv),
        "env": container_env(spec),
        "numNodes": s.nodes,
        # Explicit: the Trainer's "auto" counts the CPUs of a CPU job as processes; cafe runs one per GPU or one.
        "numProcPerNode": s.procs_per_node(),
        "resourcesPerNode": s.resources(spec.cache_max_gb).requirements(),
    }


def pod_patch(spec: TrainingJobSpec) -> dict[str, Any]:
    """The pod settings a TrainJob carries (PodSpecPatch of Trainer v2.3): volumes and their mounts in the
    `node` container, placement, pull secrets, the service account."""
    pod: dict[str, Any] = {
        "volumes": volumes(spec),
        "containers": [{"name": CONTAINER, "volumeMounts": volume_mounts()}],  # env goes through spec.trainer
    }
    return {**pod, **pod_placement(spec)}


def runtime_patch(spec: TrainingJobSpec) -> dict[str, Any]:
    """This step's entry of spec.runtimePatches: the `node` replicated Job's pod template."""
    pod_template = {"metadata": {"labels": pod_labels(spec)}, "spec": pod_patch(spec)}
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
            {"name": REPLICATED_JOB, "template": {"spec": {"template": pod_template}}},
        ]}}},
    }


def trainjob(spec: TrainingJobSpec) -> dict[str, Any]:
    """The TrainJob (trainer.kubeflow.org/v1alpha1) for a spec."""
    s = spec.settings
    body: dict[str, Any] = {
        "runtimeRef": {"name": s.runtime, "apiGroup": GROUP, "kind": RUNTIME_KIND},
        "trainer": trainer(spec),
        "runtimePatches": [runtime_patch(spec)],
        "activeDeadlineSeconds": s.active_deadline_seconds,  # counted from creation or the last resume
    }
    if queued_at_creation(spec):
        body["suspend"] = True
    job: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": job_labels(spec)},
        "spec": body,
    }
    return finish_metadata(job, spec)


# --- reading a TrainJob back -------------------------------------------------------------------------


def pod_selector(name: str) -> str:
    """The label selector of a job's pods: the Trainer runs it as a JobSet of the same name."""
    return f"{JOBSET_NAME_LABEL}={name}"


def is_rank0(pod: dict[str, Any], name: str) -> bool:
    """The pod with node rank 0: Job 0 of the `node` replicated Job, completion index 0 (PET_NODE_RANK)."""
    meta = pod.get("metadata") or {}
    labels, notes = meta.get("labels") or {}, meta.get("annotations") or {}
    index = labels.get(COMPLETION_INDEX, notes.get(COMPLETION_INDEX))
    return (labels.get(REPLICATED_JOB_LABEL) == REPLICATED_JOB and labels.get(JOB_INDEX_LABEL) == "0"
            and index == "0")


def is_suspended(job: dict[str, Any]) -> bool:
    return bool((job.get("spec") or {}).get("suspend"))


# --- the committed example ---------------------------------------------------------------------------

TEMPLATE_HEADER = """\
# GENERATED by `python -m cafe_core.cluster.trainjob example > manifests/base/trainjob-template.yaml`
# from cafe_core.cluster.spec.example_spec("trainjob"); tests/test_trainjob.py fails when it drifts from trainjob().
# An example of what the pipeline's train step creates with cluster.api=trainjob (2 nodes x 8 GPUs, the
# defaults that scale with them), for the Kubeflow Trainer v2.3 ClusterTrainingRuntime torch-distributed.
# Not in kustomization.yaml: applying it would start a training job. To run it by hand (namespace cafe):
#   kubectl create -f manifests/base/trainjob-template.yaml
# `cafe job render --config FILE cluster.api=trainjob [key=value ...]` prints the job of any configuration.
"""


def main(argv: list[str] | None = None) -> int:
    """`python -m cafe_core.cluster.trainjob example`: print the example TrainJob (the committed template)."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["example"]:
        print("usage: python -m cafe_core.cluster.trainjob example > manifests/base/trainjob-template.yaml",
              file=sys.stderr)
        return 2
    sys.stdout.write(job_yaml(trainjob(example_spec("trainjob")), TEMPLATE_HEADER))
    return 0


if __name__ == "__main__":
    sys.exit(main())
