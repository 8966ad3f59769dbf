"""Shared fixtures. The real SeaweedFS server is started once per session and stopped (SIGKILL) after."""

from __future__ import annotations

import io
import os
import subprocess
import uuid

import pytest
from PIL import Image

from cafe_core.s3server import LOCAL_CREDENTIALS, EmbeddedS3
from cafe_core.storage import Storage


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    server = EmbeddedS3(tmp_path_factory.mktemp("seaweed"))
    endpoint = server.start()
    pid = server._proc.pid
    yield endpoint
    server.stop()
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0, "SeaweedFS still running"


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    """Point boto3's standard settings at the test server, as a user would for MinIO or AWS."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", LOCAL_CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LOCAL_CREDENTIALS["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return seaweed


@pytest.fixture
def s3_store(s3_env) -> Storage:
    return Storage(multipart_threshold_mb=5, multipart_chunk_mb=5)


@pytest.fixture
def bucket() -> str:
    return f"s3://test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store() -> Storage:
    return Storage()


def png_bytes(size=(16, 16), color=(200, 30, 30), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _no_stray_aws_env(monkeypatch):
    """Tests never see the developer's own endpoint or credentials."""
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
