"""Training through the real entry point: torchrun with 2 CPU processes, DeepSpeed, checkpoints, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cafe_core.config import load_config
from cafe_core.data.convert import convert
from cafe_core.data.synth import generate
from cafe_core.model.build import build
from cafe_core.storage import Storage, read_manifest, verify_output

pytestmark = pytest.mark.slow
CAFE = [sys.executable, "-m", "cafe_core.cli"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A small synthetic dataset, converted once for the module (local storage)."""
    root = tmp_path_factory.mktemp("train")
    cfg = load_config("configs/local.yaml", [f"root={root}", "run_id=data", "synth.train_size=120", "synth.bad_fraction=0",
                                             "synth.retrieval_images=8", "synth.pope_images=2", "synth.mmeb_rows_per_dataset=2",
                                             "synth.mc_questions=4", "synth.caption_images=2", "data.workers=0"])
    generate(cfg.synth, Storage())
    convert(cfg.data, Storage(), cfg.to_yaml(), progress=False)
    return root


def args(root: Path, out: str, *extra: str) -> list[str]:
    return [
        "--config", "configs/local.yaml", f"root={root}", "run_id=data", f"train.output={root}/{out}",
        "train.global_batch_size=8", "train.max_steps=6", "train.log_every=1", "train.eval_every=3",
        "train.heldout_size=8", "train.checkpoint_every=2", "train.max_length=256", *extra,
    ]


def cafe(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CAFE, *argv], capture_output=True, text=True, timeout=timeout)


def losses(root: Path, out: str) -> list[tuple[int, float, float, float]]:
    lines = (root / out / "final" / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"], m["loss_lm"], m["loss_con"]) for m in map(json.loads, lines)]


def test_two_process_training_writes_a_loadable_model(data_root):
    out = cafe("train", *args(data_root, "run2", "train.nproc_per_node=2", "train.zero_stage=2"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 processes under torchrun" in out.stdout and out.stdout.count("train: held-out") == 1  # rank 0 only
    final = str(data_root / "run2" / "final")
    manifest = verify_output(Storage(), final)
    assert manifest.meta["steps"] == 6
    metrics = [json.loads(line) for line in (data_root / "run2/final/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "loss_lm", "loss_con", "lr", "lr/vision", "lr/projector", "lr/llm", "samples_per_s", "tokens_per_s"):
        assert key in metrics[-1], key
    assert metrics[2]["heldout/chance"] == pytest.approx(1 / 8) and 0 <= metrics[2]["heldout/i2t_top1"] <= 1
    assert (data_root / "run2/final/loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (data_root / "run2/final/model/README.md").read_text()
    assert "heldout/i2t_top1" in card
    # The saved folder is a complete HF model that the builder loads.
    cfg = load_config("configs/local.yaml", ["model.preset=null", f"model.checkpoint={final}/model"])
    model, processor = build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0 and processor.tokenizer is not None
    # Checkpoints: committed, latest points at the last one, older ones pruned to keep_checkpoints (2).
    ckpts = data_root / "run2/checkpoints"
    latest = json.loads((ckpts / "latest.json").read_text())
    assert latest == {"step": 4, "tag": "step-00000004"}
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step-00000002", "step-00000004"]
    assert read_manifest(Storage(), str(ckpts / "step-00000004")).meta["world_size"] == 2
    assert any(p.name.startswith("zero_pp_rank_1") for p in (ckpts / "step-00000004").iterdir())


def _kill_after_checkpoint(argv: list[str], step: int) -> None:
    """Start a run and SIGKILL its whole process tree once the checkpoint of `step` is committed."""
    proc = subprocess.Popen([*CAFE, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        if f"checkpoint step {step}:" in line or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_killed_run_resumes_to_the_same_losses(data_root, zero_stage):
    common = ["train.nproc_per_node=2", f"train.zero_stage={zero_stage}", "train.heldout=null"]
    straight = cafe("train", *args(data_root, f"straight{zero_stage}", *common))
    assert straight.returncode == 0, straight.stderr[-3000:]
    _kill_after_checkpoint(["train", *args(data_root, f"killed{zero_stage}", *common)], step=2)
    ckpts = data_root / f"killed{zero_stage}" / "checkpoints"
    assert not (data_root / f"killed{zero_stage}" / "final").exists()
    assert json.loads((ckpts / "latest.json").read_text())["step"] >= 2
    # The restart also builds its batches in the loop instead of ahead (prefetch): same batches, same losses.
    resumed = cafe("train", *args(data_root, f"killed{zero_stage}", *common, "train.prefetch_batches=0"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = losses(data_root, f"straight{zero_stage}"), losses(data_root, f"killed{zero_stage}")
    assert [s for s, *_ in b] == [1, 2, 3, 4, 5, 6]
    for (step, *x), (_, *y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-7), f"step {step}: {x} != {y}"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.global_batch_size=6", "train.grad_accum=4"], "not divisible by world size 2 x train.grad_accum 4"),
        (["train.precision=bf16"], "train.precision=bf16 needs a GPU"),
        (["train.resume=/nonexistent/step-00000002"], "missing or was never committed"),
        (["train.loss.a_lm=0", "train.loss.a_con=0"], "nothing to train"),
        (["train.data=s3://cafe/x", "s3.embedded=never", "s3.endpoint_url=http://127.0.0.1:9"], "unreachable"),
        (["train.parts.vision=false", "train.parts.projector=false", "train.parts.llm=false"], "nothing to train"),
        (["train.max_length=64", "train.nproc_per_node=1"], "the largest image takes"),
    ],
)
def test_clear_errors_before_any_work(data_root, extra, message, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    started = time.monotonic()
    out = cafe("train", *args(data_root, "errors", *extra), timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert message in out.stderr
    assert not (data_root / "errors" / "checkpoints").exists()
    assert time.monotonic() - started < 60


def test_incompatible_checkpoint_is_refused(data_root):
    out = cafe("train", *args(data_root, "compat", "train.max_steps=2", "train.checkpoint_every=1", "train.heldout=null"))
    assert out.returncode == 0, out.stderr[-2000:]
    again = cafe("train", *args(data_root, "compat", "train.max_steps=4", "train.zero_stage=3", "train.heldout=null"))
    assert again.returncode == 2 and "zero_stage: checkpoint has 2, this run has 3" in again.stderr


@pytest.mark.parametrize("extra", [["train.loss.mode=interleaved"], ["train.loss.a_lm=0"], ["train.loss.a_con=0"]])
def test_loss_modes_train_on_one_process(data_root, extra):
    """MMEB-style interleaved inputs, contrastive-only and LM-only runs all train and log their parts."""
    name = "mode-" + extra[0].split("=")[0].rsplit(".", 1)[1]
    out = cafe("train", *args(data_root, name, "train.nproc_per_node=1", "train.max_steps=2", *extra))
    assert out.returncode == 0, out.stderr[-3000:]
    last = json.loads((data_root / name / "final" / "metrics.jsonl").read_text().splitlines()[-1])
    assert ("loss_lm" in last) == ("a_lm=0" not in extra[0]) and ("loss_con" in last) == ("a_con=0" not in extra[0])
    assert "heldout/i2t_top1" in last


def test_mfu_peaks_by_device_name():
    from cafe_core.train.trainer import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert peak_tflops("cpu") is None
