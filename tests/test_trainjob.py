"""The Kubeflow Trainer v2 TrainJob (cafe_core.cluster.trainjob) without a cluster: every generated job validates
against the vendored Trainer v2.3.0 TrainJob CRD, the pod the Trainer builds from it and the vendored
torch-distributed ClusterTrainingRuntime validates against the Kubernetes pod schema, torchrun's rendezvous
reads exactly the env each operator injects, the committed template is current, and `cafe job render` prints
what the train step creates."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from cafe_core.cli import main as cafe
from cafe_core.cluster import trainjob as tj
from cafe_core.cluster.kinds import TRAINJOB, job_object, trainjob_state
from cafe_core.cluster.pytorchjob import pytorchjob
from cafe_core.cluster.settings import ClusterConfig
from cafe_core.cluster.spec import TrainingJobSpec, example_spec, job_spec
from cafe_core.config import load_config
from tests.k8s_schemas import (
    PYTORCHJOB_CRD,
    RUNTIME_CRD,
    TORCH_RUNTIME,
    TRAINJOB_CRD,
    assert_valid_custom_object,
    assert_valid_pod,
    crd_schema,
    documents,
    unknown_fields,
)

BASE = Path(__file__).resolve().parents[1] / "manifests" / "base"
NS = "ml"
ARGV = ["-m", "cafe_core.cli", "train", "--config", "/app/configs/cluster.yaml", "run_id=r7"]
AFFINITY = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": {
    "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "cafe"}}}}]}}

# What each operator puts in the trainer container for the rendezvous (their sources, at the vendored versions):
# Training Operator v1.9 pkg/controller.v1/pytorch/envvar.go; Trainer v2.3 plugins/torch/torch.go (PET_* only;
# its TorchRunReservedEnvNames, which it refuses in a TrainJob's own env).
INJECTED = {
    "pytorchjob": {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT",
                   "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PYTHONUNBUFFERED"},
    "trainjob": {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"},
}


def schema():
    return crd_schema(TRAINJOB_CRD, "v1alpha1")


def spec_of(**settings) -> TrainingJobSpec:
    return TrainingJobSpec(name="cafe-train-x", namespace=NS, argv=ARGV,
                           settings=ClusterConfig(api="trainjob", **settings))


def runtime() -> dict:
    (obj,) = documents(TORCH_RUNTIME)
    return obj


def effective_pod(job: dict) -> dict:
    """The pod template the Trainer v2.3 derives for the `node` Job: the runtime's, with spec.runtimePatches
    merged in (by name for containers and volumes, as its strategic merge does) and the trainer container
    filled from spec.trainer and the torch plugin's env and port. A test stand-in for what the controller does."""
    (node,) = [r for r in runtime()["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == tj.REPLICATED_JOB]
    pod = copy.deepcopy(node["template"]["spec"]["template"])
    pod.setdefault("metadata", {}).setdefault("labels", {})
    spec = pod["spec"]
    (patch,) = job["spec"]["runtimePatches"]
    for rjob in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
        assert rjob["name"] == node["name"]
        template = rjob["template"]["spec"]["template"]
        pod["metadata"]["labels"].update(template["metadata"]["labels"])
        for key, value in template["spec"].items():
            if key == "containers":
                for c in value:
                    (target,) = [t for t in spec["containers"] if t["name"] == c["name"]]
                    target.setdefault("volumeMounts", []).extend(c.get("volumeMounts", []))
            elif key == "volumes":
                spec.setdefault("volumes", []).extend(value)
            else:
                spec[key] = value
    trainer = job["spec"]["trainer"]
    (container,) = [c for c in spec["containers"] if c["name"] == tj.CONTAINER]
    container.update(image=trainer["image"], command=trainer["command"], args=trainer["args"],
                     resources=trainer["resourcesPerNode"])
    rank = {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}
    container["env"] = trainer["env"] + [{"name": n, "value": "1"} for n in sorted(INJECTED["trainjob"]) if
                                         n != "PET_NODE_RANK"] + [rank]
    container["ports"] = [{"containerPort": 29500}]
    return pod


def assert_valid(job: dict) -> None:
    assert_valid_custom_object(job, schema())
    pod = effective_pod(job)
    assert_valid_pod(pod["spec"], pod["metadata"]["labels"])


# --- the TrainJob ------------------------------------------------------------------------------------


def test_one_node_cpu_job():
    job = tj.trainjob(spec_of())
    assert_valid(job)
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["spec"]["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                         "kind": "ClusterTrainingRuntime"}
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (1, 1)  # not "auto": that counts a CPU job's CPUs
    assert trainer["args"] == ARGV and trainer["image"] == "cafe-train:latest"
    assert trainer["resourcesPerNode"] == {"requests": {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "20Gi"},
                                           "limits": {"memory": "32Gi"}}
    assert "suspend" not in job["spec"] and job["spec"]["activeDeadlineSeconds"] == 3 * 24 * 3600
    pod = tj.pod_patch(spec_of())
    assert "tolerations" not in pod and pod["containers"] == [{"name": "node", "volumeMounts": [
        {"name": "dshm", "mountPath": "/dev/shm"}, {"name": "cafe-cache", "mountPath": "/var/cache/cafe"}]}]


def test_every_pod_setting_reaches_the_trainjob():
    spec = spec_of(image="registry.example.com/cafe-train:1", nodes=4, gpus_per_node=8, runtime="torch-h200",
                   extra_resources={"rdma/rdma_shared_device_a": "1"}, node_selector={"pool": "h200"},
                   tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
                   affinity=AFFINITY, service_account="cafe-train", image_pull_secrets=["regcred"],
                   env={"NCCL_IB_HCA": "mlx5"}, kueue_queue="gpu-queue", kueue_priority_class="prod",
                   active_deadline_seconds=7200)
    job = tj.trainjob(spec)
    assert_valid(job)
    assert job["spec"]["runtimeRef"]["name"] == "torch-h200"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "prod"
    assert job["spec"]["suspend"] is True and job["spec"]["activeDeadlineSeconds"] == 7200
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["limits"] == {"memory": "1280Gi", "nvidia.com/gpu": "8",
                                                     "rdma/rdma_shared_device_a": "1"}
    env = {e["name"]: e for e in trainer["env"]}
    assert env["NCCL_IB_HCA"]["value"] == "mlx5" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "cafe-s3"
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == "cafe/train-step"
    pod = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert pod["metadata"]["labels"] == {"app.kubernetes.io/name": "cafe", "app.kubernetes.io/component": "train"}
    assert pod["spec"]["nodeSelector"] == {"pool": "h200"} and pod["spec"]["affinity"] == AFFINITY
    assert pod["spec"]["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert pod["spec"]["serviceAccountName"] == "cafe-train"
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["spec"]["volumes"]


def test_a_broken_trainjob_fails_the_schema_check():
    job = tj.trainjob(spec_of())
    job["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(Exception, match="two"):
        assert_valid_custom_object(job, schema())
    job = tj.trainjob(spec_of())
    job["spec"]["podTemplateOverrides"] = []  # an older Trainer's field: v2.3 would prune it silently
    assert unknown_fields(job, schema()) == [".spec.podTemplateOverrides"]


def test_the_runtime_has_what_the_job_patches():
    """The Trainer refuses patches for a replicated Job or container its runtime lacks, and injects the
    rendezvous env only into the `node` container of the Job whose ancestor label is `trainer`."""
    rt = runtime()
    assert_valid_custom_object(rt, crd_schema(RUNTIME_CRD, "v1alpha1"))
    assert rt["kind"] == "ClusterTrainingRuntime" and rt["metadata"]["name"] == ClusterConfig().runtime
    assert "torch" in rt["spec"]["mlPolicy"]
    (node,) = [r for r in rt["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == tj.REPLICATED_JOB]
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert [c["name"] for c in node["template"]["spec"]["template"]["spec"]["containers"]] == [tj.CONTAINER]


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_torchrun_reads_the_rendezvous_env_its_operator_injects(api):
    spec = TrainingJobSpec(name="cafe-train-x", namespace=NS, argv=ARGV,
                           settings=ClusterConfig(api=api, nodes=3, gpus_per_node=8, env={"NCCL_DEBUG": "INFO"}))
    job = job_object(spec)
    if api == "trainjob":
        command, env = job["spec"]["trainer"]["command"], job["spec"]["trainer"]["env"]
    else:
        container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        command, env = container["command"], container["env"]
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(command)))
    assert referenced and referenced <= INJECTED[api], "torchrun refers to env its operator does not set"
    assert not {e["name"] for e in env} & INJECTED[api], "the job sets env its operator owns (or refuses)"
    assert {"--nnodes=3", "--nproc_per_node=8", "--rdzv_backend=static"} <= set(command)
    if api == "trainjob":
        assert referenced == {"PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}


# --- reading a TrainJob back -------------------------------------------------------------------------


def cond(kind: str, status: str = "True", reason: str = "") -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": f"{kind} {reason}"}


def test_trainjob_state_from_its_conditions_and_jobs_status():
    assert trainjob_state({}).type == "Submitted"
    assert trainjob_state({"status": {"conditions": [cond("Suspended", reason="Suspended")]}}).type == "Suspended"
    resumed = {"conditions": [cond("Suspended", "False", "Resumed")],
               "jobsStatus": [{"name": "node", "active": 1, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}]}
    assert trainjob_state({"status": resumed}).type == "Running"
    waiting = {"jobsStatus": [{"name": "node", "active": 0, "ready": 0, "succeeded": 0, "failed": 0, "suspended": 0}]}
    assert trainjob_state({"status": waiting}).type == "Created"
    assert trainjob_state({"status": {"conditions": [cond("Complete", reason="AllJobsCompleted")]}}).type == "Succeeded"
    both = [cond("Complete", "False"), cond("Failed", reason="DeadlineExceeded")]
    failed = trainjob_state({"status": {"conditions": both}})
    assert (failed.type, failed.reason) == ("Failed", "DeadlineExceeded")
    assert TRAINJOB.suspended({"spec": {"suspend": True}}) and not TRAINJOB.suspended({"spec": {}})


def test_the_rank0_pod_of_a_jobset():
    def pod(job_index: str, completion: str, rjob: str = "node", as_label: bool = True) -> dict:
        labels = {tj.JOBSET_NAME_LABEL: "j", tj.REPLICATED_JOB_LABEL: rjob, tj.JOB_INDEX_LABEL: job_index}
        meta: dict = {"name": f"j-{rjob}-{job_index}-{completion}-abcde", "labels": labels}
        if as_label:
            labels[tj.COMPLETION_INDEX] = completion
        else:  # clusters before 1.28 only annotate the index
            meta["annotations"] = {tj.COMPLETION_INDEX: completion}
        return {"metadata": meta}

    assert tj.is_rank0(pod("0", "0"), "j") and tj.is_rank0(pod("0", "0", as_label=False), "j")
    assert not tj.is_rank0(pod("0", "1"), "j") and not tj.is_rank0(pod("0", "0", rjob="launcher"), "j")
    assert tj.pod_selector("j") == "jobset.sigs.k8s.io/jobset-name=j"


# --- the committed example and `cafe job render` -----------------------------------------------------


def test_committed_template_is_what_trainjob_generates(capsys):
    committed = (BASE / "trainjob-template.yaml").read_text()
    generated = tj.job_yaml(tj.trainjob(example_spec("trainjob")), tj.TEMPLATE_HEADER)
    assert committed == generated, (
        "manifests/base/trainjob-template.yaml drifted from cafe_core.cluster.trainjob.trainjob(): regenerate it "
        "with `.venv/bin/python -m cafe_core.cluster.trainjob example > manifests/base/trainjob-template.yaml`")
    assert tj.main(["example"]) == 0 and capsys.readouterr().out == committed
    (job,) = documents(BASE / "trainjob-template.yaml")
    assert_valid(job)


@pytest.mark.parametrize("api, crd, version", [("pytorchjob", PYTORCHJOB_CRD, "v1"),
                                               ("trainjob", TRAINJOB_CRD, "v1alpha1")])
def test_job_render_prints_what_the_train_step_creates(api, crd, version, capsys, monkeypatch):
    monkeypatch.setenv("POD_NAMESPACE", "team-a")
    words = ["run_id=r1", f"cluster.api={api}", "cluster.gpus_per_node=8", "cluster.nodes=2", "cluster.kueue_queue=q"]
    assert cafe(["job", "render", "--config", "configs/cluster.yaml", *words]) == 0
    out, err = capsys.readouterr()
    rendered = yaml.safe_load(out)
    assert rendered["kind"] == {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}[api]
    assert_valid_custom_object(rendered, crd_schema(crd, version))
    # Exactly the train step's object (same builder path), less the owner the step adds.
    assert rendered == job_object(job_spec(load_config("configs/cluster.yaml", words)))
    assert "ownerReferences" not in rendered["metadata"] and rendered["metadata"]["namespace"] == "team-a"
    assert "owner" in err and "cluster.namespace is empty" in err


def test_job_render_refuses_a_bad_setting_like_every_command(capsys):
    code = cafe(["job", "render", "--config", "configs/cluster.yaml", "cluster.api=trainjob",
                 "cluster.backoff_limit=9"])
    assert code == 2 and "a TrainJob has no such setting" in capsys.readouterr().err


def test_a_pytorchjob_and_a_trainjob_of_one_spec_share_the_pod_settings():
    """The two APIs place the same replica pieces: resources, env, volumes, tolerations."""
    settings = dict(nodes=2, gpus_per_node=8, node_selector={"pool": "a"}, env={"X": "1"})
    pt = pytorchjob(TrainingJobSpec(name="cafe-train-x", namespace=NS, argv=ARGV,
                                    settings=ClusterConfig(api="pytorchjob", **settings)))
    tr = tj.trainjob(spec_of(**settings))
    pod = pt["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    patch = tr["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    patched = patch["template"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == tr["spec"]["trainer"]["resourcesPerNode"]
    assert pod["containers"][0]["env"] == tr["spec"]["trainer"]["env"]
    assert pod["volumes"] == patched["volumes"] and pod["tolerations"] == patched["tolerations"]
    assert pod["containers"][0]["volumeMounts"] == patched["containers"][0]["volumeMounts"]
