"""Finding the model files of a checkpoint setting (cafe_core/model/locate.py): a committed `cafe train`
output, a committed bare model, or a plain Hugging Face folder; verified copies; errors that name the fix."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cafe_core.commit import MANIFEST, OutputWriter
from cafe_core.config import ModelConfig
from cafe_core.model.locate import CheckpointNotFound, locate, model_config_for, verified_copy
from cafe_core.storage import ChecksumError, Storage

CONFIG = b'{"model_type": "llava_onevision"}'
WEIGHTS = b"\x00" * 64


def _train_output(root: Path) -> str:
    """What `cafe train` commits as final/: the HF folder under model/, beside metrics and a summary."""
    out = OutputWriter(Storage(), str(root / "final"), kind="trained-model")
    out.put_bytes("model/config.json", CONFIG)
    out.put_bytes("model/model.safetensors", WEIGHTS)
    out.put_bytes("metrics.jsonl", b'{"step": 1}\n')
    out.commit(meta={"steps": 1})
    return str(root / "final")


def test_train_output_points_at_its_model_folder(tmp_path):
    uri = _train_output(tmp_path)
    ref = locate(Storage(), uri + "/")
    assert ref.uri == uri and ref.model_uri == f"{uri}/model"
    assert ref.digest == hashlib.sha256(Path(uri, MANIFEST).read_bytes()).hexdigest()
    assert [(e.name, e.size) for e in ref.model_files()] == [("config.json", len(CONFIG)), ("model.safetensors", 64)]


def test_committed_bare_model(tmp_path):
    out = OutputWriter(Storage(), str(tmp_path / "m"), kind="model")
    out.put_bytes("config.json", CONFIG)
    out.put_bytes("model.safetensors", WEIGHTS)
    out.commit()
    ref = locate(Storage(), str(tmp_path / "m"))
    assert ref.model_uri == ref.uri == str(tmp_path / "m") and ref.digest is not None
    assert [e.name for e in ref.model_files()] == ["config.json", "model.safetensors"]


def test_plain_hugging_face_folder(tmp_path):
    (tmp_path / "config.json").write_bytes(CONFIG)
    (tmp_path / "model.safetensors").write_bytes(WEIGHTS)
    ref = locate(Storage(), str(tmp_path))
    assert (ref.uri, ref.model_uri, ref.manifest, ref.digest) == (str(tmp_path), str(tmp_path), None, None)
    assert ref.model_files() == []
    with pytest.raises(ChecksumError, match="has no manifest: only a committed output can be verified"):
        with verified_copy(Storage(), ref):
            pass


def test_digest_changes_with_the_files(tmp_path):
    first = locate(Storage(), _train_output(tmp_path / "a")).digest
    out = OutputWriter(Storage(), str(tmp_path / "a" / "final"), kind="trained-model")
    out.put_bytes("model/config.json", CONFIG)
    out.put_bytes("model/model.safetensors", b"\x01" * 64)
    out.commit(meta={"steps": 1})
    assert locate(Storage(), str(tmp_path / "a" / "final")).digest != first


def test_nothing_there_names_both_layouts_and_the_fix(tmp_path):
    with pytest.raises(CheckpointNotFound) as e:
        locate(Storage(), str(tmp_path / "missing"))
    assert str(e.value) == (
        f"no model at {tmp_path}/missing: expected a `cafe train` output (with {MANIFEST} and model/) or a Hugging "
        "Face folder (config.json + safetensors); check the checkpoint setting or run `cafe train` first"
    )


def test_committed_output_without_a_model(tmp_path):
    out = OutputWriter(Storage(), str(tmp_path / "convert"), kind="pairs")
    out.put_bytes("pairs/part-00000.parquet", b"x")
    out.commit()
    with pytest.raises(CheckpointNotFound, match=r"convert is a committed output without a model \(no config.json or model/config.json\)"):
        locate(Storage(), str(tmp_path / "convert"))


def test_uncommitted_train_output_is_not_a_model(tmp_path):
    """A killed run's final/ without its manifest: the model files are there, but nothing vouches for them."""
    (tmp_path / "final" / "model").mkdir(parents=True)
    (tmp_path / "final" / "model" / "config.json").write_bytes(CONFIG)
    with pytest.raises(CheckpointNotFound, match="no model at"):
        locate(Storage(), str(tmp_path / "final"))


def test_verified_copy_holds_exactly_the_listed_model_files(tmp_path):
    ref = locate(Storage(), _train_output(tmp_path))
    with verified_copy(Storage(), ref) as folder:
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        assert (folder / "model.safetensors").read_bytes() == WEIGHTS
        kept = folder
    assert not kept.exists()  # a temporary copy, never a cache


def test_verified_copy_refuses_changed_weights(tmp_path):
    ref = locate(Storage(), _train_output(tmp_path))
    (tmp_path / "final" / "model" / "model.safetensors").write_bytes(b"\x01" * 64)
    with pytest.raises(ChecksumError, match=r"model/model.safetensors: sha256 differs from the manifest of .*final"):
        with verified_copy(Storage(), ref):
            pass


def test_model_config_for(tmp_path):
    ref = locate(Storage(), _train_output(tmp_path))
    base = ModelConfig(dtype="bfloat16", attn_implementation="eager")
    cfg = model_config_for(ref, base)
    assert (cfg.preset, cfg.checkpoint, cfg.dtype, cfg.attn_implementation) == (None, ref.model_uri, "bfloat16", "eager")
    assert model_config_for(ref, base, tmp_path / "copy").checkpoint == str(tmp_path / "copy")
    assert base.preset == "tiny"  # the base is left as it was
