"""What every pipeline task gets: the image, S3 credentials from a Kubernetes Secret, caching policy."""

from __future__ import annotations

from kfp import kubernetes

S3_SECRET = "cafe-s3"  # manifests/base/s3-secret.template.yaml
S3_SECRET_KEYS = {k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")}
FAMILIES = ("retrieval", "mmeb", "pope", "caption", "mc", "gap")


def prepare(task, image, name: str, cache: bool = True):
    """Image from the pipeline's parameter, S3 credentials from the Secret (never parameters), a readable
    name, and caching off where a rerun must really run (train, evaluate, gate, promote)."""
    task.set_container_image(image)
    task.set_display_name(name)
    task.set_caching_options(cache)
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS)
    return task
