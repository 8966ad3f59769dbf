"""What every pipeline task gets (image, S3 credentials from a Kubernetes Secret, caching, resources, a
timeout, retries), and the pipelines' signatures made from cafe_core.params."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import sys

from kfp import kubernetes
from kfp.dsl.pipeline_task import PipelineTask
from pydantic import BaseModel

S3_SECRET_KEYS = {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}



def _ensure_container_spec_exists(self: PipelineTask) -> None:
    """kfp 2.17's check behind every resource setter, with the same error, minus its `inspect.stack()`: that
    reads the source of every frame on the stack to name the caller, ~50 ms per setter here and 0.4 s under
    pytest, i.e. most of building a pipeline."""
    if self.container_spec is None:
        raise ValueError(f"{sys._getframe(1).f_code.co_name} can only be used on single-step components, not "
                         "pipelines used as components, or special components like importers.")


if not callable(getattr(PipelineTask, "_ensure_container_spec_exists", None)):  # a kfp that no longer has it
    raise ImportError("kfp.dsl.PipelineTask._ensure_container_spec_exists is gone: drop the stand-in in pipelines/common.py")
PipelineTask._ensure_container_spec_exists = _ensure_container_spec_exists

HOUR = 3600
# The train step follows the training job to its end, so its timeout bounds queueing plus training. The
# job's own deadline, cluster.active_deadline_seconds, is 3 days (the largest run planned, 7B on the full
# OneVision mix on 4 nodes x 8 GPUs, takes about 2.5); a week leaves days for a queue (Kueue) to admit the
# job, so only a hang runs into it. Pods that cannot start fail sooner: pending_timeout_seconds.
TRAIN_TIMEOUT = 7 * 24 * HOUR


@dataclass(frozen=True)
class Resources:
    """A task's CPU and memory (requests: what the scheduler reserves; limits: what it may use), its
    timeout, and how often it is retried (0: a failure fails the run)."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    timeout: int  # seconds
    retries: int


# Retries cover what a rerun cures (an evicted or preempted pod, a node drained, S3 or the API server
# briefly away); every retried task is idempotent: it reuses or rewrites its committed output.
RETRIES = 2
# resolve config, merge, gate, the promotion request, compare: small files, a few seconds.
LIGHT = Resources("250m", "1", "512Mi", "2Gi", timeout=HOUR // 2, retries=RETRIES)
# prepare data (the synthetic sets), validate (great-expectations on the pair shards' columns).
DATA = Resources("1", "2", "2Gi", "8Gi", timeout=2 * HOUR, retries=RETRIES)
# convert: decodes and re-encodes every image with data.workers processes (configs/cluster.yaml: 8).
CONVERT = Resources("4", "8", "8Gi", "16Gi", timeout=12 * HOUR, retries=RETRIES)
# train: in cluster mode the step only creates and follows the job, hence the small request; the limits
# leave room for train_mode=local, where torchrun's CPU processes run in the step itself. One retry: a
# retried step adopts the still running job (no GPU time lost) or, after a Failed job, whose replicas
# the operator has already restarted (backoffLimit), starts one more from the last checkpoint; more
# retries would spend multi-node GPU hours on a failure that repeats.
LAUNCHER = Resources("500m", "4", "1Gi", "16Gi", timeout=TRAIN_TIMEOUT, retries=1)
# export, evaluate, the parity check, promote: the model on the inference GPUs (memory: a parameter).
INFERENCE_CPU = ("2", "8")
INFERENCE_TIMEOUT = 6 * HOUR
BACKOFF = dict(backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="1800s")


class Tasks:
    """Applies the pipeline's task settings (from its parameters `p`, as KFP channels) to each task.
    local=True (kfp.local, `cafe run`): no retries, since a failure there is the code's or the data's and
    should show at once; kfp.local ignores the rest (resources, timeouts, Secrets) with a warning."""

    def __init__(self, p: dict[str, Any], local: bool = False):
        self.p, self.local = p, local

    def _common(self, task, image, name: str, cache: bool, timeout: int, retries: int):
        task.set_container_image(image)
        task.set_display_name(name)
        task.set_caching_options(cache)
        # optional: without the Secret, boto3's default chain applies (IRSA / pod identity on the service account)
        kubernetes.use_secret_as_env(task, secret_name=self.p["s3_secret"], secret_key_to_env=S3_SECRET_KEYS,
                                     optional=True)
        kubernetes.set_timeout(task, timeout)
        if retries and not self.local:
            task.set_retry(retries, **BACKOFF)
        return task

    def cpu(self, task, name: str, resources: Resources, cache: bool = True):
        """A task on the base image; caching off where a rerun must really run (train, evaluate, gate, ...)."""
        task.set_cpu_request(resources.cpu_request).set_cpu_limit(resources.cpu_limit)
        task.set_memory_request(resources.memory_request).set_memory_limit(resources.memory_limit)
        return self._common(task, self.p["base_image"], name, cache, resources.timeout, resources.retries)

    def gpu(self, task, name: str, cache: bool = True):
        """A task that runs the model: the training image (CUDA torch), inference_gpus accelerators of type
        inference_accelerator (0: CPU), inference_memory as request and limit, the tolerations and node
        selector the training job gets too."""
        p = self.p
        task.set_accelerator_type(p["inference_accelerator"]).set_accelerator_limit(p["inference_gpus"])
        task.set_cpu_request(INFERENCE_CPU[0]).set_cpu_limit(INFERENCE_CPU[1])
        task.set_memory_request(p["inference_memory"]).set_memory_limit(p["inference_memory"])
        # kfp 2.17 does not count channels in resource settings as the task's inputs, so inside an If or a
        # ParallelFor the group would not pass them on ("input argument ... not found"): declare them.
        task.register_pipeline_channels([p["inference_accelerator"], p["inference_gpus"], p["inference_memory"]])
        kubernetes.add_toleration_json(task, p["tolerations"])
        kubernetes.add_node_selector_json(task, p["node_selector"])
        return self._common(task, p["train_image"], name, cache, INFERENCE_TIMEOUT, RETRIES)


def config_inputs(component, p: dict[str, Any], **constants: Any) -> dict[str, Any]:
    """The config-resolving task's inputs: every parameter that is one of its inputs, the KFP run's id."""
    from kfp import dsl

    names = set(component.component_spec.inputs)
    return {"kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, **{k: v for k, v in p.items() if k in names},
            **constants}


def pipeline_function(defaults: BaseModel, body: Callable[[dict[str, Any]], None], doc: str) -> Callable:
    """A function for KFP's @dsl.pipeline whose signature is the parameters of `defaults`' class, with
    `defaults`' values as defaults (names, types and defaults written once, in cafe_core.params), and whose
    docstring's Args are the fields' descriptions (the KFP UI shows them). `body` gets the parameters, as
    KFP channels, by name."""
    values = defaults.model_dump()
    signature = inspect.Signature([
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=values[name],
                          annotation=type(values[name]))
        for name in type(defaults).model_fields])

    def pipeline(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return body(dict(bound.arguments))

    pipeline.__signature__ = signature
    described = [f"    {name}: {' '.join(field.description.split())}"
                 for name, field in type(defaults).model_fields.items() if field.description]
    pipeline.__doc__ = f"{doc}\n\nArgs:\n" + "\n".join(described)
    return pipeline
