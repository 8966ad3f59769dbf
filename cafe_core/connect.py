"""Decide where S3 is for a command: a configured endpoint, boto3's own settings, or the embedded server."""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

import boto3

from cafe_core.config import S3Config
from cafe_core.s3server import LOCAL_CREDENTIALS, EmbeddedS3
from cafe_core.storage import Storage, StorageError
from cafe_core.uris import is_s3


def configured_endpoint(s3: S3Config) -> str | None:
    """An endpoint set in the cafe config, the environment, or the active AWS profile."""
    if s3.endpoint_url:
        return s3.endpoint_url
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        scoped = boto3.session.Session()._session.get_scoped_config()  # the profile's own settings
    except Exception:  # an unknown AWS_PROFILE is reported by boto3 itself at first use
        return None
    return (scoped.get("s3") or {}).get("endpoint_url") or scoped.get("endpoint_url")


IN_CLUSTER_ENV = "CAFE_IN_CLUSTER"  # set in the training job's pods (cafe_core.cluster.pytorchjob)


def in_cluster() -> bool:
    """In one of the pipeline's pods: a KFP step (the KFP v2 backend sets KFP_POD_NAME in every step; kfp.local
    does not) or a replica of the training job. Not merely any pod: a CI runner may be one."""
    return bool(os.environ.get("KFP_POD_NAME") or os.environ.get(IN_CLUSTER_ENV))


def wants_embedded(s3: S3Config) -> bool:
    """`auto` starts the embedded server when no endpoint is configured anywhere, but never in the cluster: there
    the run's data would live on a pod's disk and vanish with it; the pods use boto3's settings."""
    if s3.embedded == "always":
        return True
    return s3.embedded == "auto" and not in_cluster() and configured_endpoint(s3) is None


def check_pod_credentials(s3: S3Config) -> None:
    """In the cluster without static keys, boto3's default chain must find credentials (web identity / IRSA, pod
    identity, an instance role); fail now, with the ways to give some, rather than at the first request."""
    if boto3.session.Session().get_credentials() is None:
        where = configured_endpoint(s3) or "AWS S3 (no endpoint configured)"
        raise StorageError(
            f"S3 at {where}: this pod has no credentials: no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (create the "
            "cafe-s3 Secret from manifests/base/s3-secret.template.yaml in this namespace), no web identity "
            "(AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE: IRSA on the pipeline's service account), no pod "
            "identity or instance role. A non-AWS S3 (MinIO, Ceph) also needs AWS_ENDPOINT_URL in that Secret")


@contextlib.contextmanager
def connect(s3: S3Config, uris: Iterable[str]) -> Iterator[Storage]:
    """A Storage for the given URIs; starts (or reuses) the embedded server for the block when needed."""
    if not any(is_s3(u) for u in uris) or not wants_embedded(s3):
        if in_cluster() and any(is_s3(u) for u in uris):
            check_pod_credentials(s3)
        yield Storage.from_config(s3)
        return
    server = EmbeddedS3(s3.embedded_dir)
    with server as endpoint:
        yield Storage.from_config(s3, endpoint_url=endpoint, credentials=LOCAL_CREDENTIALS)
