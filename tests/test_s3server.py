"""The embedded SeaweedFS: start, readiness, persistence, reuse, and a clean stop in every way it can end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cafe_core.config import S3Config
from cafe_core.connect import connect, wants_embedded
from cafe_core.s3server import LOCAL_CREDENTIALS, EmbeddedS3, s3_ready
from cafe_core.storage import Storage, StorageError

pytestmark = pytest.mark.s3
CAFE = [sys.executable, "-m", "cafe_core.cli"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def _wait_dead(pid: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_start_persist_reuse_stop(tmp_path):
    server = EmbeddedS3(tmp_path / "s3")
    with server as endpoint:
        assert endpoint.startswith("http://127.0.0.1:") and s3_ready(endpoint)
        pid = server._proc.pid
        store = Storage(endpoint_url=endpoint, credentials=LOCAL_CREDENTIALS, region="us-east-1")
        store.write_bytes("s3://keep/a.txt", b"persisted")
        # A second user of the same folder finds the running server and does not own it.
        other = EmbeddedS3(tmp_path / "s3")
        assert other.start() == endpoint and not other.owned
        other.stop()
        assert s3_ready(endpoint)
    assert _wait_dead(pid), "SeaweedFS survived stop()"
    assert not (tmp_path / "s3" / "server.json").exists()
    with EmbeddedS3(tmp_path / "s3") as endpoint2:  # data survives a restart
        store = Storage(endpoint_url=endpoint2, credentials=LOCAL_CREDENTIALS, region="us-east-1")
        assert store.read_bytes("s3://keep/a.txt") == b"persisted"


def _serve(tmp_path) -> tuple[subprocess.Popen, int, str]:
    proc = subprocess.Popen(
        [*CAFE, "s3", "serve", f"s3.embedded_dir={tmp_path / 's3'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("data folder:"):
            break
    text = "".join(lines)
    assert "S3 endpoint: http://127.0.0.1:" in text and "cafe artifacts ls" in text, text
    state = json.loads((tmp_path / "s3" / "server.json").read_text())
    return proc, state["pid"], state["endpoint"]


def test_cli_serve_stops_server_on_sigterm(tmp_path):
    proc, pid, endpoint = _serve(tmp_path)
    assert s3_ready(endpoint)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert _wait_dead(pid)


def test_killed_command_takes_its_server_down(tmp_path):
    proc, pid, _ = _serve(tmp_path)
    proc.kill()  # SIGKILL: no cleanup code runs in cafe
    proc.wait(timeout=10)
    assert _wait_dead(pid), "SeaweedFS outlived the command that started it"


def test_commands_start_embedded_s3_for_their_duration(tmp_path):
    out = subprocess.run(
        [*CAFE, "artifacts", "ls", "s3://cafe/nothing-here", f"s3.embedded_dir={tmp_path / 's3'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "nothing under s3://cafe/nothing-here" in out.stderr
    assert not (tmp_path / "s3" / "server.json").exists()
    logs = (tmp_path / "s3" / "logs").iterdir()
    assert any(p.name.startswith("weed") for p in logs)  # its logs stay in the project folder, not /tmp


def test_endpoint_settings_decide_embedded(monkeypatch):
    assert wants_embedded(S3Config())
    assert not wants_embedded(S3Config(embedded="never"))
    assert not wants_embedded(S3Config(endpoint_url="http://minio:9000"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    assert not wants_embedded(S3Config())
    assert wants_embedded(S3Config(embedded="always"))


def test_the_cluster_never_starts_an_embedded_server_and_needs_credentials(monkeypatch, tmp_path):
    """In a KFP step or a training pod `auto` means boto3's settings: an embedded server would keep the run's
    data on the pod's disk.
    Without static keys, boto3's chain must find credentials (IRSA, pod identity, instance role), or the
    command fails at once naming the ways to give some."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask for here
    monkeypatch.setenv("KFP_POD_NAME", "cafe-run-train-1")  # a KFP step
    cfg = S3Config(embedded_dir=str(tmp_path / "s3"))
    assert not wants_embedded(cfg) and wants_embedded(S3Config(embedded="always"))
    with pytest.raises(StorageError, match="this pod has no credentials.*cafe-s3 Secret.*IRSA"):
        with connect(cfg, ["s3://cafe/runs/r1"]):
            pass
    assert not (tmp_path / "s3").exists()  # no server was started
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")  # the Secret's keys (or any other source)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    with connect(cfg, ["s3://cafe/runs/r1"]) as store:
        assert store.endpoint_url is None


def test_local_uris_need_no_server(tmp_path):
    with connect(S3Config(embedded_dir=str(tmp_path / "s3")), [str(tmp_path / "x")]) as store:
        assert store.endpoint_url is None
    assert not (tmp_path / "s3").exists()
