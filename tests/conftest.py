"""Shared fixtures. The real SeaweedFS server is started once per session and stopped (SIGKILL) after."""

from __future__ import annotations

import io
import os
import subprocess
import uuid
from pathlib import Path

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


# --- training through `cafe train` -------------------------------------------------------------------

# Override lists for runs of every stage on small synthetic sets (the pipelines through kfp.local).
SMALL_RUN = [  # one run of the cafe pipeline: broken rows to reject, held-out pairs, checkpoints
    "synth.train_size=300", "synth.train_shard_rows=120", "synth.retrieval_images=10", "synth.pope_images=5",
    "synth.mmeb_rows_per_dataset=4", "synth.mc_questions=8", "synth.caption_images=5", "synth.bad_fraction=0.03",
    "validate.min_rows=100", "train.max_steps=3", "train.heldout_size=16", "train.eval_every=3",
    "train.checkpoint_every=2", "train.max_length=256",
    "train.nproc_per_node=1",  # torchrun inside the pipeline: the default run (test_gate_integration)
]
SMALL_ABLATION = [  # the ablation: two short trainings on the smallest sets that give every metric
    "synth.train_size=120", "synth.bad_fraction=0", "synth.retrieval_images=6", "synth.pope_images=2",
    "synth.mmeb_rows_per_dataset=2", "synth.mc_questions=4", "synth.caption_images=2", "validate.min_rows=50",
    "train.heldout=null", "train.max_length=256", "train.checkpoint_every=50", "train.nproc_per_node=1",
]

REPO = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = str(REPO / "configs" / "local.yaml")
TRAIN_DATA_RUN = "data"


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """A root holding a small converted dataset (120 synthetic pairs, no bad rows) in a local folder, made
    once per session (~2 s): train.data = {root}/runs/data/convert."""
    from cafe_core.config import load_config
    from cafe_core.data.convert import convert
    from cafe_core.data.synth import generate

    root = tmp_path_factory.mktemp("train-data")
    cfg = load_config(LOCAL_CONFIG, [
        f"root={root}", f"run_id={TRAIN_DATA_RUN}", "synth.train_size=120", "synth.bad_fraction=0",
        "synth.retrieval_images=8", "synth.pope_images=2", "synth.mmeb_rows_per_dataset=2", "synth.mc_questions=4",
        "synth.caption_images=2", "data.workers=0",
    ])
    generate(cfg.synth, Storage())
    convert(cfg.data, Storage(), cfg.to_yaml(), progress=False)
    return root


def train_args(root: Path, output: Path | str, *extra: str) -> list[str]:
    """`cafe train` arguments for a tiny run on `train_data`: 6 steps of 8 pairs, a log line every step. The
    process count is local.yaml's (2) unless an override sets train.nproc_per_node. The model is the tiny
    preset's random init, not local.yaml's pretrained base: the training loop's golden values must not move
    when the base is rebuilt (`make base`)."""
    return [
        "--config", LOCAL_CONFIG, f"root={root}", f"run_id={TRAIN_DATA_RUN}", f"train.output={output}",
        "model.preset=tiny", "model.checkpoint=null",
        "train.global_batch_size=8", "train.max_steps=6", "train.log_every=1", "train.eval_every=3",
        "train.heldout_size=8", "train.checkpoint_every=2", "train.max_length=256", *extra,
    ]


# What a single in-process run leaves behind and the next one must not see.
_PROCESS_GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _reset_distributed() -> None:
    """Trainer.cleanup() destroys the process group, but DeepSpeed keeps its clone of the world group in a
    module global, and a second engine in the same process then fails ('Group ... is not registered')."""
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        groups._WORLD_GROUP = None
        groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None


@pytest.fixture
def cafe_main(monkeypatch):
    """`cafe ...` in this process: cafe_core.cli.main(argv) -> exit status; read output with capsys.

    A single-process `cafe train` sets RANK/WORLD_SIZE/MASTER_* in os.environ for its world of one (which
    would make the next `cafe train` think it runs under torchrun); the environment and DeepSpeed's group
    globals are restored around every call."""
    from cafe_core.cli import main

    monkeypatch.chdir(REPO)
    for var in _PROCESS_GROUP_ENV:
        monkeypatch.delenv(var, raising=False)

    def run(*argv: str) -> int:
        saved = dict(os.environ)
        _reset_distributed()
        try:
            return main(list(argv))
        finally:
            _reset_distributed()
            os.environ.clear()
            os.environ.update(saved)

    return run


# --- workers and order -----------------------------------------------------------------------------------

# `make test` runs one pytest-xdist worker per core: each worker's torch (and the processes it starts, which
# inherit the variable) then uses one thread instead of every core, which would only oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The longest tests start first, so that they overlap the many short ones instead of running alone at the end.
_FIRST = ("tests/test_gate_integration.py", "tests/test_pipeline_local.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return _FIRST.index(path) if path in _FIRST else len(_FIRST) + (0 if item.get_closest_marker("slow") else 1)

    items.sort(key=rank)  # stable: the order within each rank is the collection's
