"""The two training job APIs as data: what cafe_core.cluster.jobs needs to create, follow and clean up a job of
either kind without knowing which. Pure: no Kubernetes client.

    kind = kind_of(spec)          # PYTORCHJOB or TRAINJOB, from spec.settings.api
    job = kind.build(spec)        # the object to create
    kind.state(job)               # its state, in one vocabulary for both: JobState
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from cafe_core.cluster import pytorchjob as _pt
from cafe_core.cluster import trainjob as _tj
from cafe_core.cluster.spec import TrainingJobSpec


@dataclass(frozen=True)
class JobState:
    """A job's state. type: Submitted (no status yet), Created, Running, Restarting, Suspended, Succeeded,
    Failed; reason and message as the operator wrote them."""

    type: str
    reason: str = ""
    message: str = ""


# PyTorchJob: a later state in this list wins when several conditions are True at once (Created stays True).
STATE_ORDER = ("Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed")


def pytorchjob_state(job: dict[str, Any]) -> JobState:
    """The Training Operator's most advanced condition with status True, or Submitted before it acted."""
    current = JobState("Submitted")
    rank = -1
    for cond in (job.get("status") or {}).get("conditions") or []:
        kind = cond.get("type", "")
        if cond.get("status") == "True" and kind in STATE_ORDER and STATE_ORDER.index(kind) >= rank:
            rank = STATE_ORDER.index(kind)
            current = JobState(kind, cond.get("reason", ""), cond.get("message", ""))
    return current


def trainjob_state(job: dict[str, Any]) -> JobState:
    """A TrainJob's state. The Trainer v2.3 sets only three conditions: Failed and Complete (copied from its
    JobSet), Suspended (True while spec.suspend; False with reason Resumed after). Running and Created come
    from status.jobsStatus, which it copies from the JobSet's replicated Jobs."""
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    for kind, name in (("Failed", "Failed"), ("Complete", "Succeeded"), ("Suspended", "Suspended")):
        if kind in conditions:
            return JobState(name, conditions[kind].get("reason", ""), conditions[kind].get("message", ""))
    jobs = status.get("jobsStatus") or []
    if any((j.get("active") or 0) > 0 or (j.get("ready") or 0) > 0 for j in jobs):
        return JobState("Running")
    return JobState("Created") if jobs or status.get("conditions") else JobState("Submitted")


@dataclass(frozen=True)
class JobKind:
    """One training job API: where it lives, how to build and read its objects, how to find its pods."""

    api: str  # the cluster.api value
    group: str
    version: str
    plural: str
    kind: str
    container: str  # the trainer container in every pod
    controller: str  # who acts on the job, for messages
    install: str  # what to install when the API is missing
    build: Callable[[TrainingJobSpec], dict[str, Any]]
    state: Callable[[dict[str, Any]], JobState]
    suspended: Callable[[dict[str, Any]], bool]  # spec says suspended (Kueue's webhook sets it before any status)
    pod_selector: Callable[[str], str]  # job name -> label selector of its pods
    is_rank0: Callable[[dict[str, Any], str], bool]  # (pod, job name) -> the pod runs node rank 0

    @property
    def resource(self) -> str:
        """kubectl's name for it, e.g. pytorchjobs.kubeflow.org."""
        return f"{self.plural}.{self.group}"


PYTORCHJOB = JobKind(
    api="pytorchjob", group=_pt.GROUP, version=_pt.VERSION, plural=_pt.PLURAL, kind=_pt.KIND,
    container=_pt.CONTAINER, controller="the Training Operator",
    install="install the Kubeflow Training Operator v1.9 (manifests/README.md)",
    build=_pt.pytorchjob, state=pytorchjob_state, suspended=_pt.is_suspended, pod_selector=_pt.pod_selector,
    is_rank0=_pt.is_rank0,
)
TRAINJOB = JobKind(
    api="trainjob", group=_tj.GROUP, version=_tj.VERSION, plural=_tj.PLURAL, kind=_tj.KIND,
    container=_tj.CONTAINER, controller="the Kubeflow Trainer controller",
    install="install Kubeflow Trainer v2.3 and its ClusterTrainingRuntime torch-distributed (docs/training-jobs.md)",
    build=_tj.trainjob, state=trainjob_state, suspended=_tj.is_suspended, pod_selector=_tj.pod_selector,
    is_rank0=_tj.is_rank0,
)
KINDS = {k.api: k for k in (PYTORCHJOB, TRAINJOB)}


def kind_of(spec: TrainingJobSpec) -> JobKind:
    return KINDS[spec.settings.api]


def job_object(spec: TrainingJobSpec) -> dict[str, Any]:
    """The object the train step creates for a spec: a PyTorchJob or a TrainJob, per cluster.api."""
    return kind_of(spec).build(spec)
