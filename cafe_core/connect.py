"""Decide where S3 is for a command: a configured endpoint, boto3's own settings, or the embedded server."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterable, Iterator

import boto3
import botocore.exceptions

from cafe_core.config import S3Config
from cafe_core.s3server import LOCAL_CREDENTIALS, EmbeddedS3
from cafe_core.storage import CREDENTIAL_SOURCES, Storage, StorageError, aws_session
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


IN_CLUSTER_ENV = "CAFE_IN_CLUSTER"  # set in the training job's pods (cafe_core.cluster.spec)


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


# What botocore calls each source of its chain, in words for the log line.
_METHODS = {
    "env": "static keys from the environment",
    "assume-role-with-web-identity": "web identity (AWS_ROLE_ARN + AWS_WEB_IDENTITY_TOKEN_FILE)",
    "container-role": "container credentials (EKS pod identity / ECS)",
    "iam-role": "the instance role",
}


def check_pod_credentials(s3: S3Config) -> str:
    """In the cluster without static keys, boto3's default chain must find credentials (web identity / IRSA,
    EKS pod identity, an instance role) and be able to use them: they are resolved now (a web-identity token
    exchanged with STS in s3.region, the pod-identity agent asked), so that a missing or refused source fails
    here, naming the ways to give one, rather than at the first request. Returns where they came from."""
    where = configured_endpoint(s3) or "AWS S3 (no endpoint configured)"
    creds = None
    try:
        creds = aws_session(s3.region).get_credentials()
        frozen = creds.get_frozen_credentials() if creds is not None else None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as e:
        source = _METHODS.get(getattr(creds, "method", ""), "boto3's credential chain")
        raise StorageError(f"S3 at {where}: this pod's credentials ({source}) could not be resolved: "
                           f"{type(e).__name__}: {e}{_half_configured()}") from None
    if frozen is None or not frozen.access_key:
        raise StorageError(
            f"S3 at {where}: this pod has no credentials: none of {CREDENTIAL_SOURCES}; create the cafe-s3 Secret "
            "from manifests/base/s3-secret.template.yaml in this namespace, or give the pipeline's service account "
            f"a role. A non-AWS S3 (MinIO, Ceph) also needs AWS_ENDPOINT_URL in that Secret{_half_configured()}")
    return _METHODS.get(creds.method, creds.method)


def _half_configured() -> str:
    """A source with only part of its settings is skipped by boto3 without a word: say which."""
    env = {k: bool(os.environ.get(k)) for k in ("AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
                                                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                                                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")}
    if env["AWS_ROLE_ARN"] != env["AWS_WEB_IDENTITY_TOKEN_FILE"]:
        have, lack = "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"
        if not env[have]:
            have, lack = lack, have
        return f" ({have} is set but {lack} is not: check the service account's eks.amazonaws.com/role-arn annotation)"
    if env["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"] and not env["AWS_CONTAINER_CREDENTIALS_FULL_URI"]:
        return (" (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE is set but AWS_CONTAINER_CREDENTIALS_FULL_URI is not: "
                "is the EKS Pod Identity Agent add-on installed?)")
    return ""


@contextlib.contextmanager
def connect(s3: S3Config, uris: Iterable[str]) -> Iterator[Storage]:
    """A Storage for the given URIs; starts (or reuses) the embedded server for the block when needed."""
    if not any(is_s3(u) for u in uris) or not wants_embedded(s3):
        if in_cluster() and any(is_s3(u) for u in uris):
            print(f"S3 credentials: {check_pod_credentials(s3)}", file=sys.stderr, flush=True)
        yield Storage.from_config(s3)
        return
    server = EmbeddedS3(s3.embedded_dir)
    with server as endpoint:
        yield Storage.from_config(s3, endpoint_url=endpoint, credentials=LOCAL_CREDENTIALS)
