"""Run `cafe train` on Kubernetes as a Kubeflow Training Operator PyTorchJob, follow it, fail when it fails.

What the pipeline's train step runs in cluster mode:

    spec = TrainingJobSpec(
        name=job_name("r7"), image="registry.example.com/cafe:0.1.0", nodes=2, gpus_per_node=8,
        argv=["-m", "cafe_core.cli", "train", "--config", "/app/configs/cluster.yaml", "run_id=r7"],
    )
    outcome = run_training_job(spec)   # returns when the job Succeeded; raises a TrainingJobError subclass otherwise

TrainingJobSpec, job_name and the PyTorchJob object it becomes live in cafe_core.cluster.pytorchjob (pure);
this module is the Kubernetes client side.

Kubernetes API calls made by run_training_job(), all in the job's namespace (manifests/base/role.yaml grants
exactly these to the pipeline's ServiceAccount `cafe-pipeline`):

    create  kubeflow.org pytorchjobs           once; HTTP 409 (a retried step) -> the existing job of this spec:
                                               Failed -> delete it, wait until it is gone, create again;
                                               otherwise follow it
    patch   kubeflow.org pytorchjobs/<name>    a followed job gets this step's pod as its owner
    get     kubeflow.org pytorchjobs/<name>    every poll: the job's conditions
    list    pods (labelSelector job-name)      every poll: scheduling / image / config problems, master phase
    get     pods/<name>-master-0/log           every poll once the master has started (best-effort)
    delete  kubeflow.org pytorchjobs/<name>    at the end, per TrainingJobSpec.cleanup
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

from cafe_core.cluster.pytorchjob import (
    CONTAINER,
    GROUP,
    JOB_NAME_LABEL,
    PLURAL,
    SPEC_DIGEST,
    VERSION,
    TrainingJobSpec,
    pytorchjob,
)
from cafe_core.errors import StageFailed

# Container waiting reasons that do not go away by waiting (unlike ContainerCreating).
STUCK_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError")
FAILED_API_POLLS = 5  # consecutive failed polls (API server restarts, network) before giving up
LOG_TAIL = 40  # log lines kept for error messages


# --- errors and results ------------------------------------------------------------------------------


class TrainingJobError(StageFailed, RuntimeError):
    """The training job could not be created, followed or finished; the message says what to do."""


class TrainingJobFailed(TrainingJobError):
    """The Training Operator reports the job Failed (a replica failed, backoff limit, active deadline)."""

    def __init__(self, text: str, *, reason: str, message: str, log_tail: list[str]):
        super().__init__(text)
        self.reason = reason
        self.message = message
        self.log_tail = log_tail


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
    log_tail: list[str] = field(default_factory=list)  # the master's last log lines


# --- talking to the cluster --------------------------------------------------------------------------


def default_api_client() -> kubernetes.client.ApiClient:
    """An API client from the in-cluster service account, or from ~/.kube/config outside a cluster."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.ApiClient()


class JobApi:
    """The Kubernetes calls run_training_job() makes for one job (see the module docstring), returning plain dicts."""

    def __init__(self, api: kubernetes.client.ApiClient, namespace: str, name: str):
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)
        self.namespace, self.name = namespace, name
        self.master_pod = f"{name}-master-0"

    def create(self, job: dict[str, Any]) -> dict[str, Any]:
        """POST the job."""
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job)

    def get(self) -> dict[str, Any] | None:
        """The job as stored, or None when it does not exist."""
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def set_owner(self, references: list[dict[str, Any]]) -> None:
        """Replace the job's ownerReferences (a merge patch replaces the list)."""
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name,
                                                   {"metadata": {"ownerReferences": references}})

    def delete(self) -> bool:
        """Delete the job (its pods and Services go with it); False when it was already gone."""
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name, propagation_policy="Background")
            return True
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return False
            raise

    def pods(self) -> list[dict[str, Any]]:
        """The job's pods (by the operator's job-name label) as dicts."""
        resp = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{JOB_NAME_LABEL}={self.name}", _preload_content=False)
        items = json.loads(resp.data or b"{}").get("items") or []
        return [p for p in items if (p.get("metadata", {}).get("labels") or {}).get(JOB_NAME_LABEL) == self.name]

    def master_log(self, since_seconds: int | None, tail_lines: int | None) -> str:
        """The Master pod's log with RFC 3339 timestamps."""
        return self.core.read_namespaced_pod_log(
            self.master_pod, self.namespace, container=CONTAINER, timestamps=True,
            since_seconds=since_seconds, tail_lines=tail_lines)


def api_error_hint(e: Exception, namespace: str) -> str:
    """What an API error means for creating and following a training job, and what to do about it."""
    status = getattr(e, "status", None)
    if status in (401, 403):
        return (f"the Kubernetes API refused the request ({status}): the pipeline's ServiceAccount needs the "
                f"Role in manifests/base/role.yaml in namespace {namespace!r} (kubectl apply -k manifests/base "
                f"-n {namespace}) and the run must use that ServiceAccount (cafe-pipeline)")
    if status == 404:
        return ("the PyTorchJob API (kubeflow.org/v1 pytorchjobs) was not found: install the Kubeflow Training "
                "Operator v1.9 (see manifests/README.md)")
    if status in (400, 422):
        return f"the API server rejected the PyTorchJob ({status}): {getattr(e, 'body', '') or e}"
    return f"Kubernetes API error: {e}"


# --- reading the job's state -------------------------------------------------------------------------


@dataclass(frozen=True)
class JobState:
    """The job's current condition as the operator reports it."""

    type: str  # Submitted (no condition yet), Created, Running, Restarting, Suspended, Succeeded, Failed
    reason: str = ""
    message: str = ""


# A later state in this list wins when several conditions are True at once (Created stays True throughout).
STATE_ORDER = ("Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed")


def job_state(job: dict[str, Any]) -> JobState:
    """The most advanced condition with status True, or Submitted before the operator acted."""
    current = JobState("Submitted")
    rank = -1
    for cond in (job.get("status") or {}).get("conditions") or []:
        kind = cond.get("type", "")
        if cond.get("status") == "True" and kind in STATE_ORDER and STATE_ORDER.index(kind) >= rank:
            rank = STATE_ORDER.index(kind)
            current = JobState(kind, cond.get("reason", ""), cond.get("message", ""))
    return current


def pod_problem(pod: dict[str, Any]) -> str | None:
    """Why a pod cannot start (unschedulable, image, config), or None when it is fine or merely slow."""
    name = pod.get("metadata", {}).get("name", "?")
    status = pod.get("status") or {}
    if status.get("phase") not in (None, "Pending"):
        return None
    for cond in status.get("conditions") or []:
        if (cond.get("type"), cond.get("status"), cond.get("reason")) == ("PodScheduled", "False", "Unschedulable"):
            return f"pod {name} is Unschedulable: {cond.get('message', '(no message)')}"
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return f"pod {name} container {cs.get('name')}: {waiting['reason']}{detail}"
    return None


def stuck_hint(problem: str) -> str:
    """What to do about a pod that cannot start."""
    if "Unschedulable" in problem:
        return ("no node can take the pod: lower nodes / gpus_per_node / cpu and memory requests, free or add "
                "capacity, or fix node_selector; `kubectl describe pod` shows the scheduler's view")
    if "CreateContainerConfigError" in problem:
        return ("a referenced Secret or key is missing: create the S3 Secret as in manifests/README.md "
                "(kubectl create secret generic cafe-s3 ...) in the job's namespace")
    return "check the image name and tag, and imagePullSecrets for a private registry"


def failure_hint(state: JobState) -> str:
    """What to do about a Failed job, from the operator's reason and message."""
    text = f"{state.reason} {state.message}".lower()
    if "deadline" in text:
        return ("it ran past activeDeadlineSeconds: raise active_deadline_seconds or lower train.max_steps; a new "
                "run with train.resume=latest continues from the last checkpoint")
    if "backoff" in text:
        return "its containers kept failing (backoffLimit reached): the log lines below show why"
    return "a replica failed: the log lines below and `kubectl logs <pod>` show why"


# --- following the master's log ----------------------------------------------------------------------


def log_time(stamp: str) -> tuple[int, int] | None:
    """An RFC 3339 log timestamp (nanoseconds, any zone) as (epoch seconds, nanoseconds), for ordering."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", stamp)
    if not m:
        return None
    zone = "+00:00" if m[3] == "Z" else m[3]
    seconds = int(_dt.datetime.fromisoformat(m[1] + zone).timestamp())
    return seconds, int((m[2] or "0").ljust(9, "0"))


class MasterLog:
    """Best-effort follower of the Master pod's log: prints each new line once, keeps the last LOG_TAIL."""

    def __init__(self, api: JobApi, log: Callable[[str], Any]):
        self.api, self.log = api, log
        self.tail: deque[str] = deque(maxlen=LOG_TAIL)
        self.last_seen: tuple[int, int] | None = None
        self.last_read: float | None = None

    def poll(self, pods: list[dict[str, Any]]) -> None:
        """Read what the master logged since the last poll (overlapping, deduplicated by timestamp)."""
        phase = next((p.get("status", {}).get("phase") for p in pods
                      if p.get("metadata", {}).get("name") == self.api.master_pod), None)
        if phase not in ("Running", "Succeeded", "Failed") and self.last_read is None:
            return
        now = time.monotonic()
        since = None if self.last_read is None else math.ceil(now - self.last_read) + 5
        try:
            text = self.api.master_log(since_seconds=since, tail_lines=200 if since is None else None)
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
        self.log(f"[{self.api.master_pod}] {message}")


# --- creating and following the job ------------------------------------------------------------------


def create_job(api: JobApi, job: dict[str, Any], log: Callable[[str], Any], gone_timeout: float = 120.0,
               poll_seconds: float = 1.0) -> bool:
    """Create the job; True when created. When the same job (same spec digest) already exists, a retried
    step's: a Failed one is deleted and created again (True), any other is followed (False) and becomes this
    step's (its owner is now this step's pod). A different job of the same name is an error: it is not ours
    to follow or delete."""
    try:
        api.create(job)
        log(f"created PyTorchJob {api.namespace}/{api.name}")
        return True
    except kubernetes.client.ApiException as e:
        if e.status != 409:
            raise TrainingJobError(f"could not create PyTorchJob {api.namespace}/{api.name}: "
                                   f"{api_error_hint(e, api.namespace)}") from None
    except urllib3.exceptions.HTTPError as e:
        raise TrainingJobError(f"could not reach the Kubernetes API to create PyTorchJob {api.name}: {e}") from None
    existing = api.get()
    if existing is None:
        raise TrainingJobError(f"PyTorchJob {api.namespace}/{api.name} was being deleted while this step created "
                               "it: run the step again")
    theirs = ((existing.get("metadata") or {}).get("annotations") or {}).get(SPEC_DIGEST)
    if theirs != job["metadata"]["annotations"][SPEC_DIGEST]:
        raise TrainingJobError(
            f"a different PyTorchJob {api.namespace}/{api.name} already exists (spec digest {theirs} vs "
            f"{job['metadata']['annotations'][SPEC_DIGEST]}): delete it (kubectl delete pytorchjob {api.name} "
            f"-n {api.namespace}) or use another job name / run id"
        )
    state = job_state(existing)
    if state.type == "Failed":  # an earlier attempt of this step failed: this retry starts afresh
        log(f"PyTorchJob {api.namespace}/{api.name} of an earlier attempt Failed ({state.reason or 'no reason'}): "
            "deleting it and starting again (training resumes from its last checkpoint)")
        api.delete()
        deadline = time.monotonic() + gone_timeout
        while api.get() is not None:
            if time.monotonic() > deadline:
                raise TrainingJobError(f"the Failed PyTorchJob {api.namespace}/{api.name} was not gone "
                                       f"{gone_timeout:.0f} s after its deletion: run the step again")
            time.sleep(poll_seconds)
        api.create(job)
        log(f"created PyTorchJob {api.namespace}/{api.name}")
        return True
    owners = (job.get("metadata") or {}).get("ownerReferences")
    if owners and (existing.get("metadata") or {}).get("ownerReferences") != owners:
        api.set_owner(owners)  # the earlier attempt's pod may go: the job must not go with it
    log(f"PyTorchJob {api.namespace}/{api.name} already exists with this spec (a retried step): following it")
    return False


def read_job(api: JobApi) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The job and its pods. Permission problems and a vanished job raise TrainingJobError; other API errors
    propagate as they are, for the caller to retry."""
    try:
        job = api.get()
        pods = api.pods()
    except kubernetes.client.ApiException as e:
        if e.status in (401, 403):
            raise TrainingJobError(f"cannot read PyTorchJob {api.name}: {api_error_hint(e, api.namespace)}") from None
        raise
    if job is None:
        raise TrainingJobError(f"PyTorchJob {api.namespace}/{api.name} disappeared while it was followed: someone "
                               "deleted it; run the step again")
    return job, pods


def start_problem(state: JobState, pods: list[dict[str, Any]], namespace: str) -> str | None:
    """Why the job cannot start, if it cannot: a pod's problem, or an operator that never acted."""
    problem = next((p for p in map(pod_problem, pods) if p), None)
    if problem is None and state.type == "Submitted" and not pods:
        problem = (f"the Training Operator has not acted on the job (no status, no pods): is it installed and "
                   f"watching namespace {namespace}?")
    return problem


def follow(api: JobApi, spec: TrainingJobSpec, created: bool, poll_seconds: float, log: Callable[[str], Any],
           timeout_margin_seconds: float) -> JobOutcome:
    """Poll the job until it Succeeded (returned), or Failed, stays unable to start or runs out of time (raised)."""
    started = time.monotonic()
    deadline = started + spec.active_deadline_seconds + timeout_margin_seconds
    master_log = MasterLog(api, log)
    last: JobState | None = None
    stuck_since: float | None = None
    failures = 0
    while True:
        try:
            job, pods = read_job(api)
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError) as e:
            failures += 1
            if failures >= FAILED_API_POLLS:
                raise TrainingJobError(f"{failures} polls of PyTorchJob {api.name} in a row failed: "
                                       f"{api_error_hint(e, api.namespace)}") from None
            log(f"could not read PyTorchJob {api.name} ({e}); trying again")
        else:
            failures = 0
            state = job_state(job)
            if state != last:
                detail = f" ({state.reason}: {state.message})" if state.reason or state.message else ""
                log(f"PyTorchJob {api.name}: {state.type}{detail}")
                last = state
            master_log.poll(pods)
            if state.type == "Succeeded":
                return JobOutcome(api.name, api.namespace, state.type, state.message, time.monotonic() - started,
                                  created, log_tail=list(master_log.tail))
            if state.type == "Failed":
                raise failed_error(api, state, list(master_log.tail), created)
            problem = start_problem(state, pods, api.namespace)
            stuck_since = None if problem is None else (stuck_since or time.monotonic())
            if problem and time.monotonic() - stuck_since >= spec.pending_timeout_seconds:
                raise TrainingJobStuck(
                    f"PyTorchJob {api.namespace}/{api.name} could not start for {time.monotonic() - stuck_since:.0f} s "
                    f"(pending_timeout_seconds={spec.pending_timeout_seconds:g}): {problem}. What to do: "
                    f"{stuck_hint(problem)}"
                )
        if time.monotonic() > deadline:
            raise TrainingJobTimeout(
                f"PyTorchJob {api.namespace}/{api.name} is still {last.type if last else 'unknown'} after "
                f"{time.monotonic() - started:.0f} s, past activeDeadlineSeconds={spec.active_deadline_seconds} plus "
                f"{timeout_margin_seconds:g} s: the operator did not end it; check `kubectl describe pytorchjob "
                f"{api.name} -n {api.namespace}` and the Training Operator's log"
            )
        time.sleep(poll_seconds)


def failed_error(api: JobApi, state: JobState, tail: list[str], created: bool) -> TrainingJobFailed:
    """The exception for a Failed job: the operator's reason and message, what to do, the last log lines."""
    lines = "\n".join(f"  {line}" for line in tail[-20:]) or "  (no log lines could be read)"
    again = "" if created else (f" This job existed before this step created it (a retried step follows it): delete it "
                                f"(kubectl delete pytorchjob {api.name} -n {api.namespace}) to train again.")
    text = (f"PyTorchJob {api.namespace}/{api.name} Failed ({state.reason or 'no reason'}): {state.message}. "
            f"What to do: {failure_hint(state)}.{again}\nLast lines of {api.master_pod}:\n{lines}")
    return TrainingJobFailed(text, reason=state.reason, message=state.message, log_tail=tail)


def should_delete(policy: str, ending: str) -> bool:
    """Whether cleanup deletes the job. ending: succeeded | failed | abandoned (still alive when we stopped)."""
    if policy == "never":
        return False
    return policy == "always" or ending in ("succeeded", "abandoned")


def clean_up(api: JobApi, policy: str, ending: str, log: Callable[[str], Any]) -> bool:
    """Delete the job when the policy says so; never raises (the job's own result matters more)."""
    if not should_delete(policy, ending):
        if ending != "succeeded":
            log(f"kept PyTorchJob {api.namespace}/{api.name} (cleanup={policy}); delete it with "
                f"`kubectl delete pytorchjob {api.name} -n {api.namespace}`")
        return False
    try:
        deleted = api.delete()
    except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError) as e:
        log(f"could not delete PyTorchJob {api.namespace}/{api.name}: {e}; delete it by hand")
        return False
    if deleted:
        log(f"deleted PyTorchJob {api.namespace}/{api.name} (cleanup={policy})")
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
    """Create the PyTorchJob for `spec` (or follow the same job when it already exists), print its state
    changes and the master's log, and return when it Succeeded.

    Raises TrainingJobFailed (the operator's reason, e.g. DeadlineExceeded or a failed replica, and the last
    log lines), TrainingJobStuck (pods unable to start for pending_timeout_seconds, naming the scheduler's
    message), TrainingJobTimeout (still not finished active_deadline_seconds + timeout_margin_seconds after
    following began) or TrainingJobError (API and permission problems). The job is deleted at the end per
    spec.cleanup, also when following is interrupted (Ctrl-C, or SIGTERM when called from the main thread).
    """
    client = JobApi(api or default_api_client(), spec.namespace, spec.name)
    with sigterm_exits():
        created = create_job(client, pytorchjob(spec), log, poll_seconds=poll_seconds)
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
            deleted = clean_up(client, spec.cleanup, ending, log)
            if outcome is not None:
                outcome.deleted = deleted

