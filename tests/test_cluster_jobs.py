"""cafe_core.cluster.jobs against a fake Kubernetes API server (kmock): the real `kubernetes` client talks HTTP
to it, the tests play the Training Operator (each GET of the job moves it to the next status) and assert on the
requests the server received. run_training_job() is synchronous, so it runs in a thread while the server's loop
serves. The pure job builder (cafe_core.cluster.pytorchjob) is tested in test_pytorchjob.py and test_manifests.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import kubernetes
import pytest
import yaml

from cafe_core.cluster.jobs import (
    TrainingJobError,
    TrainingJobFailed,
    TrainingJobStuck,
    TrainingJobTimeout,
    job_state,
    log_time,
    run_training_job,
    sigterm_exits,
)
from cafe_core.cluster.pytorchjob import JOB_NAME_LABEL, SPEC_DIGEST, PodOwner, TrainingJobSpec, pytorchjob

NS = "ml"
JOBS = "kubeflow.org/v1/pytorchjobs"
POLL = 0.02
ROLE = Path(__file__).resolve().parents[1] / "manifests" / "base" / "role.yaml"
ARGV = ["-m", "cafe_core.cli", "train", "--config", "/app/configs/cluster.yaml", "run_id=r7"]


def spec_for(name: str, **kw) -> TrainingJobSpec:
    kw.setdefault("active_deadline_seconds", 20)  # a bug here ends in a timeout, not a hung test
    return TrainingJobSpec(name=name, namespace=NS, image="registry.example.com/cafe:test", argv=ARGV, **kw)


def cond(kind: str, reason: str = "", message: str = "") -> dict:
    return {"conditions": [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated"},
                           {"type": kind, "status": "True", "reason": reason, "message": message}]}


CREATED = {"conditions": [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated"}]}
RUNNING = cond("Running", "PyTorchJobRunning", "PyTorchJob ml/x is running.")


def pod(name: str, job: str, phase: str = "Running", **status) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {JOB_NAME_LABEL: job}},
            "status": {"phase": phase, **status}}


class FakeCluster:
    """The kmock server seen as a cluster: the operator's behaviour, pods, the master's log, the requests."""

    def __init__(self, kmock):
        self.kmock = kmock
        self.log_lines: list[str] = []
        kmock.resources["v1/pods"] = {}
        kmock.resources[JOBS] = {}
        kmock["get", kmock.resource("v1/pods"), kmock.subresource("log")] << (
            lambda: "".join(f"{line}\n" for line in self.log_lines).encode())
        cfg = kubernetes.client.Configuration()
        cfg.host = str(kmock.url).rstrip("/")
        self.api = kubernetes.client.ApiClient(cfg)

    def operate(self, name: str, *statuses: dict) -> None:
        """Play the Training Operator: each GET of the job first moves it to the next status (the last stays)."""
        queue = list(statuses)

        def advance(request):
            job = self.kmock.objects[JOBS, NS, name]
            if queue and not job.deleted:
                job.patch({"status": queue.pop(0)})
            raise NotImplementedError  # matched, nothing to send: the emulator then serves the stored job

        self.kmock["get", self.kmock.resource(JOBS), self.kmock.name(name)] << advance

    def add_pod(self, body: dict) -> None:
        self.kmock.objects["v1/pods", NS, body["metadata"]["name"]] = body

    def job(self, name: str):
        return self.kmock.objects[JOBS, NS, name]

    def requests(self, method: str) -> list:
        return [r for r in self.kmock if r.method.value == method.upper() and r.resource is not None]

    def job_requests(self, method: str) -> list:
        return [r for r in self.requests(method) if r.resource == self.kmock.resource(JOBS)]

    async def run(self, spec: TrainingJobSpec, **kw):
        kw.setdefault("poll_seconds", POLL)
        kw.setdefault("timeout_margin_seconds", 0)
        return await asyncio.to_thread(run_training_job, spec, self.api, **kw)


@pytest.fixture
def cluster(kmock):
    fake = FakeCluster(kmock)
    yield fake
    fake.api.close()


def rbac_grants() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples granted by manifests/base/role.yaml."""
    role = yaml.safe_load(ROLE.read_text())
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def rbac_needed(kmock) -> set[tuple[str, str, str]]:
    """What the requests the fake server received need from RBAC, as (apiGroup, resource, verb)."""
    verbs = {"CREATE": "create", "FETCH": "get", "LIST": "list", "WATCH": "watch", "DELETE": "delete",
             "UPDATE": "patch"}
    needed = set()
    for r in kmock:
        assert r.action is not None, f"unexpected non-resource request {r.method} {r.url}"
        resource = r.resource.plural + (f"/{r.subresource}" if r.subresource else "")
        needed.add((r.resource.group, resource, verbs[r.action.value]))
    return needed


# --- successful runs ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_succeeded_job_is_created_followed_and_deleted(cluster):
    spec = spec_for("cafe-train-ok", nodes=2, gpus_per_node=2)
    cluster.operate(spec.name, CREATED, RUNNING, RUNNING, cond("Succeeded", "PyTorchJobSucceeded", "done."))
    cluster.add_pod(pod(f"{spec.name}-master-0", spec.name))
    cluster.add_pod(pod(f"{spec.name}-worker-0", spec.name))
    cluster.add_pod(pod("someone-elses-pod", "other-job", phase="Pending"))
    cluster.log_lines[:] = ["2025-01-01T00:00:00.5Z step 1 loss 2.0", "2025-01-01T00:00:01Z step 2 loss 1.5"]
    printed: list[str] = []

    outcome = await cluster.run(spec, log=printed.append)

    posts = cluster.job_requests("post")
    assert len(posts) == 1 and posts[0].data == pytorchjob(spec)
    assert posts[0].url.path == f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
    assert len(cluster.job_requests("get")) >= 4  # watched through Created, Running, Succeeded
    pods = cluster.kmock.resource("v1/pods")
    pod_lists = [r for r in cluster.requests("get") if r.resource == pods and r.name is None]
    assert pod_lists and all(r.params["labelSelector"] == f"{JOB_NAME_LABEL}={spec.name}" for r in pod_lists)
    logs = [r for r in cluster.requests("get") if r.subresource == "log"]
    assert logs and {r.name for r in logs} == {f"{spec.name}-master-0"}
    assert logs[0].params["container"] == "pytorch" and logs[0].params["timestamps"].lower() == "true"
    # Deleted on success (cleanup=on_success by default).
    deletes = cluster.job_requests("delete")
    assert len(deletes) == 1 and deletes[0].name == spec.name and cluster.job(spec.name).deleted
    assert outcome.state == "Succeeded" and outcome.created and outcome.deleted
    assert outcome.log_tail == ["step 1 loss 2.0", "step 2 loss 1.5"]
    # Every log line printed once although overlapping windows were read on every poll.
    assert sum("step 1 loss" in p for p in printed) == 1 and len(logs) >= 2
    assert any("Running" in p for p in printed) and any("Succeeded" in p for p in printed)
    # Everything run_training_job() asked of the API is granted by the shipped Role.
    assert rbac_needed(cluster.kmock) <= rbac_grants()


@pytest.mark.asyncio
async def test_cleanup_never_keeps_the_job(cluster):
    spec = spec_for("cafe-train-keep", cleanup="never")
    cluster.operate(spec.name, CREATED, cond("Succeeded", "PyTorchJobSucceeded", "done."))

    outcome = await cluster.run(spec, log=lambda _: None)

    assert outcome.state == "Succeeded" and not outcome.deleted
    assert cluster.job_requests("delete") == []
    assert not cluster.job(spec.name).deleted
    assert cluster.job_requests("post")[0].data == pytorchjob(spec)


@pytest.mark.asyncio
async def test_existing_job_of_a_retried_step_is_followed_not_recreated(cluster):
    spec = spec_for("cafe-train-retry")
    existing = pytorchjob(spec)
    existing["metadata"]["uid"] = "from-the-first-attempt"
    existing["status"] = RUNNING
    cluster.kmock.objects[JOBS, NS, spec.name] = existing
    cluster.operate(spec.name, RUNNING, cond("Succeeded", "PyTorchJobSucceeded", "done."))
    printed: list[str] = []

    outcome = await cluster.run(spec, log=printed.append)

    assert len(cluster.job_requests("post")) == 1  # tried once, got 409 Conflict
    assert cluster.job(spec.name).history[0]["metadata"]["uid"] == "from-the-first-attempt"  # not replaced
    assert outcome.state == "Succeeded" and not outcome.created
    assert any("already exists" in p and "following it" in p for p in printed)


@pytest.mark.asyncio
async def test_a_retried_step_deletes_its_failed_job_and_starts_afresh(cluster):
    """KFP retries a failed train step: the same job name and spec, but the job of the first attempt Failed.
    Following it would fail at once; the retry deletes it, waits until it is gone and creates a new one."""
    spec = spec_for("cafe-train-again")
    first = pytorchjob(spec)
    first["metadata"]["uid"] = "first-attempt"
    first["status"] = cond("Failed", "PyTorchJobFailed", "1 Master replica(s) failed.")
    cluster.kmock.objects[JOBS, NS, spec.name] = first
    printed: list[str] = []

    fresh = [CREATED, RUNNING, cond("Succeeded", "PyTorchJobSucceeded", "done.")]

    def operator_after_recreation(request):  # the operator runs the new job only
        job = cluster.kmock.objects[JOBS, NS, spec.name]
        if not job.deleted and job["metadata"].get("uid") != "first-attempt" and fresh:
            job.patch({"status": fresh.pop(0)})
        raise NotImplementedError  # matched, nothing to send: the emulator serves the stored job (or 404)

    cluster.kmock["get", cluster.kmock.resource(JOBS), cluster.kmock.name(spec.name)] << operator_after_recreation

    outcome = await cluster.run(spec, log=printed.append)

    assert len(cluster.job_requests("post")) == 2  # 409, then the fresh job after the deletion
    assert len(cluster.job_requests("delete")) >= 1
    assert outcome.state == "Succeeded" and outcome.created
    assert any("earlier attempt Failed (PyTorchJobFailed): deleting it and starting again" in p for p in printed)
    assert rbac_needed(cluster.kmock) <= rbac_grants()


@pytest.mark.asyncio
async def test_a_followed_job_is_handed_to_the_retried_steps_pod(cluster):
    """The running job of an earlier attempt is followed, and its owner becomes this step's pod: when the
    earlier pod is cleaned up, the job does not go with it."""
    owner = PodOwner(name="cafe-run-train-2", uid="uid-of-attempt-2", namespace=NS)
    spec = spec_for("cafe-train-adopt", owner=owner)
    earlier = pytorchjob(spec_for("cafe-train-adopt", owner=PodOwner(name="cafe-run-train-1", uid="u1", namespace=NS)))
    earlier["status"] = RUNNING
    cluster.kmock.objects[JOBS, NS, spec.name] = earlier
    cluster.operate(spec.name, RUNNING, cond("Succeeded", "PyTorchJobSucceeded", "done."))

    outcome = await cluster.run(spec, log=lambda _: None)

    (patch,) = cluster.job_requests("patch")
    assert patch.data == {"metadata": {"ownerReferences": [owner.reference()]}}
    assert outcome.state == "Succeeded" and not outcome.created
    assert rbac_needed(cluster.kmock) <= rbac_grants()


@pytest.mark.asyncio
async def test_existing_job_with_another_spec_is_an_error_and_left_alone(cluster):
    spec = spec_for("cafe-train-clash")
    stranger = pytorchjob(spec_for("cafe-train-clash", nodes=3))
    cluster.kmock.objects[JOBS, NS, spec.name] = stranger

    with pytest.raises(TrainingJobError, match="a different PyTorchJob ml/cafe-train-clash already exists"):
        await cluster.run(spec, log=lambda _: None)

    assert cluster.job_requests("delete") == []
    digest = stranger["metadata"]["annotations"][SPEC_DIGEST]
    assert cluster.job(spec.name)["metadata"]["annotations"][SPEC_DIGEST] == digest  # untouched


# --- failures ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_failed_job_raises_with_reason_and_last_log_lines(cluster):
    spec = spec_for("cafe-train-boom", cleanup="always")
    failed = cond("Failed", "PyTorchJobFailed",
                  "PyTorchJob ml/cafe-train-boom is failed because 1 Master replica(s) failed.")
    # Failed is among the conditions the job goes through: run_training_job must not report it as done.
    cluster.operate(spec.name, CREATED, RUNNING, failed)
    cluster.add_pod(pod(f"{spec.name}-master-0", spec.name, phase="Failed"))
    cluster.log_lines[:] = ["2025-01-01T00:00:00Z Traceback (most recent call last):",
                            "2025-01-01T00:00:00.000000001Z ValueError: boom"]

    with pytest.raises(TrainingJobFailed) as err:
        await cluster.run(spec, log=lambda _: None)

    assert err.value.reason == "PyTorchJobFailed" and "1 Master replica(s) failed" in err.value.message
    assert "ValueError: boom" in str(err.value) and err.value.log_tail[-1] == "ValueError: boom"
    assert len(cluster.job_requests("post")) == 1
    assert len(cluster.job_requests("delete")) == 1  # cleanup=always deletes failed jobs too


@pytest.mark.asyncio
async def test_deadline_exceeded_is_a_failure_and_the_failed_job_is_kept(cluster):
    spec = spec_for("cafe-train-slow", active_deadline_seconds=60)
    deadline = cond("Failed", "DeadlineExceeded",
                    "Job cafe-train-slow has failed because it was active longer than specified deadline")
    cluster.operate(spec.name, CREATED, RUNNING, deadline)
    printed: list[str] = []

    with pytest.raises(TrainingJobFailed) as err:
        await cluster.run(spec, log=printed.append)

    assert err.value.reason == "DeadlineExceeded"
    assert "active_deadline_seconds" in str(err.value)  # says what to change
    assert cluster.job_requests("post")[0].data["spec"]["runPolicy"]["activeDeadlineSeconds"] == 60
    assert cluster.job_requests("delete") == [] and not cluster.job(spec.name).deleted  # on_success keeps it
    assert any("kept PyTorchJob" in p for p in printed)


@pytest.mark.asyncio
async def test_client_side_timeout_when_the_operator_never_ends_the_job(cluster):
    spec = spec_for("cafe-train-hang", active_deadline_seconds=1)
    cluster.operate(spec.name, CREATED, RUNNING)  # Running forever

    with pytest.raises(TrainingJobTimeout, match="past activeDeadlineSeconds=1"):
        await asyncio.wait_for(cluster.run(spec, log=lambda _: None, timeout_margin_seconds=0.3), timeout=10)

    assert len(cluster.job_requests("delete")) == 1  # abandoned while alive: on_success deletes it


@pytest.mark.asyncio
async def test_unschedulable_pod_raises_stuck_naming_the_scheduler_message(cluster):
    spec = spec_for("cafe-train-big", nodes=3, gpus_per_node=8, pending_timeout_seconds=0.2)
    cluster.operate(spec.name, CREATED)  # stays Created
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."
    cluster.add_pod(pod(f"{spec.name}-master-0", spec.name, phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]))

    with pytest.raises(TrainingJobStuck) as err:
        await asyncio.wait_for(cluster.run(spec, log=lambda _: None), timeout=10)

    assert message in str(err.value) and "gpus_per_node" in str(err.value)
    assert cluster.job_requests("post")[0].data["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert len(cluster.job_requests("delete")) == 1  # not left queued to grab GPUs later


@pytest.mark.asyncio
async def test_missing_secret_raises_stuck_with_the_fix(cluster):
    spec = spec_for("cafe-train-nosecret", pending_timeout_seconds=0.1, cleanup="never")
    cluster.operate(spec.name, CREATED)
    cluster.add_pod(pod(f"{spec.name}-master-0", spec.name, phase="Pending", containerStatuses=[
        {"name": "pytorch", "state": {"waiting": {"reason": "CreateContainerConfigError",
                                                  "message": 'secret "cafe-s3" not found'}}}]))

    with pytest.raises(TrainingJobStuck, match='secret "cafe-s3" not found.*kubectl create secret generic cafe-s3'):
        await asyncio.wait_for(cluster.run(spec, log=lambda _: None), timeout=10)

    assert cluster.job_requests("delete") == []  # cleanup=never


@pytest.mark.asyncio
async def test_transient_api_errors_are_retried(cluster):
    spec = spec_for("cafe-train-flaky")
    cluster.operate(spec.name, CREATED, cond("Succeeded", "PyTorchJobSucceeded", "done."))
    kmock = cluster.kmock
    kmock["get", kmock.resource(JOBS), kmock.name(spec.name)][:2] << 503  # the first two polls fail
    printed: list[str] = []

    outcome = await cluster.run(spec, log=printed.append)

    assert outcome.state == "Succeeded"
    assert sum("trying again" in p for p in printed) == 2


@pytest.mark.asyncio
async def test_forbidden_create_says_which_role_is_missing(cluster):
    spec = spec_for("cafe-train-rbac")
    cluster.kmock["post", cluster.kmock.resource(JOBS)] << 403

    with pytest.raises(TrainingJobError, match="manifests/base/role.yaml"):
        await cluster.run(spec, log=lambda _: None)


@pytest.mark.asyncio
async def test_interrupted_run_deletes_the_running_job(cluster):
    spec = spec_for("cafe-train-cancel")
    cluster.operate(spec.name, CREATED, RUNNING)

    def cancel_when_running(line: str) -> None:
        if "Running" in line:
            raise SystemExit(143)  # what sigterm_exits() raises when KFP cancels the run

    def run() -> BaseException | None:  # SystemExit must not cross into the event loop
        try:
            run_training_job(spec, cluster.api, poll_seconds=POLL, log=cancel_when_running)
        except BaseException as e:  # noqa: BLE001 - the point of the test
            return e
        return None

    err = await asyncio.to_thread(run)

    assert isinstance(err, SystemExit)
    assert len(cluster.job_requests("delete")) == 1 and cluster.job(spec.name).deleted


def test_sigterm_becomes_system_exit_and_the_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as err:
        with sigterm_exits():
            os.kill(os.getpid(), signal.SIGTERM)
    assert err.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


# --- pure helpers ------------------------------------------------------------------------------------


def test_job_state_prefers_the_final_condition_whatever_the_order():
    job = {"status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"},
        {"type": "Running", "status": "False"},
        {"type": "Created", "status": "True"},
    ]}}
    assert job_state(job).type == "Failed" and job_state(job).reason == "DeadlineExceeded"
    assert job_state({}).type == "Submitted"


def test_log_time_orders_nanoseconds_and_zones():
    assert log_time("2025-01-01T00:00:00.1Z") > log_time("2025-01-01T00:00:00.09Z")
    assert log_time("2025-01-01T01:00:00+01:00") == log_time("2025-01-01T00:00:00Z")
    assert log_time("not-a-time") is None
