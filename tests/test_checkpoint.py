"""Checkpoints (cafe_core/train/checkpoint.py) in a local folder, with a stand-in for the DeepSpeed engine:
naming, the commit, the `latest` pointer, pruning to keep_checkpoints, resume resolution, RNG restore, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cafe_core.commit import MANIFEST, read_manifest, verify_output
from cafe_core.storage import Storage, StorageError
from cafe_core.train.checkpoint import (
    CLIENT,
    LATEST,
    STEP,
    CheckpointError,
    Checkpoints,
    json_lines,
    read_json_lines,
    rng_state,
    set_rng_state,
    tag_for,
)

STATES = "mp_rank_00_model_states.pt"


class FakeEngine:
    """What Checkpoints uses of a DeepSpeed engine: save_checkpoint(dir, tag, client_state) writes
    dir/tag/...; load_checkpoint(dir, tag) returns (path or None, client_state)."""

    def __init__(self, weight: float = 0.0):
        self.weight = torch.tensor([weight])
        self.saved_client: dict | None = None

    def save_checkpoint(self, save_dir, tag, client_state):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        torch.save({"weight": self.weight, "client": client_state}, folder / STATES)
        self.saved_client = client_state

    def load_checkpoint(self, load_dir, tag):
        path = Path(load_dir) / tag / STATES
        if not path.exists():
            return None, None
        state = torch.load(path)
        self.weight = state["weight"]
        return str(path), state["client"]


META = {"world_size": 1, "zero_stage": 2, "model_digest": "m"}


@pytest.fixture
def ckpts(tmp_path) -> Checkpoints:
    return Checkpoints(Storage(), str(tmp_path / "train" / "checkpoints"), keep=2)


def _save(ckpts: Checkpoints, step: int, weight: float = 0.0, metrics: list[dict] | None = None) -> str:
    files = {"metrics.jsonl": json_lines(metrics or [{"step": step}]), "config.yaml": b"seed: 0\n"}
    return ckpts.save(FakeEngine(weight), step, META, files)


def _step_folders(ckpts: Checkpoints) -> list[str]:
    """Step folders that still hold objects (a local delete leaves empty directories behind)."""
    return sorted({o.uri[len(ckpts.prefix) + 1 :].split("/")[0] for o in ckpts.store.list(ckpts.prefix)} - {LATEST})


def test_tags_sort_by_step():
    assert tag_for(0) == "step-00000000" and tag_for(50) == "step-00000050" and tag_for(12345678) == "step-12345678"
    assert sorted(tag_for(s) for s in (100, 9, 20)) == [tag_for(9), tag_for(20), tag_for(100)]


def test_save_commits_every_file_and_moves_latest(ckpts, tmp_path):
    uri = _save(ckpts, 2)
    folder = tmp_path / "train/checkpoints/step-00000002"
    assert uri == str(folder) == ckpts.uri("step-00000002")
    manifest = read_manifest(Storage(), uri)
    assert manifest.kind == "checkpoint"
    assert manifest.names() == ["config.yaml", "metrics.jsonl", STATES, "rng/rank-00000.pt"]
    assert manifest.meta == {**META, STEP: 2}
    verify_output(Storage(), uri)  # sizes and sha256 of every listed file
    assert (folder / "config.yaml").read_bytes() == b"seed: 0\n"
    assert json.loads((tmp_path / "train/checkpoints" / LATEST).read_text()) == {"step": 2, "tag": "step-00000002"}
    latest = ckpts.latest()
    assert (latest.step, latest.tag) == (2, "step-00000002")


def test_client_state_keeps_our_keys_apart(ckpts):
    engine = FakeEngine()
    ckpts.save(engine, 4, META, {})
    assert engine.saved_client == {CLIENT: {**META, STEP: 4}}


@pytest.mark.parametrize("keep, left", [(1, [6]), (2, [4, 6]), (3, [2, 4, 6]), (5, [2, 4, 6])])
def test_older_checkpoints_are_pruned_to_keep(tmp_path, keep, left):
    ckpts = Checkpoints(Storage(), str(tmp_path / "ck"), keep=keep)
    for step in (2, 4, 6):
        _save(ckpts, step)
    assert _step_folders(ckpts) == [tag_for(s) for s in left]
    assert ckpts.latest().step == 6
    for s in left:
        verify_output(Storage(), ckpts.uri(tag_for(s)))


def test_an_uncommitted_leftover_is_pruned_like_an_old_checkpoint(ckpts):
    """A folder a killed run left behind (no manifest) counts as an older step and goes."""
    stray = Path(ckpts.uri(tag_for(1)))
    (stray / "rng").mkdir(parents=True)
    (stray / "rng" / "rank-00001.pt").write_bytes(b"partial")
    _save(ckpts, 2)
    _save(ckpts, 4)
    assert _step_folders(ckpts) == [tag_for(2), tag_for(4)]


def test_resaving_a_step_replaces_its_files(ckpts):
    """A resumed run saves the step a killed run may have half-written: the new manifest wins, extra files go."""
    stray = Path(ckpts.uri(tag_for(2))) / "rng" / "rank-00001.pt"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"from a world of 2")
    _save(ckpts, 2)
    assert not stray.exists()
    verify_output(Storage(), ckpts.uri(tag_for(2)))


def test_resolve(ckpts, tmp_path):
    assert ckpts.latest() is None
    assert ckpts.resolve("latest") is None  # nothing saved yet: a fresh start
    _save(ckpts, 2)
    _save(ckpts, 4)
    assert ckpts.resolve("none") is None
    assert ckpts.resolve("latest") == (ckpts.uri(tag_for(4)), {**META, STEP: 4})
    explicit = ckpts.uri(tag_for(2)) + "/"
    assert ckpts.resolve(explicit) == (ckpts.uri(tag_for(2)), {**META, STEP: 2})


def test_resolving_an_uncommitted_checkpoint_names_the_fix(ckpts, tmp_path):
    with pytest.raises(CheckpointError) as e:
        ckpts.resolve(str(tmp_path / "nowhere" / "step-00000002"))
    assert str(e.value) == (f"checkpoint {tmp_path}/nowhere/step-00000002 is missing or was never committed; "
                            "use train.resume=none or another step")
    # `latest` pointing at a checkpoint whose manifest is gone is refused the same way, not started fresh.
    uri = _save(ckpts, 2)
    Path(uri, MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="missing or was never committed"):
        ckpts.resolve("latest")


def test_check_compatible(ckpts):
    ckpts.check_compatible({**META, STEP: 4}, META)  # extra keys in the checkpoint are fine
    with pytest.raises(CheckpointError) as e:
        ckpts.check_compatible({**META, STEP: 4}, {**META, "world_size": 2, "zero_stage": 3})
    assert str(e.value) == (
        "the checkpoint does not fit this run (world_size: checkpoint has 1, this run has 2; zero_stage: checkpoint "
        "has 2, this run has 3). Resume with the same model, world size and ZeRO stage, or start fresh with "
        "train.resume=none"
    )
    with pytest.raises(CheckpointError, match="model_digest: checkpoint has None, this run has 'm'"):
        ckpts.check_compatible({"world_size": 1, "zero_stage": 2}, META)


def test_load_restores_weights_step_metrics_and_rng(ckpts):
    metrics = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    uri = _save(ckpts, 2, weight=3.5, metrics=metrics)
    after_save = (random.random(), np.random.rand(), torch.rand(3))  # what an uninterrupted run draws next
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # a restarted process
    engine = FakeEngine()
    step, data = ckpts.load(engine, uri)
    assert step == 2 and float(engine.weight) == 3.5
    assert read_json_lines(data) == metrics
    assert random.random() == after_save[0] and np.random.rand() == after_save[1]
    assert torch.equal(torch.rand(3), after_save[2])


def test_load_refuses_a_changed_file(ckpts):
    uri = _save(ckpts, 2)
    config = Path(uri, "config.yaml")
    config.write_bytes(b"seed: 1\n")  # same size, other bytes
    with pytest.raises(CheckpointError, match=r"config.yaml does not match its manifest checksum"):
        ckpts.load(FakeEngine(), uri)
    config.write_bytes(b"a different size\n")
    with pytest.raises(StorageError, match=r"config.yaml: size 17 != 8 in manifest"):
        ckpts.load(FakeEngine(), uri)


def test_load_reports_an_engine_that_loads_nothing(ckpts):
    uri = _save(ckpts, 2)

    class Empty(FakeEngine):
        def load_checkpoint(self, load_dir, tag):
            return None, {}

    with pytest.raises(CheckpointError, match=f"DeepSpeed could not load {uri}"):
        ckpts.load(Empty(), uri)


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(2), expected[2])


def test_json_lines():
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "heldout/i2t_top1": 0.25}]
    data = json_lines(rows)
    assert data == b'{"step": 1, "loss": 0.5}\n{"step": 2, "heldout/i2t_top1": 0.25}\n'
    assert read_json_lines(data) == rows
    assert read_json_lines(data + b"\n  \n") == rows
    assert read_json_lines(None) == [] and read_json_lines(b"") == []
