"""Start a stage (training, export) under torchrun on this machine (c10d rendezvous on loopback).

The parent resolves the config once (run id included) and hands the children the resolved YAML, so every
rank trains the same run. S3 settings reach the children through boto3's standard environment variables.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cafe_core.config import CafeConfig
from cafe_core.ports import free_port
from cafe_core.storage import Storage


def in_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ



def child_env(store: Storage) -> dict[str, str]:
    env = dict(os.environ)
    if store.endpoint_url:
        env["AWS_ENDPOINT_URL"] = store.endpoint_url
    for key, var in (("aws_access_key_id", "AWS_ACCESS_KEY_ID"), ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY")):
        if key in store.credentials:  # the embedded server's placeholder keys, never real ones
            env[var] = store.credentials[key]
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".cafe/torch_extensions").resolve()))
    return env


def torchrun(cfg: CafeConfig, store: Storage, module_args: list[str], nproc: int | None = None) -> int:
    """Run `python -m cafe_core.cli <module_args> --config <resolved>` on `nproc` local processes (default
    train.nproc_per_node)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="cafe-resolved-", delete=False) as f:
        f.write(cfg.to_yaml())
        resolved = f.name
    try:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
            f"--nproc_per_node={nproc or cfg.train.nproc_per_node}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{free_port()}", "-m", "cafe_core.cli", *module_args, "--config", resolved,
        ]
        return subprocess.run(cmd, env=child_env(store)).returncode
    finally:
        os.unlink(resolved)
