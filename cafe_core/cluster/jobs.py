"""Run `cafe train` on Kubernetes as a training job (a Training Operator PyTorchJob or a Kubeflow Trainer
TrainJob, per cluster.api), follow it, fail when it fails.

What the pipeline's train step runs:

    spec = job_spec(cfg, owner=kfp_step_owner())   # cafe_core.cluster.spec
    outcome = run_training_job(spec)   # returns when the job Succeeded; raises a TrainingJobError subclass otherwise

The job objects and how to read them back live in the pure modules (spec, pytorchjob, trainjob, kinds); this
module is the Kubernetes client side, the same for both APIs (a JobKind says where each one differs).

Kubernetes API calls made by run_training_job(), all in the job's namespace (manifests/base/role.yaml must
grant exactly these to the pipeline's ServiceAccount `cafe-pipeline`). <jobs> is `pytorchjobs` in group
kubeflow.org (cluster.api=pytorchjob) or `trainjobs` in group trainer.kubeflow.org (cluster.api=trainjob):

    create  <jobs>                  once; HTTP 409 (a retried step) -> the existing job of this spec: Failed ->
                                    delete it, get until it is gone, create again; otherwise follow it
    patch   <jobs>/<name>           a followed job of an earlier attempt gets this step's pod as its owner
    get     <jobs>/<name>           every poll: the job's conditions and whether it is suspended (queued)
    list    pods                    every poll, labelSelector training.kubeflow.org/job-name=<name> (PyTorchJob)
                                    or jobset.sigs.k8s.io/jobset-name=<name> (TrainJob): scheduling, image and
                                    config problems, the rank-0 pod, failed containers
    get     pods/<pod>/log          every poll once the rank-0 pod has started (best-effort); once per failed
                                    container of any replica (previous=true after a restart in place)
    delete  <jobs>/<name>           at the end, per cluster.cleanup
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import kubernetes
import urllib3

from cafe_core.cluster.kinds import JobKind, JobState, kind_of, pytorchjob_state
from cafe_core.cluster.spec import KUEUE_QUEUE_LABEL, SPEC_DIGEST, TrainingJobSpec
from cafe_core.errors import StageFailed

# Container waiting reasons that do not go away by waiting (unlike ContainerCreating).
STUCK_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError")
FAILED_API_POLLS = 5  # consecutive failed polls (API server restarts, network) before giving up
LOG_TAIL = 40  # log lines kept for error messages

job_state = pytorchjob_state  # the PyTorchJob reader, under its old name


# --- errors and results ------------------------------------------------------------------------------


class TrainingJobError(StageFailed, RuntimeError):
    """The training job could not be created, followed or finished; the message says what to do."""


class TrainingJobFailed(TrainingJobError):
    """The operator reports the job Failed (a replica failed, backoff limit, active deadline)."""

    def __init__(self, text: str, *, reason: str, message: str, log_tail: list[str],
                 failure: "ReplicaFailure | None" = None):
        super().__init__(text)
        self.reason = reason
        self.message = message
        self.log_tail = log_tail
        self.failure = failure


class TrainingJobStuck(TrainingJobError):
    """The job's pods could not start (unschedulable, image or config errors) for pending_timeout_seconds."""


class TrainingJobTimeout(TrainingJobError):
    """The job did not finish within active_deadline_seconds plus the client-side margin."""


@dataclass
class JobOutcome:
    """A job that Succeeded, as run_training_job() followed it."""

    name: str
    namespace: str
    state: str  # "Succeeded"
    message: str  # the operator's message for that condition
    seconds: float  # how long run_training_job() followed the job
    created: bool  # False when a job of the same name and spec already existed and was followed
    deleted: bool = False  # whether cleanup deleted the job
    log_tail: list[str] = field(default_factory=list)  # the rank-0 pod's last log lines
    queued_seconds: float = 0.0  # how long it waited suspended (Kueue) before it could start


# --- talking to the cluster --------------------------------------------------------------------------


def default_api_client() -> kubernetes.client.ApiClient:
    """An API client from the in-cluster service account, or from ~/.kube/config outside a cluster."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.ApiClient()


class JobApi:
    """The Kubernetes calls run_training_job() makes for one job (see the module docstring), returning plain
    dicts; `kind` says which API the job is in and how to find its pods."""

    def __init__(self, api: kubernetes.client.ApiClient, kind: JobKind, namespace: str, name: str):
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.kind, self.namespace, self.name = kind, namespace, name
        self._where = (kind.group, kind.version, namespace, kind.plural)

    @property
    def title(self) -> str:
        """How messages name the job: 'PyTorchJob ns/name'."""
        return f"{self.kind.kind} {self.namespace}/{self.name}"

    @property
    def kubectl(self) -> str:
        """The kubectl words for the job: 'pytorchjobs.kubeflow.org NAME -n NS'."""
        return f"{self.kind.resource} {self.name} -n {self.namespace}"

    def create(self, job: dict[str, Any]) -> dict[str, Any]:
        """POST the job."""
        return self.custom.create_namespaced_custom_object(*self._where, job)

    def get(self) -> dict[str, Any] | None:
        """The job as stored, or None when it does not exist."""
        try:
            return self.custom.get_namespaced_custom_object(*self._where, self.name)
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def set_owner(self, references: list[dict[str, Any]]) -> None:
        """Replace the job's ownerReferences (a merge patch replaces the list)."""
        self.custom.patch_namespaced_custom_object(*self._where, self.name,
                                                   {"metadata": {"ownerReferences": references}})

    def delete(self) -> bool:
        """Delete the job (its pods, Services, JobSet go with it); False when it was already gone."""
        try:
            self.custom.delete_namespaced_custom_object(*self._where, self.name, propagation_policy="Background")
            return True
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return False
            raise

    def pods(self) -> list[dict[str, Any]]:
        """The job's pods (by the label its operator sets) as dicts."""
        selector = self.kind.pod_selector(self.name)
        resp = self.core.list_namespaced_pod(self.namespace, label_selector=selector, _preload_content=False)
        items = json.loads(resp.data or b"{}").get("items") or []
        key, _, value = selector.partition("=")
        return [p for p in items if ((p.get("metadata") or {}).get("labels") or {}).get(key) == value]

    def log(self, pod: str, *, since_seconds: int | None = None, tail_lines: int | None = None,
            previous: bool = False) -> str:
        """A pod's trainer container log with RFC 3339 timestamps; previous: the container before its restart."""
        return self.core.read_namespaced_pod_log(
            pod, self.namespace, container=self.kind.container, timestamps=True, since_seconds=since_seconds,
            tail_lines=tail_lines, previous=previous)


def api_error_hint(e: Exception, namespace: str, kind: JobKind) -> str:
    """What an API error means for creating and following a training job, and what to do about it."""
    status = getattr(e, "status", None)
    if status in (401, 403):
        return (f"the Kubernetes API refused the request ({status}): the run's ServiceAccount needs the Role "
                f"in manifests/base/role.yaml ({kind.resource} included) in namespace {namespace!r}: for runs as the "
                f"profile's default-editor `kubectl apply -k manifests/overlays/profile -n {namespace}`; for a "
                f"dedicated account `kubectl apply -k manifests/overlays/dedicated -n {namespace}` and submit with "
                "`cafe submit --service-account cafe-pipeline` (manifests/README.md, Install into a Kubeflow profile)")
    if status == 404:
        return f"the {kind.kind} API ({kind.group}/{kind.version} {kind.plural}) was not found: {kind.install}"
    if status in (400, 422):
        extra = (" (a TrainJob is refused when its ClusterTrainingRuntime cluster.runtime does not exist: "
                 "kubectl get clustertrainingruntimes)") if kind.api == "trainjob" else ""
        return f"the API server rejected the {kind.kind} ({status}): {getattr(e, 'body', '') or e}{extra}"
    return f"Kubernetes API error: {e}"


# --- reading pods ------------------------------------------------------------------------------------


def pod_name(pod: dict[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("name", "?")


def pod_problem(pod: dict[str, Any]) -> str | None:
    """Why a pod cannot start (unschedulable, image, config), or None when it is fine or merely slow."""
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    for cond in status.get("conditions") or []:
        if (cond.get("type"), cond.get("status"), cond.get("reason")) == ("PodScheduled", "False", "Unschedulable"):
            return f"pod {pod_name(pod)} is Unschedulable: {cond.get('message', '(no message)')}"
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return f"pod {pod_name(pod)} container {cs.get('name')}: {waiting['reason']}{detail}"
    return None


def stuck_hint(problem: str) -> str:
    """What to do about a pod that cannot start."""
    if "ephemeral-storage" in problem:
        return ("no node has the local disk the pod asks for (its cache volume is included): lower "
                "train.cache.max_gb or cluster.cache_size / cluster.ephemeral_storage, or use nodes with more "
                "local disk; `kubectl describe pod` shows the scheduler's view")
    if "Unschedulable" in problem:
        return ("no node can take the pod: lower cluster.nodes / cluster.gpus_per_node / cluster.cpu and "
                "cluster.memory, free or add capacity, or fix cluster.node_selector / tolerations / affinity; "
                "`kubectl describe pod` shows the scheduler's view")
    if "CreateContainerConfigError" in problem:
        return ("a referenced Secret or key is missing: create the S3 Secret as in manifests/README.md "
                "(kubectl create secret generic cafe-s3 ...) in the job's namespace, or set cluster.s3_secret")
    return "check cluster.image (name and tag), and cluster.image_pull_secrets for a private registry"


def failure_hint(state: JobState) -> str:
    """What to do about a Failed job, from the operator's reason and message."""
    text = f"{state.reason} {state.message}".lower()
    if "deadline" in text:
        return ("it ran past its active deadline: raise cluster.active_deadline_seconds or lower "
                "train.max_steps; a new run with train.resume=latest continues from the last checkpoint")
    if "backoff" in text:
        return ("its containers kept failing (cluster.backoff_limit reached): the failing replica's log below "
                "shows why")
    return "a replica failed: the failing replica's log below and `kubectl logs <pod>` show why"


# --- logs ----------------------------------------------------------------------------------------------


def log_time(stamp: str) -> tuple[int, int] | None:
    """An RFC 3339 log timestamp (nanoseconds, any zone) as (epoch seconds, nanoseconds), for ordering."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", stamp)
    if not m:
        return None
    zone = "+00:00" if m[3] == "Z" else m[3]
    seconds = int(_dt.datetime.fromisoformat(m[1] + zone).timestamp())
    return seconds, int((m[2] or "0").ljust(9, "0"))


def strip_stamps(text: str) -> list[str]:
    """Log lines without their leading RFC 3339 timestamps."""
    lines = []
    for line in text.splitlines():
        stamp, _, message = line.partition(" ")
        lines.append(message if log_time(stamp) else line)
    return lines


class Rank0Log:
    """Best-effort follower of the rank-0 pod's log: prints each new line once, keeps the last LOG_TAIL."""

    def __init__(self, api: JobApi, log: Callable[[str], Any]):
        self.api, self.log = api, log
        self.tail: deque[str] = deque(maxlen=LOG_TAIL)
        self.last_seen: tuple[int, int] | None = None
        self.last_read: float | None = None
        self.pod: str | None = None

    def poll(self, pods: list[dict[str, Any]]) -> None:
        """Read what rank 0 logged since the last poll (overlapping, deduplicated by timestamp)."""
        rank0 = [p for p in pods if self.api.kind.is_rank0(p, self.api.name)]
        # A Job may have replaced the pod: the newest one is the one running.
        rank0.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
        if not rank0:
            return
        pod = rank0[-1]
        phase = (pod.get("status") or {}).get("phase")
        if phase not in ("Running", "Succeeded", "Failed") and self.last_read is None:
            return
        if pod_name(pod) != self.pod:
            self.pod, self.last_read = pod_name(pod), None  # a new pod: read its whole recent log
        now = time.monotonic()
        since = None if self.last_read is None else math.ceil(now - self.last_read) + 5
        try:
            text = self.api.log(self.pod, since_seconds=since, tail_lines=200 if since is None else None)
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError):
            return  # not started yet, restarting, or already deleted: the next poll tries again
        self.last_read = now
        for line in text.splitlines():
            self._line(line)

    def _line(self, line: str) -> None:
        """Print and keep one "<timestamp> <message>" line unless an earlier read already had it."""
        stamp, _, message = line.partition(" ")
        when = log_time(stamp)
        if when is None:
            when, message = self.last_seen, line
        elif self.last_seen is not None and when <= self.last_seen:
            return
        self.last_seen = when
        self.tail.append(message)
        self.log(f"[{self.pod}] {message}")


@dataclass
class ReplicaFailure:
    """A replica's trainer container that ended badly, with its last log lines."""

    pod: str
    exit_code: int | None  # None: the pod failed without a container exit (evicted, deleted node)
    reason: str
    finished: str  # RFC 3339, for finding the first failure
    restarts: int
    previous: bool  # the log is the container's before its restart in place
    lines: list[str] = field(default_factory=list)

    def describe(self) -> str:
        code = f"exited with code {self.exit_code}" if self.exit_code is not None else "failed"
        why = f" ({self.reason})" if self.reason else ""
        again = f", restarted {self.restarts} time(s) in place" if self.restarts else ""
        return f"pod {self.pod} {code}{why}{again}"


def container_failures(pod: dict[str, Any], container: str) -> list[tuple[dict[str, Any], bool, int]]:
    """The trainer container's non-zero terminations in a pod: (terminated state, is it the previous
    container's, restart count). A container restarted in place shows its failure in lastState."""
    out = []
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") != container:
            continue
        restarts = cs.get("restartCount") or 0
        current = (cs.get("state") or {}).get("terminated")
        previous = (cs.get("lastState") or {}).get("terminated")
        if current and current.get("exitCode"):
            out.append((current, False, restarts))
        elif previous and previous.get("exitCode") and restarts > 0:
            out.append((previous, True, restarts))
    return out


class FailureWatch:
    """Notices replicas whose trainer container exited non-zero (or whose pod Failed) as they happen, and
    reads each one's log once, before the operator stops or deletes the pods: the replica that failed first is
    usually the cause, the others often only lost their peer."""

    def __init__(self, api: JobApi):
        self.api = api
        self.failures: list[ReplicaFailure] = []
        self._seen: set[tuple[str, int, bool]] = set()

    def poll(self, pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            found = container_failures(pod, self.api.kind.container)
            status = pod.get("status") or {}
            if not found and status.get("phase") == "Failed":  # evicted, preempted, its node gone
                key = (pod_name(pod), -1, False)
                if key not in self._seen:
                    self._seen.add(key)
                    self.failures.append(ReplicaFailure(pod_name(pod), None, status.get("reason", ""),
                                                        status.get("startTime", ""), 0, False,
                                                        [status.get("message", "")] if status.get("message") else []))
            for term, previous, restarts in found:
                key = (pod_name(pod), restarts, previous)
                if key in self._seen:
                    continue
                self._seen.add(key)
                failure = ReplicaFailure(pod_name(pod), term.get("exitCode"), term.get("reason", ""),
                                         term.get("finishedAt", ""), restarts, previous)
                try:
                    failure.lines = strip_stamps(self.api.log(pod_name(pod), tail_lines=LOG_TAIL, previous=previous))
                except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError):
                    pass  # gone already; the description still says which replica and how
                self.failures.append(failure)

    def first(self) -> ReplicaFailure | None:
        """The earliest failure by its finish time (the likely cause)."""
        def when(f: ReplicaFailure) -> tuple[int, int]:
            return log_time(f.finished) or (2**62, 0)
        return min(self.failures, key=when, default=None)


# --- creating and following the job ------------------------------------------------------------------


def create_job(api: JobApi, job: dict[str, Any], log: Callable[[str], Any], gone_timeout: float = 120.0,
               poll_seconds: float = 1.0) -> bool:
    """Create the job; True when created. When the same job (same spec digest) already exists, a retried
    step's: a Failed one is deleted and created again (True), any other is followed (False) and becomes this
    step's (its owner is now this step's pod). A different job of the same name is an error: it is not ours
    to follow or delete."""
    try:
        api.create(job)
        log(f"created {api.title}")
        return True
    except kubernetes.client.ApiException as e:
        if e.status != 409:
            hint = api_error_hint(e, api.namespace, api.kind)
            raise TrainingJobError(f"could not create {api.title}: {hint}") from None
    except urllib3.exceptions.HTTPError as e:
        raise TrainingJobError(f"could not reach the Kubernetes API to create {api.title}: {e}") from None
    existing = api.get()
    if existing is None:
        raise TrainingJobError(f"{api.title} was being deleted while this step created it: run the step again")
    theirs = ((existing.get("metadata") or {}).get("annotations") or {}).get(SPEC_DIGEST)
    ours = job["metadata"]["annotations"][SPEC_DIGEST]
    if theirs != ours:
        raise TrainingJobError(
            f"a different {api.title} already exists (spec digest {theirs} vs {ours}): delete it (kubectl delete "
            f"{api.kubectl}) or use another job name / run id")
    state = api.kind.state(existing)
    if state.type == "Failed":  # an earlier attempt of this step failed: this retry starts afresh
        log(f"{api.title} of an earlier attempt Failed ({state.reason or 'no reason'}): deleting it and starting "
            "again (training resumes from its last checkpoint)")
        api.delete()
        deadline = time.monotonic() + gone_timeout
        while api.get() is not None:
            if time.monotonic() > deadline:
                raise TrainingJobError(f"the Failed {api.title} was not gone {gone_timeout:.0f} s after its "
                                       "deletion: run the step again")
            time.sleep(poll_seconds)
        api.create(job)
        log(f"created {api.title}")
        return True
    owners = (job.get("metadata") or {}).get("ownerReferences")
    if owners and (existing.get("metadata") or {}).get("ownerReferences") != owners:
        api.set_owner(owners)  # the earlier attempt's pod may go: the job must not go with it
    log(f"{api.title} already exists with this spec (a retried step): following it")
    return False


def read_job(api: JobApi) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The job and its pods. Permission problems and a vanished job raise TrainingJobError; other API errors
    propagate as they are, for the caller to retry."""
    try:
        job = api.get()
        pods = api.pods()
    except kubernetes.client.ApiException as e:
        if e.status in (401, 403):
            raise TrainingJobError(f"cannot read {api.title}: {api_error_hint(e, api.namespace, api.kind)}") from None
        raise
    if job is None:
        raise TrainingJobError(f"{api.title} disappeared while it was followed: someone deleted it; run the step "
                               "again")
    return job, pods


def queue_of(job: dict[str, Any]) -> str | None:
    """The Kueue LocalQueue a job is submitted to (its queue-name label), if any."""
    return ((job.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)


def waiting_line(api: JobApi, job: dict[str, Any]) -> str:
    """What a suspended job waits for."""
    queue = queue_of(job)
    if queue:
        return (f"{api.kind.kind} {api.name}: queued in Kueue LocalQueue {queue!r} (suspended until Kueue admits "
                f"it; `kubectl get workloads -n {api.namespace}` shows why it waits)")
    return (f"{api.kind.kind} {api.name}: suspended (no Kueue queue label): it starts when resumed; `kubectl "
            f"describe {api.kubectl}` shows who suspended it")


def start_problem(api: JobApi, state: JobState, pods: list[dict[str, Any]]) -> str | None:
    """Why the job cannot start, if it cannot: a pod's problem, or an operator that never acted."""
    problem = next((p for p in map(pod_problem, pods) if p), None)
    if problem is None and state.type == "Submitted" and not pods:
        problem = (f"{api.kind.controller} has not acted on the job (no status, no pods): is it installed and "
                   f"watching namespace {api.namespace}?")
    return problem


def follow(api: JobApi, spec: TrainingJobSpec, created: bool, poll_seconds: float, log: Callable[[str], Any],
           timeout_margin_seconds: float) -> JobOutcome:
    """Poll the job until it Succeeded (returned), or Failed, stays unable to start or runs out of time (raised).
    A suspended job (queued in Kueue) counts neither as stuck nor against the deadline: the operators also
    start its active deadline when it is resumed."""
    s = spec.settings
    started = time.monotonic()
    active_since: float | None = None  # when it was last seen not suspended
    queued_since: float | None = None  # when it was first seen suspended, while it is
    queued_seconds = 0.0
    rank0 = Rank0Log(api, log)
    failures = FailureWatch(api)
    last: tuple[JobState, bool] | None = None
    stuck_since: float | None = None
    failed_polls = 0
    while True:
        now = time.monotonic()
        try:
            job, pods = read_job(api)
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError) as e:
            failed_polls += 1
            if failed_polls >= FAILED_API_POLLS:
                raise TrainingJobError(f"{failed_polls} polls of {api.title} in a row failed: "
                                       f"{api_error_hint(e, api.namespace, api.kind)}") from None
            log(f"could not read {api.kind.kind} {api.name} ({e}); trying again")
        else:
            failed_polls = 0
            state = api.kind.state(job)
            finished = state.type in ("Succeeded", "Failed")
            queued = not finished and (api.kind.suspended(job) or state.type == "Suspended")
            was_queued = last is not None and last[1]
            if queued and not was_queued:  # once: its conditions may change while it waits
                log(waiting_line(api, job))
            elif not queued and (was_queued or last is None or state != last[0]):
                detail = f" ({state.reason}: {state.message})" if state.reason or state.message else ""
                log(f"{api.kind.kind} {api.name}: {state.type}{detail}")
            last = (state, queued)
            if queued:
                queued_since = now if queued_since is None else queued_since
                active_since, stuck_since = None, None
            else:
                if queued_since is not None:
                    queued_seconds, queued_since = queued_seconds + now - queued_since, None
                active_since = now if active_since is None else active_since
            rank0.poll(pods)
            failures.poll(pods)
            if state.type == "Succeeded":
                return JobOutcome(api.name, api.namespace, state.type, state.message, time.monotonic() - started,
                                  created, log_tail=list(rank0.tail), queued_seconds=queued_seconds)
            if state.type == "Failed":
                raise failed_error(api, state, list(rank0.tail), failures.first(), created)
            problem = None if queued else start_problem(api, state, pods)
            stuck_since = None if problem is None else (now if stuck_since is None else stuck_since)
            if problem and now - stuck_since >= s.pending_timeout_seconds:
                raise TrainingJobStuck(
                    f"{api.title} could not start for {now - stuck_since:.0f} s (cluster.pending_timeout_seconds="
                    f"{s.pending_timeout_seconds:g}): {problem}. What to do: {stuck_hint(problem)}")
        limit = s.active_deadline_seconds + timeout_margin_seconds
        if active_since is not None and time.monotonic() - active_since > limit:
            raise TrainingJobTimeout(
                f"{api.title} is still {last[0].type if last else 'unknown'} {time.monotonic() - active_since:.0f} s "
                f"after it could start, past cluster.active_deadline_seconds={s.active_deadline_seconds} plus "
                f"{timeout_margin_seconds:g} s: {api.kind.controller} did not end it; check `kubectl describe "
                f"{api.kubectl}` and its log")
        time.sleep(poll_seconds)


def failed_error(api: JobApi, state: JobState, tail: list[str], failure: ReplicaFailure | None,
                 created: bool) -> TrainingJobFailed:
    """The exception for a Failed job: the operator's reason and message, what to do, and the log of the
    replica that failed first (else the rank-0 pod's last lines)."""
    again = "" if created else (f" This job existed before this step created it (a retried step follows it): delete "
                                f"it (kubectl delete {api.kubectl}) to train again.")
    text = (f"{api.title} Failed ({state.reason or 'no reason'}): {state.message}. What to do: "
            f"{failure_hint(state)}.{again}")
    if failure is not None:
        which = "before its restart" if failure.previous else "its last lines"
        lines = "\n".join(f"  {line}" for line in failure.lines[-20:]) or "  (its log could not be read)"
        text += f"\nFailing replica: {failure.describe()}; {which}:\n{lines}"
    else:
        lines = "\n".join(f"  {line}" for line in tail[-20:]) or "  (no log lines could be read)"
        text += f"\nLast lines of the rank-0 pod:\n{lines}"
    return TrainingJobFailed(text, reason=state.reason, message=state.message,
                             log_tail=failure.lines if failure and failure.lines else tail, failure=failure)


def should_delete(policy: str, ending: str) -> bool:
    """Whether cleanup deletes the job. ending: succeeded | failed | abandoned (still alive when we stopped)."""
    if policy == "never":
        return False
    return policy == "always" or ending in ("succeeded", "abandoned")


def clean_up(api: JobApi, policy: str, ending: str, log: Callable[[str], Any]) -> bool:
    """Delete the job when the policy says so; never raises (the job's own result matters more)."""
    if not should_delete(policy, ending):
        if ending != "succeeded":
            log(f"kept {api.title} (cluster.cleanup={policy}); delete it with `kubectl delete {api.kubectl}`")
        return False
    try:
        deleted = api.delete()
    except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError) as e:
        log(f"could not delete {api.title}: {e}; delete it by hand")
        return False
    if deleted:
        log(f"deleted {api.title} (cluster.cleanup={policy})")
    return deleted


@contextmanager
def sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM (a cancelled KFP run, a deleted pod) into SystemExit while run_training_job() follows the
    job, so its cleanup runs instead of leaving the job to hold its GPUs. Only in the main thread (a signal
    restriction)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_training_job(spec: TrainingJobSpec, api: kubernetes.client.ApiClient | None = None,
                     poll_seconds: float = 15.0, log: Callable[[str], Any] = print,
                     timeout_margin_seconds: float = 600.0) -> JobOutcome:
    """Create the job for `spec` (a PyTorchJob or TrainJob per spec.settings.api; or follow the same job when it
    already exists), print its state changes and the rank-0 pod's log, and return when it Succeeded.

    Raises TrainingJobFailed (the operator's reason, e.g. DeadlineExceeded or a failed replica, and the log of
    the replica that failed first), TrainingJobStuck (pods unable to start for pending_timeout_seconds, quoting
    the scheduler; time queued in Kueue does not count), TrainingJobTimeout (still not finished
    active_deadline_seconds + timeout_margin_seconds after it could start) or TrainingJobError (API and
    permission problems). The job is deleted at the end per cluster.cleanup, also when following is
    interrupted (Ctrl-C, or SIGTERM when called from the main thread).
    """
    kind = kind_of(spec)
    client = JobApi(api or default_api_client(), kind, spec.namespace, spec.name)
    with sigterm_exits():
        created = create_job(client, kind.build(spec), log, poll_seconds=poll_seconds)
        ending = "abandoned"
        outcome: JobOutcome | None = None
        try:
            outcome = follow(client, spec, created, poll_seconds, log, timeout_margin_seconds)
            ending = "succeeded"
            return outcome
        except TrainingJobFailed:
            ending = "failed"
            raise
        finally:
            deleted = clean_up(client, spec.settings.cleanup, ending, log)
            if outcome is not None:
                outcome.deleted = deleted
