"""The registry: promote only what passed and was measured, roll back in one call, stay consistent when
promotions race (on the real S3 server)."""

from __future__ import annotations

import json
import threading

import pytest

from cafe_core.commit import MANIFEST, manifest_digest, read_manifest, verify_output
from cafe_core.gate import decide
from cafe_core.records import ChampionUnreadable
from cafe_core.registry import (
    Aliases,
    PromoteError,
    RegistryError,
    champion,
    champion_metrics,
    claimed_versions,
    committed_versions,
    promote,
    read_aliases,
    registry_root,
    rollback,
    version_prefix,
)
from cafe_core.storage import PreconditionFailed, Storage
from cafe_core.uris import join
from tests.test_gate import GOOD, gate_run, make_candidate, make_model


@pytest.fixture
def local(tmp_path) -> tuple[Storage, str]:
    return Storage(), str(tmp_path / "cafe")


def test_promote_pass_then_second_then_noop_then_rollback(local):
    store, root = local
    cfg, d1, uri1 = gate_run(store, root, "r1")
    r = promote(cfg, store, uri1)
    assert (r.version, r.champion, r.previous, r.noop, r.reused) == ("v1", "v1", None, False, False)
    reg = registry_root(cfg)
    # the version is a committed copy whose checkpoint has the candidate's digest
    verify_output(store, version_prefix(reg, "v1"))
    assert r.model_uri == join(version_prefix(reg, "v1"), "checkpoint")
    assert manifest_digest(store, r.model_uri) == d1.checkpoint_digest
    rec = json.loads(store.read_bytes(join(version_prefix(reg, "v1"), "version.json")))
    assert {k: rec[k] for k in ("version", "source_model_uri", "checkpoint_digest", "decision_uri", "run_id")} == {
        "version": "v1", "source_model_uri": cfg.gate.checkpoint, "checkpoint_digest": d1.checkpoint_digest,
        "decision_uri": uri1, "run_id": "r1"}
    assert rec["promoted"] and rec["code_version"]
    info = champion(cfg, store)
    assert info.version == "v1" and info.metrics == GOOD and info.checkpoint_digest == d1.checkpoint_digest

    # a second PASS, gated against v1, becomes champion; v1 becomes previous
    cfg2, d2, uri2 = gate_run(store, root, "r2", {**GOOD, "pope/random/f1": 0.72})
    assert d2.champion.version == "v1" and any(v.champion == 0.70 for v in d2.verdicts)
    r2 = promote(cfg2, store, uri2)
    assert (r2.version, r2.champion, r2.previous) == ("v2", "v2", "v1")

    # the same decision again: nothing moves
    again = promote(cfg2, store, uri2)
    assert again.noop and again.version == "v2" and "already is the champion" in again.message
    assert claimed_versions(store, reg) == ["v1", "v2"]

    rb = rollback(cfg, store)
    assert (rb.champion, rb.previous) == ("v1", "v2")
    aliases, _ = read_aliases(store, reg)
    assert [(h.action, h.from_, h.to) for h in aliases.history] == [
        ("promote", None, "v1"), ("promote", "v1", "v2"), ("rollback", "v2", "v1")]
    assert '"from": "v1"' in store.read_text(join(reg, "aliases.json"))  # written under the documented name

    # re-promoting r2 (gated against v1, the champion again) reuses v2 instead of copying a v3
    back = promote(cfg2, store, uri2)
    assert (back.version, back.reused, back.noop, back.previous) == ("v2", True, False, "v1")
    assert claimed_versions(store, reg) == ["v1", "v2"]


def test_gate_compares_with_the_champion(local):
    store, root = local
    cfg, _, uri = gate_run(store, root, "r1")
    promote(cfg, store, uri)
    _, d, _ = gate_run(store, root, "r2", {**GOOD, "pope/random/f1": 0.60})  # above min 0.5, 0.10 below v1
    assert d.decision == "FAIL" and d.champion.version == "v1"
    (bad,) = [v for v in d.verdicts if not v.passed]
    assert (bad.metric, bad.champion, round(bad.delta, 6)) == ("pope/random/f1", 0.70, -0.1)
    assert bad.reason == "drop +0.1 vs champion 0.7 > max_drop 0.05"  # only what failed is the reason


def test_fail_decision_is_refused(local):
    store, root = local
    cfg, d, uri = gate_run(store, root, "r1", {**GOOD, "pope/random/f1": 0.1})
    assert d.decision == "FAIL"
    with pytest.raises(PromoteError, match=r"is a FAIL decision \(1 of 5 checks failed: pope/random/f1\)"):
        promote(cfg, store, uri)
    assert read_aliases(store, registry_root(cfg))[0] == Aliases() and claimed_versions(store, registry_root(cfg)) == []


def test_not_a_decision_record_is_refused(local):
    store, root = local
    cfg = make_candidate(store, root, "r1")
    with pytest.raises(PromoteError, match="is not a decision record"):
        promote(cfg, store, join(cfg.gate.metrics, "metrics.json"))
    with pytest.raises(PromoteError, match="unreadable: .*not a committed output"):
        promote(cfg, store, join(root, "nowhere", "decision.json"))


def test_tampered_model_is_refused(local):
    store, root = local
    cfg, _, uri = gate_run(store, root, "r1")
    weights = join(cfg.gate.checkpoint, "model/model.safetensors")
    data = bytearray(store.read_bytes(weights))
    data[0] ^= 1  # same size, one bit flipped
    store.write_bytes(weights, bytes(data))
    with pytest.raises(PromoteError, match="model/model.safetensors: sha256 differs"):
        promote(cfg, store, uri)
    assert claimed_versions(store, registry_root(cfg)) == []


def test_retrained_model_is_refused(local):
    store, root = local
    cfg, _, uri = gate_run(store, root, "r1")
    make_model(store, cfg.gate.checkpoint, b"retrained after the gate")
    with pytest.raises(PromoteError, match="changed since it was gated"):
        promote(cfg, store, uri)


def test_rollback_without_previous(local):
    store, root = local
    cfg, _, uri = gate_run(store, root, "r1")
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(cfg, store)  # nothing promoted at all
    promote(cfg, store, uri)
    with pytest.raises(RegistryError, match="no previous champion to roll back to"):
        rollback(cfg, store)
    assert champion(cfg, store).version == "v1"


def test_failed_model_check_moves_nothing(local):
    store, root = local
    cfg, _, uri = gate_run(store, root, "r1")
    seen = []

    def check(model_uri: str) -> None:
        seen.append(model_uri)
        raise ValueError("re-embedded sample differs: max |cos - 1| = 0.2")

    with pytest.raises(PromoteError, match="model check failed .* 0.2; nothing was promoted"):
        promote(cfg, store, uri, check_model=check)
    assert seen == [cfg.gate.checkpoint]
    assert champion(cfg, store) is None and claimed_versions(store, registry_root(cfg)) == []
    assert promote(cfg, store, uri, check_model=seen.append).version == "v1"


def test_champion_moved_since_gate_is_refused(local):
    store, root = local
    cfg1, _, uri1 = gate_run(store, root, "r1")
    cfg2, _, uri2 = gate_run(store, root, "r2")  # both gated against no champion
    promote(cfg1, store, uri1)
    with pytest.raises(PromoteError, match=r"champion moved .* \(gated against no champion, champion now v1\)"):
        promote(cfg2, store, uri2)
    assert promote(cfg2, store, uri2, allow_champion_moved=True).champion == "v2"


def test_crashed_promotion_leaves_no_visible_version(local, monkeypatch):
    store, root = local
    cfg, _, uri = gate_run(store, root, "r1")
    real_copy = Storage.copy
    calls = []

    def dying_copy(self, src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-copy")
        return real_copy(self, src, dst)

    monkeypatch.setattr(Storage, "copy", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        promote(cfg, store, uri)
    monkeypatch.setattr(Storage, "copy", real_copy)
    reg = registry_root(cfg)
    assert claimed_versions(store, reg) == ["v1"] and committed_versions(store, reg) == []
    assert champion(cfg, store) is None
    r = promote(cfg, store, uri)  # the retry claims a fresh id; v1 stays an invisible leftover
    assert r.version == "v2" and [v.version for v in committed_versions(store, reg)] == ["v2"]


def test_unreadable_champion_metrics(local):
    store, root = local
    cfg, _, uri = gate_run(store, root, "r1")
    promote(cfg, store, uri)
    metrics = join(version_prefix(registry_root(cfg), "v1"), "metrics.json")
    store.write_bytes(metrics, store.read_bytes(metrics).replace(b"0.7", b"0.9"))
    with pytest.raises(RegistryError, match="champion v1 .* metrics unreadable: .*sha256 differs"):
        champion(cfg, store)
    unreadable = champion_metrics(cfg, store)
    assert isinstance(unreadable, ChampionUnreadable) and "sha256 differs" in unreadable.error
    cfg2 = make_candidate(store, root, "r2")
    d = decide(cfg2, store, champion_metrics(cfg2, store))
    assert d.decision == "FAIL" and any(r.startswith("champion unreadable: champion v1 ") for r in d.reasons)


def test_lost_reply_does_not_move_aliases_twice(local, monkeypatch):
    """The aliases write lands but its reply is lost and the retry is refused: the rollback is applied once."""
    store, root = local
    for run in ("r1", "r2"):
        cfg, _, uri = gate_run(store, root, run)
        promote(cfg, store, uri)
    real = Storage.write_bytes_if
    lost = []

    def lossy(self, uri, data, **kw):
        etag = real(self, uri, data, **kw)
        if not lost:
            lost.append(uri)
            raise PreconditionFailed(f"{uri}: conditional write refused (reply lost, retried)")
        return etag

    monkeypatch.setattr(Storage, "write_bytes_if", lossy)
    rb = rollback(cfg, store)
    assert lost and (rb.champion, rb.previous) == ("v1", "v2")
    assert [h.action for h in read_aliases(store, registry_root(cfg))[0].history] == ["promote", "promote", "rollback"]


# --- on S3: the whole flow, and promotions racing ----------------------------------------------------


@pytest.mark.s3
def test_promote_and_rollback_on_s3(s3_store, bucket):
    cfg1, _, uri1 = gate_run(s3_store, bucket, "r1")
    assert promote(cfg1, s3_store, uri1).champion == "v1"
    cfg2, _, uri2 = gate_run(s3_store, bucket, "r2")
    assert promote(cfg2, s3_store, uri2).previous == "v1"
    assert rollback(cfg1, s3_store).champion == "v1"
    info = champion(cfg1, s3_store)
    assert info.model_uri.startswith(f"{bucket}/registry/") and read_manifest(s3_store, info.model_uri).entries


def _race(promotions) -> list:
    """Run the promotions at once (threads released together); returns each result or exception."""
    results: list = [None] * len(promotions)
    barrier = threading.Barrier(len(promotions))

    def run(i, fn):
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as e:  # noqa: BLE001 - collected for the assertions
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(promotions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _assert_consistent(store: Storage, cfg) -> Aliases:
    reg = registry_root(cfg)
    aliases = Aliases.model_validate_json(store.read_bytes(join(reg, "aliases.json")))
    committed = {r.version: r for r in committed_versions(store, reg)}
    assert aliases.champion in committed
    verify_output(store, version_prefix(reg, aliases.champion))
    claims = [json.loads(store.read_bytes(join(version_prefix(reg, v), "version.json")))["claim"]
              for v in claimed_versions(store, reg)]
    assert len(claims) == len(set(claims)), "two promotions shared a version id"
    assert all(store.exists(join(version_prefix(reg, v), MANIFEST)) for v in claimed_versions(store, reg))
    return aliases


@pytest.fixture(params=["s3", "local"])
def where(request, tmp_path) -> tuple[Storage, str]:
    if request.param == "local":
        return Storage(), str(tmp_path / "cafe")
    request.getfixturevalue("s3_env")
    return Storage(multipart_threshold_mb=5, multipart_chunk_mb=5), request.getfixturevalue("bucket")


def test_racing_promotions_leave_a_consistent_registry(where):
    store, root = where  # on S3 (conditional puts) and on a local folder (fcntl locks) alike
    cfg0, _, uri0 = gate_run(store, root, "r0")
    promote(cfg0, store, uri0)
    gated = [gate_run(store, root, f"r{i}") for i in (1, 2, 3)]  # all gated against v1

    # Each thread its own client, as separate processes would have.
    def one(cfg, uri, **kw):
        return lambda: promote(cfg, Storage(multipart_threshold_mb=5, multipart_chunk_mb=5), uri, **kw)

    results = _race([one(cfg, uri) for cfg, _, uri in gated])
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, Exception)]
    assert len(won) == 1 and all(isinstance(e, PromoteError) and "champion moved" in str(e) for e in lost), results
    aliases = _assert_consistent(store, cfg0)
    assert (aliases.champion, aliases.previous) == (won[0].version, "v1")

    # Allowed to move past each other: every promotion lands once, in some order, none lost.
    results = _race([one(cfg, uri, allow_champion_moved=True) for cfg, _, uri in gated])
    assert not [r for r in results if isinstance(r, Exception)], results
    aliases = _assert_consistent(store, cfg0)
    moves = [(h.from_, h.to) for h in aliases.history]
    assert len(moves) == 1 + 1 + sum(not r.noop for r in results)
    assert all(a[1] == b[0] for a, b in zip(moves, moves[1:])), f"a compare-and-swap lost an update: {moves}"
    assert aliases.champion == moves[-1][1] and aliases.previous == moves[-1][0]
    sources = [r.source_model_uri for r in committed_versions(store, registry_root(cfg0))]
    assert len(sources) == len(set(sources)), "a checkpoint was registered twice"
