"""Decide where S3 is for a command: a configured endpoint, boto3's own settings, or the embedded server."""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

import boto3

from cafe_core.config import S3Config
from cafe_core.s3server import LOCAL_CREDENTIALS, EmbeddedS3
from cafe_core.storage import Storage
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


def wants_embedded(s3: S3Config) -> bool:
    return s3.embedded == "always" or (s3.embedded == "auto" and configured_endpoint(s3) is None)


@contextlib.contextmanager
def connect(s3: S3Config, uris: Iterable[str]) -> Iterator[Storage]:
    """A Storage for the given URIs; starts (or reuses) the embedded server for the block when needed."""
    if not any(is_s3(u) for u in uris) or not wants_embedded(s3):
        yield Storage.from_config(s3)
        return
    server = EmbeddedS3(s3.embedded_dir)
    with server as endpoint:
        yield Storage.from_config(s3, endpoint_url=endpoint, credentials=LOCAL_CREDENTIALS)
