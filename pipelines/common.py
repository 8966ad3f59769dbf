"""What every pipeline task gets: the image, S3 credentials from a Kubernetes Secret, caching policy."""

from __future__ import annotations

from kfp import kubernetes

from cafe_core.cluster.pytorchjob import S3_SECRET

S3_SECRET_KEYS = {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}


def prepare(task, image, name: str, cache: bool = True):
    """Image from the pipeline's parameter, S3 credentials from the Secret (never parameters), a readable
    name, and caching off where a rerun must really run (train, evaluate, gate, promote)."""
    task.set_container_image(image)
    task.set_display_name(name)
    task.set_caching_options(cache)
    # optional: without the Secret, boto3's default chain applies (IRSA / pod identity on the service account)
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS, optional=True)
    return task


def config_inputs(p: dict) -> dict:
    """The config-resolving task's inputs from the pipeline's parameters (cafe_core.params)."""
    from kfp import dsl

    keys = ("root", "run_id", "config", "data_uri", "model_preset", "model_checkpoint", "a_con", "temperature",
            "max_steps", "train_mode", "nodes", "gpus_per_node", "overrides")
    return {"kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, **{k: p[k] for k in keys}}
