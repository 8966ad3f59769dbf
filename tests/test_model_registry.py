"""The Kubeflow Model Registry: what a promotion registers (through the real `model-registry` client, against a
stand-in serving the REST endpoints it calls), and that a registry which does not take the version refuses
the promotion before the S3 champion alias moves."""

from __future__ import annotations

import json

import pytest

from cafe_core.config import KubeflowRegistryConfig
from cafe_core.model_registry import KubeflowRegistryError, VersionEntry, metadata_for, register
from cafe_core.registry import (
    PromoteError,
    claimed_versions,
    committed_versions,
    promote,
    read_aliases,
    registry_root,
    rollback,
    version_prefix,
)
from cafe_core.storage import Storage
from cafe_core.uris import join
from tests.fake_model_registry import BASE, FakeModelRegistry
from tests.test_gate import GOOD, gate_run

# The REST calls of one first registration, in order (the client's constructor lists one model first).
FIRST_REGISTRATION = [
    ("GET", f"{BASE}/registered_models"), ("GET", f"{BASE}/registered_model"), ("GET", f"{BASE}/registered_model"),
    ("POST", f"{BASE}/registered_models"), ("GET", f"{BASE}/model_version"), ("POST", f"{BASE}/model_versions"),
    ("POST", f"{BASE}/model_versions/2/artifacts"),
]


def props(obj: dict) -> dict:
    """A resource's customProperties as plain values."""
    out = {}
    for name, v in (obj.get("customProperties") or {}).items():
        out[name] = next(v[k] for k in ("string_value", "double_value", "int_value", "bool_value") if k in v)
    return out


@pytest.fixture
def kf():
    with FakeModelRegistry() as fake:
        yield fake


@pytest.fixture
def local(tmp_path) -> tuple[Storage, str]:
    return Storage(), str(tmp_path / "cafe")


def with_kubeflow(cfg, url: str, **kw):
    cfg.registry.kubeflow = KubeflowRegistryConfig(url=url, author="ci-bot", **kw)
    return cfg


def test_metadata_keeps_finite_metrics_and_provenance():
    meta = metadata_for(metrics={"a/R@1": 0.5, "b": 2, "nan": float("nan"), "inf": float("inf"), "flag": True,
                                 "text": "x"},
                        decision_uri="s3://r/v1/decision.json", gate_decision_uri="s3://g/decision.json",
                        checkpoint_digest="d" * 64, run_id="r1", code_version="git:1", gate_code_version="git:0",
                        config_digest="c0", s3_version="v1", source_model_uri="s3://runs/r1/train/final")
    assert meta == {
        "cafe.decision_uri": "s3://r/v1/decision.json", "cafe.gate_decision_uri": "s3://g/decision.json",
        "cafe.checkpoint_digest": "d" * 64, "cafe.source_model_uri": "s3://runs/r1/train/final", "cafe.run_id": "r1",
        "cafe.code_version": "git:1", "cafe.gate_code_version": "git:0", "cafe.config_digest": "c0",
        "cafe.s3_registry_version": "v1", "metric.a/R@1": 0.5, "metric.b": 2.0}


def test_promotion_registers_the_version(local, kf):
    store, root = local
    cfg, decision, uri = gate_run(store, root, "r1")
    with_kubeflow(cfg, kf.url, storage_key="cafe-s3-connection")
    r = promote(cfg, store, uri)
    assert r.champion == "v1" and f"Kubeflow Model Registry at {kf.url}: registered cafe-llava-onevision version v1" \
        in r.message
    assert kf.calls == FIRST_REGISTRATION and not kf.unexpected
    (model,) = kf.models.values()
    assert (model["name"], model["owner"]) == ("cafe-llava-onevision", "ci-bot")
    version = kf.version("cafe-llava-onevision", "v1")
    assert version["author"] == "ci-bot" and version["description"].startswith("cafe v1: run r1, gate PASS at ")
    prefix = version_prefix(registry_root(cfg), "v1")
    meta = props(version)
    assert {k: meta[k] for k in ("cafe.decision_uri", "cafe.gate_decision_uri", "cafe.checkpoint_digest",
                                 "cafe.run_id", "cafe.s3_registry_version", "cafe.source_model_uri")} == {
        "cafe.decision_uri": join(prefix, "decision.json"), "cafe.gate_decision_uri": uri,
        "cafe.checkpoint_digest": decision.checkpoint_digest, "cafe.run_id": "r1", "cafe.s3_registry_version": "v1",
        "cafe.source_model_uri": cfg.gate.checkpoint}
    assert meta["cafe.code_version"] and meta["cafe.gate_code_version"] == decision.code_version
    assert {k.removeprefix("metric."): v for k, v in meta.items() if k.startswith("metric.")} == GOOD
    (artifact,) = kf.artifacts_of(version["id"])
    assert artifact["artifactType"] == "model-artifact"
    assert artifact["uri"] == join(prefix, "checkpoint", "model")  # the Hugging Face folder of the S3 copy
    assert (artifact["modelFormatName"], artifact["modelFormatVersion"]) == ("safetensors", "1")
    assert artifact["storageKey"] == "cafe-s3-connection"
    # the registered URI is the S3 registry's own copy, byte-identical to what was gated
    assert store.read_bytes(join(artifact["uri"], "model.safetensors")) == store.read_bytes(
        join(cfg.gate.checkpoint, "model/model.safetensors"))


def test_registry_outage_refuses_before_the_champion_moves(local, kf):
    store, root = local
    cfg1, _, uri1 = gate_run(store, root, "r1")
    promote(with_kubeflow(cfg1, kf.url), store, uri1)
    cfg2, _, uri2 = gate_run(store, root, "r2", {**GOOD, "pope/random/f1": 0.72})
    with_kubeflow(cfg2, kf.url)
    reg = registry_root(cfg2)
    kf.down = True
    with pytest.raises(PromoteError, match=rf"Kubeflow Model Registry at {kf.url}: registering cafe-llava-onevision "
                                           r"v2 failed: .*nothing was promoted: the champion is still v1; promote "
                                           r"again .*\(v2 is committed in S3 and is reused\)"):
        promote(cfg2, store, uri2)
    aliases, _ = read_aliases(store, reg)
    assert (aliases.champion, aliases.previous, len(aliases.history)) == ("v1", None, 1)
    assert [v.version for v in committed_versions(store, reg)] == ["v1", "v2"]
    assert kf.version("cafe-llava-onevision", "v2") is None

    kf.down = False  # the registry is back: the same promotion reuses v2 and registers it
    r = promote(cfg2, store, uri2)
    assert (r.version, r.reused, r.champion, r.previous) == ("v2", True, "v2", "v1")
    assert claimed_versions(store, reg) == ["v1", "v2"] and kf.version("cafe-llava-onevision", "v2") is not None
    # rollback moves the S3 aliases only; both versions stay registered
    assert rollback(cfg2, store).champion == "v1" and len(kf.versions) == 2


def test_registering_again_is_a_noop_and_a_conflict_is_refused(kf):
    k = KubeflowRegistryConfig(url=kf.url)
    entry = VersionEntry("m", "v1", "s3://b/registry/m/versions/v1/checkpoint/model", "d",
                         {"cafe.checkpoint_digest": "a" * 64})
    assert "registered m version v1" in register(k, entry)
    assert "already registered" in register(k, entry)
    assert len(kf.versions) == 1 and len(kf.artifacts) == 1
    other = VersionEntry("m", "v1", "s3://other/registry/m/versions/v1/checkpoint/model", "d",
                         {"cafe.checkpoint_digest": "b" * 64})
    with pytest.raises(KubeflowRegistryError, match=r"already has m version v1 for other files .*use another "
                                                    r"registry.model_name"):
        register(k, other)


def test_token_from_the_named_variable(kf, monkeypatch):
    kf.token = "mr-token"
    k = KubeflowRegistryConfig(url=kf.url, token_env="CAFE_MR_TOKEN")
    entry = VersionEntry("m", "v1", "s3://b/m/v1", "d", {"cafe.checkpoint_digest": "a"})
    monkeypatch.delenv("CAFE_MR_TOKEN", raising=False)
    with pytest.raises(KubeflowRegistryError, match="names CAFE_MR_TOKEN, which is not set"):
        register(k, entry)
    monkeypatch.setenv("CAFE_MR_TOKEN", "wrong")
    with pytest.raises(KubeflowRegistryError, match="registering m v1 failed: .*401"):
        register(k, entry)
    monkeypatch.setenv("CAFE_MR_TOKEN", "mr-token")
    assert "registered m version v1" in register(k, entry)


def test_unreachable_registry_is_one_clear_error():
    from cafe_core.ports import free_port

    k = KubeflowRegistryConfig(url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(KubeflowRegistryError, match=r"Kubeflow Model Registry at http://127.0.0.1:\d+: registering "
                                                    r"m v1 failed: \w+"):
        register(k, VersionEntry("m", "v1", "s3://b/m/v1", "d", {}))


def test_registered_json_is_what_the_fake_received(kf):
    """The stand-in decodes exactly what the client sent: customProperties typed as the API defines them."""
    register(KubeflowRegistryConfig(url=kf.url), VersionEntry("m", "v1", "s3://b/m/v1", "d",
                                                              {"metric.x": 0.25, "cafe.run_id": "r1"}))
    (version,) = kf.versions.values()
    assert version["customProperties"] == {
        "metric.x": {"double_value": 0.25, "metadataType": "MetadataDoubleValue"},
        "cafe.run_id": {"string_value": "r1", "metadataType": "MetadataStringValue"}}
    assert json.loads(json.dumps(version)) == version  # plain JSON all through
