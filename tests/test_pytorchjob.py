"""The training job's specification and the PyTorchJob it becomes, without a cluster: job names, what
TrainingJobSpec refuses, job_spec() from a configuration (the one path of the train step and `cafe job render`),
every pod setting of the `cluster:` section in the PyTorchJob, validated against the Training Operator v1.9 CRD
and the Kubernetes pod schema. The committed template is checked in test_manifests.py, TrainJobs in
test_trainjob.py, creating and following jobs in test_cluster_jobs.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError

from cafe_core.cluster.kinds import job_object
from cafe_core.cluster.pytorchjob import CONTAINER, pytorchjob
from cafe_core.cluster.settings import ClusterConfig
from cafe_core.cluster.spec import MAX_NAME, PodOwner, TrainingJobSpec, job_name, job_spec, spec_digest
from cafe_core.config import load_config
from tests.k8s_schemas import PYTORCHJOB_CRD, assert_valid_custom_object, assert_valid_pod, crd_schema

NS = "ml"
ARGV = ["-m", "cafe_core.cli", "train", "--config", "/app/configs/cluster.yaml", "run_id=r7"]


def schema():
    return crd_schema(PYTORCHJOB_CRD, "v1")


def spec_of(**settings) -> TrainingJobSpec:
    return TrainingJobSpec(name="cafe-train-x", namespace=NS, argv=ARGV, settings=ClusterConfig(**settings))


def pods_of(job: dict) -> list[dict]:
    return [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()]


def assert_valid(job: dict) -> None:
    assert_valid_custom_object(job, schema())
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert_valid_pod(replica["template"]["spec"], replica["template"]["metadata"]["labels"])


def test_job_name_from_run_ids():
    assert job_name("20250101-120000") == "cafe-train-20250101-120000"
    assert job_name("Run_1") != job_name("run-1")
    long = job_name("x" * 100)
    assert len(long) <= MAX_NAME == 48
    assert TrainingJobSpec(name=long, namespace=NS, argv=ARGV).name == long


@pytest.mark.parametrize("field, value, words", [
    ("name", "Cafe_Train", "lowercase"),
    ("name", "7-starts-with-digit", "starting with a letter"),
    ("namespace", "Team", "DNS-1123"),
    ("env", {"AWS_SECRET_ACCESS_KEY": "x"}, "Secret"),
    ("env", {"MASTER_ADDR": "x"}, "rendezvous"),
    ("argv", ["train"], "'-m MODULE' or a script"),
    ("labels", {"team": "a b"}, "not a valid Kubernetes label"),
])
def test_spec_rejects_with_a_clear_message(field, value, words):
    kw = {"name": "cafe-train-x", "namespace": NS, "argv": ARGV, field: value}
    with pytest.raises(ValidationError, match=words):
        TrainingJobSpec(**kw)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        TrainingJobSpec(name="cafe-train-x", argv=ARGV, gpu=1)


def test_the_replicas_marker_is_the_one_connect_reads():
    from cafe_core.cluster.spec import IN_CLUSTER_ENV
    from cafe_core.connect import IN_CLUSTER_ENV as read

    assert IN_CLUSTER_ENV == read  # defined twice: the builder must not import boto3 (connect does)


def test_building_jobs_imports_no_kubernetes_client():
    code = ("import sys, cafe_core.cluster.kinds as k, cafe_core.cluster.spec as s; "
            "[k.job_object(s.example_spec(api)) for api in ('pytorchjob', 'trainjob')]; "
            "print(sorted(m for m in ('kubernetes', 'urllib3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- from a configuration ----------------------------------------------------------------------------


def test_job_spec_of_a_configuration(monkeypatch):
    monkeypatch.setenv("POD_NAMESPACE", "team-vision")
    cfg = load_config("configs/cluster.yaml", ["run_id=Run_7", "s3.region=eu-west-1", "cluster.gpus_per_node=8",
                                               "cluster.env.NCCL_SOCKET_IFNAME=eth0"])
    owner = PodOwner(name="step-pod", uid="u1", namespace="team-vision")
    spec = job_spec(cfg, owner=owner)
    assert (spec.name, spec.namespace, spec.owner, spec.settings) == (job_name("Run_7"), "team-vision", owner,
                                                                      cfg.cluster)
    assert spec.cache_max_gb == cfg.train.cache.max_gb == 400
    assert spec.argv == ["-m", "cafe_core.cli", "train", "--config", "env:CAFE_CONFIG_YAML"]
    # The region reaches boto3 and the AWS SDKs as plain env; the run's configuration rides along whole.
    assert spec.env["AWS_REGION"] == spec.env["AWS_DEFAULT_REGION"] == "eu-west-1"
    replica = yaml.safe_load(spec.env["CAFE_CONFIG_YAML"])
    assert replica["train"]["cache"]["dir"] == "/var/cache/cafe/data" and replica["run_id"] == "Run_7"
    (pod, *_) = pods_of(job_object(spec))
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["AWS_REGION"] == "eu-west-1" and env["NCCL_SOCKET_IFNAME"] == "eth0" and env["CAFE_IN_CLUSTER"] == "1"
    # A pinned namespace wins over the process's; an explicit one (the step's resolution) over both.
    assert job_spec(load_config("configs/cluster.yaml", ["run_id=r", "cluster.namespace=ml"])).namespace == "ml"
    assert job_spec(cfg, namespace="other").namespace == "other"
    no_region = job_spec(load_config("configs/cluster.yaml", ["run_id=r"]))
    assert "AWS_REGION" not in no_region.env


def test_a_region_in_cluster_env_must_agree_with_s3_region():
    cfg = load_config("configs/cluster.yaml", ["run_id=r", "s3.region=eu-west-1", "cluster.env.AWS_REGION=us-east-1"])
    with pytest.raises(ValidationError, match="cluster.env.AWS_REGION='us-east-1' contradicts"):
        job_spec(cfg)


# --- the PyTorchJob ----------------------------------------------------------------------------------


def test_one_node_cpu_job():
    job = pytorchjob(spec_of())
    assert_valid(job)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert list(replicas) == ["Master"] and replicas["Master"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "1" and replicas["Master"]["restartPolicy"] == "OnFailure"
    (pod,) = pods_of(job)
    (container,) = pod["containers"]
    assert container["name"] == CONTAINER and container["image"] == "cafe-train:latest"
    assert "--nnodes=1" in container["command"] and "--nproc_per_node=1" in container["command"]
    assert container["args"] == ARGV
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "20Gi"},
                                      "limits": {"memory": "32Gi"}}
    assert "tolerations" not in pod and not any(e["name"].startswith("NCCL") for e in container["env"])
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in pod["volumes"]
    assert {"name": "cafe-cache", "emptyDir": {"sizeLimit": "164Gi"}} in pod["volumes"]  # 100 GiB + the model
    assert "suspend" not in job["spec"]["runPolicy"] and "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_every_pod_setting_reaches_the_pods():
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu.product", "operator": "In", "values": ["H100", "H200"]}]}]}}}
    spec = spec_of(
        image="registry.example.com/cafe-train:1", nodes=3, gpus_per_node=8, cpu="90", memory="700Gi",
        memory_limit="900Gi", cpu_limit="100", shm_size="32Gi", cache_size="1Ti", ephemeral_storage="1200Gi",
        extra_resources={"rdma/rdma_shared_device_a": "1"}, node_selector={"pool": "h200"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        affinity=affinity, priority_class="training-high", service_account="cafe-train",
        image_pull_secrets=["regcred"], image_pull_policy="Always", env={"NCCL_IB_HCA": "mlx5"},
        s3_secret="team-s3", restart_policy="ExitCode", backoff_limit=4, active_deadline_seconds=7200,
        ttl_seconds_after_finished=None)
    job = pytorchjob(spec)
    assert_valid(job)
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert job["spec"]["runPolicy"] == {"activeDeadlineSeconds": 7200, "backoffLimit": 4, "cleanPodPolicy": "Running"}
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] == "ExitCode"
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "registry.example.com/cafe-train:1" and container["imagePullPolicy"] == "Always"
        assert container["resources"] == {
            "requests": {"cpu": "90", "memory": "700Gi", "ephemeral-storage": "1200Gi", "nvidia.com/gpu": "8",
                         "rdma/rdma_shared_device_a": "1"},
            "limits": {"cpu": "100", "memory": "900Gi", "nvidia.com/gpu": "8", "rdma/rdma_shared_device_a": "1"}}
        assert pod["nodeSelector"] == {"pool": "h200"} and pod["affinity"] == affinity
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                      {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
        assert pod["priorityClassName"] == "training-high" and pod["serviceAccountName"] == "cafe-train"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["automountServiceAccountToken"] is False
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod["volumes"]
        assert {"name": "cafe-cache", "emptyDir": {"sizeLimit": "1Ti"}} in pod["volumes"]
        env = {e["name"]: e for e in container["env"]}
        assert env["NCCL_IB_HCA"]["value"] == "mlx5"
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "team-s3", "key": "AWS_ACCESS_KEY_ID",
                                                                         "optional": True}


def test_kueue_queue_label_and_created_suspended():
    job = pytorchjob(spec_of(gpus_per_node=8, kueue_queue="gpu-queue", kueue_priority_class="prod"))
    assert_valid(job)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "prod"
    assert job["spec"]["runPolicy"]["suspend"] is True  # Kueue unsuspends it when it admits the workload
    pod_labels = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    assert "kueue.x-k8s.io/queue-name" not in pod_labels  # Kueue manages the job, not its pods one by one


def test_gang_scheduling_policy():
    job = pytorchjob(spec_of(nodes=4, scheduling={"min_available": 4, "queue": "training",
                                                  "priority_class": "gang-high"}))
    assert_valid(job)
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 4, "queue": "training",
                                                            "priorityClass": "gang-high"}


def test_no_secret_no_s3_env():
    (pod,) = pods_of(pytorchjob(spec_of(s3_secret=None)))
    assert not any("valueFrom" in e for e in pod["containers"][0]["env"])


def test_the_digest_ignores_the_owner_and_follows_the_settings():
    owned = TrainingJobSpec(name="cafe-train-x", namespace=NS, argv=ARGV,
                            owner=PodOwner(name="p", uid="u", namespace=NS))
    assert spec_digest(pytorchjob(owned)) == spec_digest(pytorchjob(spec_of()))
    assert spec_digest(pytorchjob(spec_of(nodes=2))) != spec_digest(pytorchjob(spec_of()))


def test_a_broken_pod_fails_the_pod_schema_check():
    (pod,) = pods_of(pytorchjob(spec_of()))
    pod["containers"][0]["resource"] = pod["containers"][0].pop("resources")  # misspelt
    with pytest.raises(AssertionError, match="resource"):
        assert_valid_pod(pod)
