"""cafe_core.cluster.jobs against a fake Kubernetes API server (kmock): the real `kubernetes` client talks HTTP
to it, the tests play the operator (each GET of the job moves it to the next step: a status, a patch of the
job, a change of its pods) and Kueue (unsuspending a queued job), and assert on the requests the server
received. run_training_job() is synchronous, so it runs in a thread while the server's loop serves. Both APIs:
the Training Operator's PyTorchJob and the Kubeflow Trainer's TrainJob. The pure builders are tested in
test_pytorchjob.py and test_trainjob.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import kubernetes
import pytest
import yaml

from cafe_core.cluster import trainjob as tj
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
from cafe_core.cluster.kinds import job_object
from cafe_core.cluster.pytorchjob import JOB_NAME_LABEL, REPLICA_INDEX_LABEL, REPLICA_TYPE_LABEL
from cafe_core.cluster.settings import ClusterConfig
from cafe_core.cluster.spec import SPEC_DIGEST, PodOwner, TrainingJobSpec

NS = "ml"
JOBS = {"pytorchjob": "kubeflow.org/v1/pytorchjobs", "trainjob": "trainer.kubeflow.org/v1alpha1/trainjobs"}
POLL = 0.02
ROLE = Path(__file__).resolve().parents[1] / "manifests" / "base" / "role.yaml"
ARGV = ["-m", "cafe_core.cli", "train", "--config", "/app/configs/cluster.yaml", "run_id=r7"]


def spec_for(name: str, api: str = "pytorchjob", owner: PodOwner | None = None, **settings) -> TrainingJobSpec:
    settings.setdefault("active_deadline_seconds", 20)  # a bug here ends in a timeout, not a hung test
    return TrainingJobSpec(name=name, namespace=NS, argv=ARGV, owner=owner,
                           settings=ClusterConfig(api=api, image="registry.example.com/cafe:test", **settings))


def cond(kind: str, reason: str = "", message: str = "") -> dict:
    return {"conditions": [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated"},
                           {"type": kind, "status": "True", "reason": reason, "message": message}]}


CREATED = {"conditions": [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated"}]}
RUNNING = cond("Running", "PyTorchJobRunning", "PyTorchJob ml/x is running.")
SUCCEEDED = cond("Succeeded", "PyTorchJobSucceeded", "done.")


def pod(name: str, job: str, phase: str = "Running", master: bool | None = None, **status) -> dict:
    """A PyTorchJob's pod, labelled as the Training Operator labels them."""
    labels = {JOB_NAME_LABEL: job}
    if master is not None or name.endswith("-master-0"):
        is_master = master if master is not None else True
        labels |= {REPLICA_TYPE_LABEL: "master" if is_master else "worker",
                   REPLICA_INDEX_LABEL: "0" if is_master else name.rsplit("-", 1)[-1]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": labels},
            "status": {"phase": phase, **status}}


def jobset_pod(job: str, index: int, phase: str = "Running", **status) -> dict:
    """A TrainJob's pod, labelled as JobSet and the Job controller label them (random name suffix)."""
    labels = {tj.JOBSET_NAME_LABEL: job, tj.REPLICATED_JOB_LABEL: "node", tj.JOB_INDEX_LABEL: "0",
              tj.COMPLETION_INDEX: str(index)}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{job}-node-0-{index}-x7k2p", "namespace": NS, "labels": labels},
            "status": {"phase": phase, **status}}


def terminated(exit_code: int, finished: str, reason: str = "Error") -> dict:
    return {"exitCode": exit_code, "reason": reason, "finishedAt": finished}


Step = dict | Callable[[], Any]


class FakeCluster:
    """The kmock server seen as a cluster: the operator's behaviour, pods, their logs, the requests."""

    def __init__(self, kmock):
        self.kmock = kmock
        self.log_lines: list[str] = []  # any pod's log, unless pod_logs has its own
        self.pod_logs: dict[tuple[str, bool], list[str]] = {}  # (pod, previous) -> lines
        kmock.resources["v1/pods"] = {}
        for resource in JOBS.values():
            kmock.resources[resource] = {}
        kmock["get", kmock.resource("v1/pods"), kmock.subresource("log")] << self._log
        cfg = kubernetes.client.Configuration()
        cfg.host = str(kmock.url).rstrip("/")
        self.api = kubernetes.client.ApiClient(cfg)

    def _log(self, request) -> bytes:
        previous = str(request.params.get("previous", "")).lower() == "true"
        lines = self.pod_logs.get((request.name, previous), self.log_lines)
        return "".join(f"{line}\n" for line in lines).encode()

    def play(self, name: str, *steps: Step, api: str = "pytorchjob") -> None:
        """Play the operator (and Kueue): each GET of the job first applies the next step, a patch of the job
        (dict) or a change elsewhere (callable); the last state stays."""
        queue = list(steps)
        resource = JOBS[api]

        def advance(request):
            job = self.kmock.objects[resource, NS, name]
            if queue and not job.deleted:
                step = queue.pop(0)
                job.patch(step) if isinstance(step, dict) else step()
            raise NotImplementedError  # matched, nothing to send: the emulator then serves the stored job

        self.kmock["get", self.kmock.resource(resource), self.kmock.name(name)] << advance

    def operate(self, name: str, *statuses: dict, api: str = "pytorchjob") -> None:
        """Play the operator with statuses only."""
        self.play(name, *({"status": s} for s in statuses), api=api)

    def add_pod(self, body: dict) -> None:
        self.kmock.objects["v1/pods", NS, body["metadata"]["name"]] = body

    def set_pod(self, name: str, **status) -> Callable[[], None]:
        """A step that changes a pod's status."""
        return lambda: self.kmock.objects["v1/pods", NS, name].patch({"status": status})

    def job(self, name: str, api: str = "pytorchjob"):
        return self.kmock.objects[JOBS[api], NS, name]

    def requests(self, method: str) -> list:
        return [r for r in self.kmock if r.method.value == method.upper() and r.resource is not None]

    def job_requests(self, method: str, api: str = "pytorchjob") -> list:
        return [r for r in self.requests(method) if r.resource == self.kmock.resource(JOBS[api])]

    def log_requests(self) -> list:
        return [r for r in self.requests("get") if r.subresource == "log"]

    async def run(self, spec: TrainingJobSpec, **kw):
        kw.setdefault("poll_seconds", POLL)
        kw.setdefault("timeout_margin_seconds", 0)
        return await asyncio.wait_for(asyncio.to_thread(run_training_job, spec, self.api, **kw), timeout=30)


class FakeClock:
    """jobs' clock, for tests about durations: each poll's sleep advances it by exactly its seconds, so that
    "queued for 10 polls of 1 s" is 10 s however loaded the machine is (the real sleep is a millisecond)."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        time.sleep(0.001)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    import cafe_core.cluster.jobs as jobs

    fake = FakeClock()
    monkeypatch.setattr(jobs, "time", fake)
    return fake


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
    cluster.operate(spec.name, CREATED, RUNNING, RUNNING, SUCCEEDED)
    cluster.add_pod(pod(f"{spec.name}-master-0", spec.name))
    cluster.add_pod(pod(f"{spec.name}-worker-0", spec.name, master=False))
    cluster.add_pod(pod("someone-elses-pod", "other-job", phase="Pending"))
    cluster.log_lines[:] = ["2025-01-01T00:00:00.5Z step 1 loss 2.0", "2025-01-01T00:00:01Z step 2 loss 1.5"]
    printed: list[str] = []

    outcome = await cluster.run(spec, log=printed.append)

    posts = cluster.job_requests("post")
    assert len(posts) == 1 and posts[0].data == job_object(spec)
    assert posts[0].url.path == f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
    assert len(cluster.job_requests("get")) >= 4  # watched through Created, Running, Succeeded
    pods = cluster.kmock.resource("v1/pods")
    pod_lists = [r for r in cluster.requests("get") if r.resource == pods and r.name is None]
    assert pod_lists and all(r.params["labelSelector"] == f"{JOB_NAME_LABEL}={spec.name}" for r in pod_lists)
    logs = cluster.log_requests()
    assert logs and {r.name for r in logs} == {f"{spec.name}-master-0"}  # rank 0 only
    assert logs[0].params["container"] == "pytorch" and logs[0].params["timestamps"].lower() == "true"
    # Deleted on success (cleanup=on_success by default).
    deletes = cluster.job_requests("delete")
    assert len(deletes) == 1 and deletes[0].name == spec.name and cluster.job(spec.name).deleted
    assert outcome.state == "Succeeded" and outcome.created and outcome.deleted and outcome.queued_seconds == 0
    assert outcome.log_tail == ["step 1 loss 2.0", "step 2 loss 1.5"]
    # Every log line printed once although overlapping windows were read on every poll.
    assert sum("step 1 loss" in p for p in printed) == 1 and len(logs) >= 2
    assert any("Running" in p for p in printed) and any("Succeeded" in p for p in printed)
    # Everything run_training_job() asked of the API is granted by the shipped Role.
    assert rbac_needed(cluster.kmock) <= rbac_grants()


@pytest.mark.asyncio
async def test_a_trainjob_is_followed_through_its_jobset_pods(cluster):
    """cluster.api=trainjob: the TrainJob goes to trainer.kubeflow.org, its pods are found by their JobSet's
    name, rank 0 by its Job and completion index (the pod names carry a random suffix), Complete is success."""
    spec = spec_for("cafe-train-v2", api="trainjob", nodes=2, gpus_per_node=8)
    jobs = [{"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0, "suspended": 0}]
    complete = {"conditions": [{"type": "Complete", "status": "True", "reason": "AllJobsCompleted",
                                "message": "jobset completed successfully"}]}
    cluster.operate(spec.name, {}, {"jobsStatus": jobs}, {"jobsStatus": jobs}, complete, api="trainjob")
    cluster.add_pod(jobset_pod(spec.name, 1))  # listed first: rank 1
    cluster.add_pod(jobset_pod(spec.name, 0))
    cluster.add_pod(jobset_pod("another-trainjob", 0))
    cluster.log_lines[:] = ["2025-01-01T00:00:00Z step 1 loss 2.0"]
    printed: list[str] = []

    outcome = await cluster.run(spec, log=printed.append)

    (post,) = cluster.job_requests("post", api="trainjob")
    assert post.data == job_object(spec) and post.data["kind"] == "TrainJob"
    assert post.url.path == f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"
    pods = cluster.kmock.resource("v1/pods")
    pod_lists = [r for r in cluster.requests("get") if r.resource == pods and r.name is None]
    assert pod_lists and all(r.params["labelSelector"] == f"jobset.sigs.k8s.io/jobset-name={spec.name}"
                             for r in pod_lists)
    logs = cluster.log_requests()
    assert {r.name for r in logs} == {f"{spec.name}-node-0-0-x7k2p"} and logs[0].params["container"] == "node"
    assert outcome.state == "Succeeded" and outcome.log_tail == ["step 1 loss 2.0"] and outcome.deleted
    assert any("TrainJob cafe-train-v2: Running" in p for p in printed)
    assert len(cluster.job_requests("delete", api="trainjob")) == 1
    assert rbac_needed(cluster.kmock) <= rbac_grants()


@pytest.mark.asyncio
async def test_cleanup_never_keeps_the_job(cluster):
    spec = spec_for("cafe-train-keep", cleanup="never")
    cluster.operate(spec.name, CREATED, SUCCEEDED)

    outcome = await cluster.run(spec, log=lambda _: None)

    assert outcome.state == "Succeeded" and not outcome.deleted
    assert cluster.job_requests("delete") == []
    assert not cluster.job(spec.name).deleted
    assert cluster.job_requests("post")[0].data == job_object(spec)


@pytest.mark.asyncio
async def test_existing_job_of_a_retried_step_is_followed_not_recreated(cluster):
    spec = spec_for("cafe-train-retry")
    existing = job_object(spec)
    existing["metadata"]["uid"] = "from-the-first-attempt"
    existing["status"] = RUNNING
    cluster.kmock.objects[JOBS["pytorchjob"], NS, spec.name] = existing
    cluster.operate(spec.name, RUNNING, SUCCEEDED)
    printed: list[str] = []

    outcome = await cluster.run(spec, log=printed.append)

    assert len(cluster.job_requests("post")) == 1  # tried once, got 409 Conflict
    assert cluster.job(spec.name).history[0]["metadata"]["uid"] == "from-the-first-attempt"  # not replaced
    assert outcome.state == "Succeeded" and not outcome.created
    assert any("already exists" in p and "following it" in p for p in printed)


@pytest.mark.asyncio
@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
async def test_a_retried_step_deletes_its_failed_job_and_starts_afresh(cluster, api):
    """KFP retries a failed train step: the same job name and spec, but the job of the first attempt Failed.
    Following it would fail at once; the retry deletes it, waits until it is gone and creates a new one."""
    spec = spec_for("cafe-train-again", api=api)
    first = job_object(spec)
    first["metadata"]["uid"] = "first-attempt"
    failed = {"type": "Failed", "status": "True", "reason": "JobFailed", "message": "1 replica(s) failed."}
    first["status"] = {"conditions": [failed]}
    cluster.kmock.objects[JOBS[api], NS, spec.name] = first
    printed: list[str] = []
    done = SUCCEEDED if api == "pytorchjob" else {"conditions": [{"type": "Complete", "status": "True"}]}
    fresh = [CREATED, RUNNING, done] if api == "pytorchjob" else [{}, done]

    def operator_after_recreation(request):  # the operator runs the new job only
        job = cluster.kmock.objects[JOBS[api], NS, spec.name]
        if not job.deleted and job["metadata"].get("uid") != "first-attempt" and fresh:
            job.patch({"status": fresh.pop(0)})
        raise NotImplementedError  # matched, nothing to send: the emulator serves the stored job (or 404)

    cluster.kmock["get", cluster.kmock.resource(JOBS[api]), cluster.kmock.name(spec.name)] << operator_after_recreation

    outcome = await cluster.run(spec, log=printed.append)

    assert len(cluster.job_requests("post", api=api)) == 2  # 409, then the fresh job after the deletion
    assert len(cluster.job_requests("delete", api=api)) >= 1
    assert outcome.state == "Succeeded" and outcome.created
    assert any("earlier attempt Failed (JobFailed): deleting it and starting again" in p for p in printed)
    assert rbac_needed(cluster.kmock) <= rbac_grants()


@pytest.mark.asyncio
async def test_a_followed_job_is_handed_to_the_retried_steps_pod(cluster):
    """The running job of an earlier attempt is followed, and its owner becomes this step's pod: when the
    earlier pod is cleaned up, the job does not go with it."""
    owner = PodOwner(name="cafe-run-train-2", uid="uid-of-attempt-2", namespace=NS)
    spec = spec_for("cafe-train-adopt", owner=owner)
    earlier = job_object(spec_for("cafe-train-adopt", owner=PodOwner(name="cafe-run-train-1", uid="u1", namespace=NS)))
    earlier["status"] = RUNNING
    cluster.kmock.objects[JOBS["pytorchjob"], NS, spec.name] = earlier
    cluster.operate(spec.name, RUNNING, SUCCEEDED)

    outcome = await cluster.run(spec, log=lambda _: None)

    (patch,) = cluster.job_requests("patch")
    assert patch.data == {"metadata": {"ownerReferences": [owner.reference()]}}
    assert outcome.state == "Succeeded" and not outcome.created
    assert rbac_needed(cluster.kmock) <= rbac_grants()


@pytest.mark.asyncio
async def test_existing_job_with_another_spec_is_an_error_and_left_alone(cluster):
    spec = spec_for("cafe-train-clash")
    stranger = job_object(spec_for("cafe-train-clash", nodes=3))
    cluster.kmock.objects[JOBS["pytorchjob"], NS, spec.name] = stranger

    with pytest.raises(TrainingJobError, match="a different PyTorchJob ml/cafe-train-clash already exists"):
        await cluster.run(spec, log=lambda _: None)

    assert cluster.job_requests("delete") == []
    digest = stranger["metadata"]["annotations"][SPEC_DIGEST]
    assert cluster.job(spec.name)["metadata"]["annotations"][SPEC_DIGEST] == digest  # untouched


# --- Kueue and scheduling ----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
async def test_a_job_queued_in_kueue_is_not_stuck_and_runs_once_admitted(cluster, clock, api):
    """Created suspended with the queue label; it waits far longer than pending_timeout_seconds without
    pods and without a status at first (Kueue suspended it before the operator looked), which is queueing,
    not a stuck job; Kueue admits it (unsuspends), it runs and succeeds."""
    spec = spec_for("cafe-train-queued", api=api, kueue_queue="gpu-queue", pending_timeout_seconds=3,
                    active_deadline_seconds=5)
    name = spec.name
    if api == "pytorchjob":
        suspended = {"status": cond("Suspended", "PyTorchJobSuspended", "PyTorchJob is suspended.")}
        admitted = {"spec": {"runPolicy": {"suspend": False}}, "status": RUNNING}
        done = {"status": SUCCEEDED}
        add_pod = lambda: cluster.add_pod(pod(f"{name}-master-0", name))  # noqa: E731
    else:
        suspended = {"status": {"conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended",
                                                "message": "TrainJob is suspended"}]}}
        admitted = {"spec": {"suspend": False}, "status": {
            "conditions": [{"type": "Suspended", "status": "False", "reason": "Resumed", "message": "resumed"}],
            "jobsStatus": [{"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0, "suspended": 0}]}}
        done = {"status": {"conditions": [{"type": "Complete", "status": "True", "reason": "AllJobsCompleted"}]}}
        add_pod = lambda: cluster.add_pod(jobset_pod(name, 0))  # noqa: E731
    # 5 polls of 1 s with no status at all, then 5 suspended: past both pending_timeout_seconds=3 and
    # active_deadline_seconds=5, neither of which counts queued time.
    cluster.play(name, *[{}] * 5, suspended, *[{}] * 4, admitted, add_pod, {}, done, api=api)
    printed: list[str] = []

    outcome = await cluster.run(spec, log=printed.append, poll_seconds=1)

    (post,) = cluster.job_requests("post", api=api)
    assert post.data["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    queued = [p for p in printed if "queued in Kueue LocalQueue 'gpu-queue'" in p]
    assert len(queued) == 1, printed  # reported once, when it starts waiting
    assert outcome.state == "Succeeded" and outcome.queued_seconds == 10
    assert any(": Running" in p for p in printed)


@pytest.mark.asyncio
async def test_pods_pending_then_scheduled_are_not_stuck(cluster, clock):
    """Unschedulable for 4 s, scheduled, then (a node lost, the pod recreated) Unschedulable for 4 s again:
    each stretch is under pending_timeout_seconds=5, together they are not; only a continuous one counts."""
    spec = spec_for("cafe-train-late", nodes=2, gpus_per_node=8, pending_timeout_seconds=5)
    master = f"{spec.name}-master-0"
    unschedulable = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
    cluster.add_pod(pod(master, spec.name, phase="Pending", conditions=unschedulable))
    scheduled = cluster.set_pod(master, phase="Running", conditions=[{"type": "PodScheduled", "status": "True"}])
    pending = cluster.set_pod(master, phase="Pending", conditions=unschedulable)
    cluster.play(spec.name, {"status": CREATED}, {}, {}, {}, scheduled, {"status": RUNNING}, pending, {}, {}, {},
                 scheduled, {}, {"status": SUCCEEDED})

    outcome = await cluster.run(spec, log=lambda _: None, poll_seconds=1)

    assert outcome.state == "Succeeded"


@pytest.mark.asyncio
async def test_the_pending_timeout_is_the_configured_one(cluster, clock):
    spec = spec_for("cafe-train-wait", gpus_per_node=8, pending_timeout_seconds=7)
    cluster.operate(spec.name, CREATED)
    cluster.add_pod(pod(f"{spec.name}-master-0", spec.name, phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes are available"}]))

    with pytest.raises(TrainingJobStuck, match="could not start for 7 s"):
        await cluster.run(spec, log=lambda _: None, poll_seconds=1)


@pytest.mark.asyncio
async def test_unschedulable_pod_raises_stuck_naming_the_scheduler_message(cluster):
    spec = spec_for("cafe-train-big", nodes=3, gpus_per_node=8, pending_timeout_seconds=0.2)
    cluster.operate(spec.name, CREATED)  # stays Created
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."
    cluster.add_pod(pod(f"{spec.name}-master-0", spec.name, phase="Pending", conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}]))

    with pytest.raises(TrainingJobStuck) as err:
        await cluster.run(spec, log=lambda _: None)

    assert message in str(err.value) and "cluster.gpus_per_node" in str(err.value)
    assert "cluster.pending_timeout_seconds=0.2" in str(err.value)  # the configured timeout, named
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
        await cluster.run(spec, log=lambda _: None)

    assert cluster.job_requests("delete") == []  # cleanup=never


# --- failures ----------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_failing_replica_log_is_reported_not_only_the_masters(cluster):
    """A worker runs out of memory first; the master then fails on the lost peer. The error quotes the
    worker's log (the cause), found by its container's non-zero exit, the earliest one."""
    spec = spec_for("cafe-train-boom", nodes=2, gpus_per_node=8, cleanup="always")
    name = spec.name
    master, worker = f"{name}-master-0", f"{name}-worker-0"
    cluster.add_pod(pod(master, name))
    cluster.add_pod(pod(worker, name, master=False))
    cluster.pod_logs[(master, False)] = ["2025-01-01T00:00:05Z torch.distributed.DistBackendError: NCCL error"]
    cluster.pod_logs[(worker, False)] = ["2025-01-01T00:00:01Z Traceback (most recent call last):",
                                         "2025-01-01T00:00:01.5Z torch.OutOfMemoryError: CUDA out of memory"]
    failed_worker = cluster.set_pod(worker, phase="Failed", containerStatuses=[
        {"name": "pytorch", "restartCount": 0, "state": {"terminated": terminated(1, "2025-01-01T00:00:02Z")}}])
    failed_master = cluster.set_pod(master, phase="Failed", containerStatuses=[
        {"name": "pytorch", "restartCount": 0, "state": {"terminated": terminated(1, "2025-01-01T00:00:06Z")}}])
    failed = cond("Failed", "PyTorchJobFailed",
                  "PyTorchJob ml/cafe-train-boom is failed because 1 Worker replica(s) failed.")
    cluster.play(name, {"status": CREATED}, {"status": RUNNING}, failed_master, failed_worker, {"status": failed})

    with pytest.raises(TrainingJobFailed) as err:
        await cluster.run(spec, log=lambda _: None)

    text = str(err.value)
    assert err.value.reason == "PyTorchJobFailed" and "1 Worker replica(s) failed" in err.value.message
    assert f"Failing replica: pod {worker} exited with code 1 (Error)" in text
    assert "torch.OutOfMemoryError: CUDA out of memory" in text  # the worker's log, where the cause is
    assert err.value.failure.pod == worker and err.value.log_tail[-1] == "torch.OutOfMemoryError: CUDA out of memory"
    assert len(cluster.job_requests("post")) == 1
    assert len(cluster.job_requests("delete")) == 1  # cleanup=always deletes failed jobs too


@pytest.mark.asyncio
async def test_a_replica_restarted_in_place_reports_its_previous_container_log(cluster):
    """restartPolicy OnFailure: a worker's container is OOM-killed and restarts in place (restartCount 1);
    its log before the restart is read with previous=true, once, and quoted when the job then fails."""
    spec = spec_for("cafe-train-restart", nodes=2, gpus_per_node=8, cleanup="never")
    name = spec.name
    worker = f"{name}-worker-0"
    cluster.add_pod(pod(f"{name}-master-0", name))
    cluster.add_pod(pod(worker, name, master=False))
    cluster.pod_logs[(worker, True)] = ["2025-01-01T00:00:01Z loading shard 17", "2025-01-01T00:00:02Z Killed"]
    cluster.pod_logs[(worker, False)] = ["2025-01-01T00:00:09Z loading shard 17 again"]
    restarted = cluster.set_pod(worker, containerStatuses=[{
        "name": "pytorch", "restartCount": 1, "state": {"running": {"startedAt": "2025-01-01T00:00:08Z"}},
        "lastState": {"terminated": terminated(137, "2025-01-01T00:00:03Z", "OOMKilled")}}])
    backoff = cond("Failed", "PyTorchJobFailed", "job has reached the specified backoff limit")
    cluster.play(name, {"status": RUNNING}, restarted, {}, {}, {"status": backoff})
    printed: list[str] = []

    with pytest.raises(TrainingJobFailed) as err:
        await cluster.run(spec, log=printed.append)

    text = str(err.value)
    assert f"pod {worker} exited with code 137 (OOMKilled), restarted 1 time(s) in place" in text
    assert "before its restart" in text and "Killed" in text and "again" not in text
    assert "cluster.backoff_limit" in text  # what to change
    previous = [r for r in cluster.log_requests() if r.name == worker]
    assert len(previous) == 1 and previous[0].params["previous"].lower() == "true"
    assert any("kept PyTorchJob" in p for p in printed)


@pytest.mark.asyncio
async def test_a_failed_trainjob_reports_its_failing_pod(cluster):
    spec = spec_for("cafe-train-v2-boom", api="trainjob", nodes=2, cleanup="never")
    name = spec.name
    rank1 = jobset_pod(name, 1)
    cluster.add_pod(jobset_pod(name, 0))
    cluster.add_pod(rank1)
    cluster.pod_logs[(rank1["metadata"]["name"], False)] = ["2025-01-01T00:00:01Z ValueError: boom"]
    crashed = cluster.set_pod(rank1["metadata"]["name"], phase="Failed", containerStatuses=[
        {"name": "node", "restartCount": 0, "state": {"terminated": terminated(1, "2025-01-01T00:00:02Z")}}])
    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "FailedJobs",
                              "message": "jobset failed: job cafe-train-v2-boom-node-0 failed"}]}
    cluster.play(name, {"status": {"jobsStatus": [{"name": "node", "active": 1, "ready": 1, "succeeded": 0,
                                                   "failed": 0, "suspended": 0}]}},
                 crashed, {"status": failed}, api="trainjob")

    with pytest.raises(TrainingJobFailed) as err:
        await cluster.run(spec, log=lambda _: None)

    assert err.value.reason == "FailedJobs" and "ValueError: boom" in str(err.value)
    assert f"TrainJob {NS}/{name} Failed" in str(err.value)
    assert "kubectl delete" not in str(err.value)  # created by this step: nothing to clean up by hand first


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
    assert "cluster.active_deadline_seconds" in str(err.value)  # says what to change
    assert cluster.job_requests("post")[0].data["spec"]["runPolicy"]["activeDeadlineSeconds"] == 60
    assert cluster.job_requests("delete") == [] and not cluster.job(spec.name).deleted  # on_success keeps it
    assert any("kept PyTorchJob" in p for p in printed)


@pytest.mark.asyncio
async def test_client_side_timeout_when_the_operator_never_ends_the_job(cluster):
    spec = spec_for("cafe-train-hang", active_deadline_seconds=1)
    cluster.operate(spec.name, CREATED, RUNNING)  # Running forever

    with pytest.raises(TrainingJobTimeout, match="past cluster.active_deadline_seconds=1"):
        await cluster.run(spec, log=lambda _: None, timeout_margin_seconds=0.3)

    assert len(cluster.job_requests("delete")) == 1  # abandoned while alive: on_success deletes it


@pytest.mark.asyncio
async def test_transient_api_errors_are_retried(cluster):
    spec = spec_for("cafe-train-flaky")
    cluster.operate(spec.name, CREATED, SUCCEEDED)
    kmock = cluster.kmock
    kmock["get", kmock.resource(JOBS["pytorchjob"]), kmock.name(spec.name)][:2] << 503  # the first two polls fail
    printed: list[str] = []

    outcome = await cluster.run(spec, log=printed.append)

    assert outcome.state == "Succeeded"
    assert sum("trying again" in p for p in printed) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("api, words", [("pytorchjob", "pytorchjobs.kubeflow.org"),
                                        ("trainjob", "trainjobs.trainer.kubeflow.org")])
async def test_forbidden_create_says_which_role_is_missing(cluster, api, words):
    spec = spec_for("cafe-train-rbac", api=api)
    cluster.kmock["post", cluster.kmock.resource(JOBS[api])] << 403

    with pytest.raises(TrainingJobError, match=f"manifests/base/role.yaml \\({words} included\\)"):
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
