"""manifests/: every file parses, the kustomization is complete, RBAC is exactly what the train step needs, the
PyTorchJobs (committed template and generated ones) validate against the Training Operator v1.9 CRD schema,
no real secret is committed, and the kfp-launcher ConfigMap is in the format KFP 2.x reads."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cafe_core.cluster.pytorchjob import (
    S3_KEYS,
    S3_SECRET,
    TrainingJobSpec,
    example_spec,
    job_yaml,
    main,
    pytorchjob,
)
from cafe_core.cluster.settings import ClusterConfig
from tests.k8s_schemas import PYTORCHJOB_CRD, crd_schema, unknown_fields
from tests.k8s_schemas import assert_valid_custom_object as assert_valid_job

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
BASE = MANIFESTS / "base"
NOT_IN_KUSTOMIZATION = {"s3-secret.template.yaml", "pytorchjob-template.yaml", "trainjob-template.yaml"}
PLACEHOLDER = "REPLACE_ME"
ARGV = ["-m", "cafe_core.cli", "train", "--config", "/app/configs/cluster.yaml", "run_id=r7"]


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for p in sorted(MANIFESTS.rglob("*.yaml")) for d in docs(p) if d.get("kind") == kind]


@pytest.fixture(scope="module")
def job_schema() -> dict[str, Any]:
    return crd_schema(PYTORCHJOB_CRD, "v1")


# --- files and kustomization -------------------------------------------------------------------------


def test_every_yaml_parses_into_kubernetes_objects():
    files = sorted(MANIFESTS.rglob("*.yaml"))
    assert files
    for path in files:
        for doc in docs(path):
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), path


def test_kustomization_lists_existing_files_and_nothing_else():
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    for name in resources:
        assert (BASE / name).is_file(), f"kustomization.yaml lists {name}, which does not exist"
    yamls = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == yamls - NOT_IN_KUSTOMIZATION, "a manifest is neither listed nor a known template"
    assert not NOT_IN_KUSTOMIZATION & set(resources), "templates must not be applied by kubectl apply -k"
    assert "namespace" not in kustomization, "the namespace comes from kubectl apply -k ... -n <namespace>"


# --- RBAC --------------------------------------------------------------------------------------------


def test_role_grants_exactly_what_the_train_step_needs():
    (role,) = docs(BASE / "role.yaml")
    assert role["kind"] == "Role" and role["metadata"]["name"] == "cafe-pipeline"  # namespaced, not a ClusterRole
    granted = [(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]]
    assert len(granted) == len(set(granted))
    assert set(granted) == {
        *(("kubeflow.org", "pytorchjobs", v) for v in ("create", "get", "list", "watch", "patch", "delete")),
        *(("trainer.kubeflow.org", "trainjobs", v) for v in ("create", "get", "list", "watch", "patch", "delete")),
        *(("", "pods", v) for v in ("get", "list", "watch")),
        ("", "pods/log", "get"),
        *(("", "events", v) for v in ("list", "watch")),
    }
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames / nonResourceURLs"
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"]
    assert by_kind("ClusterRole") == [] and by_kind("ClusterRoleBinding") == []


# --- PyTorchJobs -------------------------------------------------------------------------------------


def test_committed_template_is_what_pytorchjob_generates(job_schema, capsys):
    committed = (BASE / "pytorchjob-template.yaml").read_text()
    generated = job_yaml(pytorchjob(example_spec("pytorchjob")))
    assert committed == generated, (
        "manifests/base/pytorchjob-template.yaml drifted from cafe_core.cluster.pytorchjob.pytorchjob(): regenerate it "
        "with `.venv/bin/python -m cafe_core.cluster.pytorchjob example > manifests/base/pytorchjob-template.yaml`"
    )
    assert main(["example"]) == 0 and capsys.readouterr().out == committed
    (job,) = docs(BASE / "pytorchjob-template.yaml")
    assert_valid_job(job, job_schema)


def test_the_job_is_owned_by_the_kfp_step_pod(job_schema, monkeypatch):
    """KFP v2 sets KFP_POD_NAME / KFP_POD_UID in every step: the job names that pod as its owner, so that the
    garbage collector deletes it with the step's pod; the digest ignores the owner (a retried step's pod is
    another owner of the same job); an owner in another namespace is refused (it would count as absent)."""
    from cafe_core.cluster.pytorchjob import PodOwner, kfp_step_owner, spec_digest

    monkeypatch.delenv("KFP_POD_NAME", raising=False)
    assert kfp_step_owner() is None  # outside a KFP step
    monkeypatch.setenv("KFP_POD_NAME", "cafe-run-abc-train-123")
    monkeypatch.setenv("KFP_POD_UID", "0b5c1a8e-7f3d-4c9e-9a51-3f7e1d2c4b6a")
    monkeypatch.setenv("POD_NAMESPACE", "team-vision")
    owner = kfp_step_owner()
    assert owner == PodOwner(name="cafe-run-abc-train-123", uid="0b5c1a8e-7f3d-4c9e-9a51-3f7e1d2c4b6a",
                             namespace="team-vision")
    spec = dict(name="cafe-train-owned", namespace="team-vision", argv=ARGV)
    job = pytorchjob(TrainingJobSpec(**spec, owner=owner))
    assert_valid_job(job, job_schema)
    assert job["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "Pod", "name": "cafe-run-abc-train-123",
        "uid": "0b5c1a8e-7f3d-4c9e-9a51-3f7e1d2c4b6a", "controller": False, "blockOwnerDeletion": False}]
    unowned = pytorchjob(TrainingJobSpec(**spec))
    assert "ownerReferences" not in unowned["metadata"] and spec_digest(job) == spec_digest(unowned)
    with pytest.raises(ValueError, match="an owner must share the job's namespace"):
        TrainingJobSpec(**{**spec, "namespace": "kubeflow"}, owner=owner)


def test_two_nodes_of_eight_gpus(job_schema):
    settings = ClusterConfig(image="cafe:test", nodes=2, gpus_per_node=8, env={"NCCL_DEBUG": "INFO", "HF_HOME": "/cache"},
                             active_deadline_seconds=7200, backoff_limit=1)
    spec = TrainingJobSpec(name="cafe-train-gpu", namespace="ml", argv=ARGV, labels={"team": "vision"},
                           settings=settings)
    job = pytorchjob(spec)
    assert_valid_job(job, job_schema)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["runPolicy"] == {"activeDeadlineSeconds": 7200, "backoffLimit": 1, "cleanPodPolicy": "Running",
                                         "ttlSecondsAfterFinished": 3 * 24 * 3600}  # Failed jobs go too
    assert job["metadata"]["labels"]["team"] == "vision"
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert container["command"][:3] == ["python", "-m", "torch.distributed.run"]
        assert {"--nnodes=2", "--nproc_per_node=8", "--node_rank=$(PET_NODE_RANK)", "--master_addr=$(MASTER_ADDR)",
                "--master_port=$(MASTER_PORT)", "--rdzv_backend=static"} <= set(container["command"])
        assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
        env = {e["name"]: e for e in container["env"]}
        assert env["NCCL_DEBUG"]["value"] == "INFO"  # the configured env wins over the default WARN
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"]["value"] == "1" and env["HF_HOME"]["value"] == "/cache"
        assert env["CAFE_IN_CLUSTER"]["value"] == "1"  # no embedded S3 in a replica; credentials checked at start
        assert all(env[key]["valueFrom"]["secretKeyRef"]["optional"] for key in S3_KEYS)  # IRSA works without it
        for key in S3_KEYS:  # credentials only by reference, never as values
            assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"] == {
                "name": "cafe-s3", "key": key, **({"optional": True} if S3_KEYS[key] else {})}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
        assert {"name": "cafe-cache", "mountPath": "/var/cache/cafe"} in container["volumeMounts"]
        assert {"name": "cafe-cache", "emptyDir": {"sizeLimit": "164Gi"}} in pod["volumes"]  # node disk, its ranks share it
        assert pod["automountServiceAccountToken"] is False
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_a_broken_job_fails_the_schema_check(job_schema):
    job = pytorchjob(example_spec())
    job["spec"]["runPolicy"]["backoffLimit"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, job_schema)
    job = pytorchjob(example_spec())
    job["spec"]["runPolicy"]["cleanupPodPolicy"] = "All"  # misspelt: would be pruned silently
    assert unknown_fields(job, job_schema) == [".spec.runPolicy.cleanupPodPolicy"]


# --- secrets and the KFP launcher config -------------------------------------------------------------


def secret_values(secret: dict[str, Any]) -> dict[str, str]:
    values = dict(secret.get("stringData") or {})
    for key, encoded in (secret.get("data") or {}).items():
        values[key] = base64.b64decode(encoded).decode()
    return values


def test_no_secret_with_real_values_is_committed():
    secrets = by_kind("Secret")
    assert secrets, "the S3 Secret template is expected under manifests/"
    for secret in secrets:
        for key, value in secret_values(secret).items():
            assert PLACEHOLDER in value, f"Secret {secret['metadata']['name']} key {key} holds a non-placeholder value"


def test_s3_secret_template_has_the_keys_the_training_pods_reference():
    (secret,) = docs(BASE / "s3-secret.template.yaml")
    assert secret["metadata"]["name"] == ClusterConfig.model_fields["s3_secret"].default == S3_SECRET == "cafe-s3"
    assert set(secret_values(secret)) == set(S3_KEYS)


def test_kfp_launcher_configmap_in_the_format_kfp_reads():
    (cm,) = docs(BASE / "kfp-launcher-configmap.yaml")
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "kfp-launcher"
    assert set(cm["data"]) == {"defaultPipelineRoot", "providers"}
    assert cm["data"]["defaultPipelineRoot"] == "s3://cafe/pipeline-root"
    assert isinstance(cm["data"]["providers"], str), "providers is a YAML document inside a string"
    providers = yaml.safe_load(cm["data"]["providers"])
    default = providers["s3"]["default"]
    assert default["endpoint"] and default["region"] and isinstance(default["disableSSL"], bool)
    assert default["region"] == "us-east-1", "the region the promote/rollback workflows default to"
    creds = default["credentials"]
    assert creds["fromEnv"] is False
    (secret,) = docs(BASE / "s3-secret.template.yaml")
    assert creds["secretRef"]["secretName"] == secret["metadata"]["name"] == S3_SECRET  # the steps' and the pods'
    assert {creds["secretRef"]["accessKeyKey"], creds["secretRef"]["secretKeyKey"]} <= set(secret_values(secret))
