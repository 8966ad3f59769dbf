"""Promotion through the CI: the parity record (verify-release) that binds a measurement to one decision and its
files, the request to the CI (request-promotion), and `promote` accepting a matching record instead of
re-embedding (the CI runner has no GPU) and refusing a failed or mismatching one. Local folders; the
measurement itself on a real tiny model in the slow test at the end."""

from __future__ import annotations

import json

import pytest

from cafe_core import parity
from cafe_core.commit import OutputWriter
from cafe_core.config import CiConfig
from cafe_core.errors import BadInput, StageFailed
from cafe_core.gate import decide, write_decision
from cafe_core.parity import Measurement, ParityError, ParityItem
from cafe_core.registry import champion, champion_metrics
from cafe_core.stages.release import promote, request_promotion, verify_release
from cafe_core.storage import Storage
from cafe_core.uris import join
from tests.test_ci_trigger import FakeGitHub
from tests.test_gate import GOOD, SETS, make_cfg, make_model

GPU_MEASURE = Measurement([ParityItem(id="retrieval/shapes/image/0", deviation=2e-4),
                           ParityItem(id="retrieval/shapes/text/0", deviation=1e-4)],
                          2e-4, "e" * 64, "bfloat16", "cuda")


def gate_with_export(store: Storage, root: str, run_id: str, metrics: dict | None = None):
    """A candidate whose metrics.json names the export it was computed from (as `cafe evaluate` writes it),
    gated: (cfg with promote.decision set, decision URI)."""
    cfg = make_cfg(root, run_id)
    digest = make_model(store, cfg.gate.checkpoint, f"weights-{run_id}".encode())
    out = OutputWriter(store, cfg.gate.metrics, kind="evaluation")
    out.put_bytes("metrics.json", json.dumps({
        "run_id": run_id, "checkpoint": cfg.gate.checkpoint, "checkpoint_digest": digest,
        "created": "2026-11-22T10:00:00+00:00", "code_version": "git:test", "config_digest": "c0ffee",
        "embeddings": cfg.export.output, "metrics": GOOD if metrics is None else metrics, "sets": SETS}).encode())
    out.commit()
    uri = write_decision(store, cfg, decide(cfg, store, champion_metrics(cfg, store)))
    cfg.promote.decision = uri
    return cfg, uri


@pytest.fixture
def passed(tmp_path):
    store = Storage()
    cfg, uri = gate_with_export(store, str(tmp_path / "cafe"), "r1")
    return store, cfg, uri


def recorded(store, cfg, uri, m: Measurement = GPU_MEASURE) -> tuple[parity.ParityRecord, str]:
    """What verify-release commits after measuring `m` on a GPU."""
    record = parity.record_for(cfg, parity.gated(store, uri), m)
    return record, parity.write(store, record)


def no_reembedding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("re-embedded although a matching parity record exists")

    monkeypatch.setattr(parity, "measure", refuse)


# --- the record --------------------------------------------------------------------------------------


def test_record_binds_the_decision_and_every_file(passed):
    store, cfg, uri = passed
    record, record_uri = recorded(store, cfg, uri)
    assert record_uri == join(uri.rpartition("/")[0], "parity", "parity.json")
    g = parity.gated(store, uri)
    assert record.decision_sha256 == g.decision_sha256 and record.checkpoint_digest == g.manifest_sha256
    assert record.files == {e.name: e.sha256 for e in g.manifest.entries} and "model/model.safetensors" in record.files
    assert (record.export, record.sample, record.tolerance, record.passed) == (cfg.export.output, 16, 1e-3, True)
    assert parity.read(store, uri) == (record, record_uri)
    assert parity.accept(record, record_uri, g, cfg.promote) == (
        f"parity record {record_uri} accepted: 2 items re-embedded on cuda (bfloat16), max |cosine - 1| = 2.0e-04, "
        f"of these files (manifest {g.manifest_sha256[:12]})")


@pytest.mark.parametrize("change, says", [
    ({"decision_sha256": "0" * 64}, "is of another decision"),
    ({"checkpoint_digest": "0" * 64}, "measured other files"),
    ({"files": {"model/model.safetensors": "0" * 64}}, r"lists other file sha256s than .* \(config.yaml, "
                                                        r"model/config.json, model/model.safetensors\)"),
    ({"passed": False, "max_deviation": 0.2}, r"FAILED: .*max \|cosine - 1\| = 0.2 > 0.001.*gate this checkpoint"),
    ({"sample": 4}, r"re-embedded a sample of 4, this configuration asks for promote.reembed_sample=16"),
])
def test_a_record_of_anything_else_is_refused(passed, change, says):
    store, cfg, uri = passed
    record, record_uri = recorded(store, cfg, uri)
    with pytest.raises(ParityError, match=says) as err:
        parity.accept(record.model_copy(update=change), record_uri, parity.gated(store, uri), cfg.promote)
    if "FAILED" not in says:
        assert "run the verify step again" in str(err.value)


def test_a_stricter_tolerance_here_refuses_the_record(passed):
    store, cfg, uri = passed
    record, record_uri = recorded(store, cfg, uri)
    cfg.promote.reembed_tolerance = 1e-4
    with pytest.raises(ParityError, match=r"2.0e-04 is above this configuration's promote.reembed_tolerance=0.0001"):
        parity.accept(record, record_uri, parity.gated(store, uri), cfg.promote)


def test_no_record_torn_record_and_a_new_decision(passed):
    store, cfg, uri = passed
    assert parity.read(store, uri) is None
    record, record_uri = recorded(store, cfg, uri)
    store.write_bytes(record_uri, store.read_bytes(record_uri).replace(b'"passed": true', b'"passed": false'))
    with pytest.raises(ParityError, match="unreadable: its content differs from its manifest; run the verify step"):
        parity.read(store, uri)
    store.delete(join(parity.parity_prefix(uri), "_MANIFEST.json"))  # a measurement that did not finish
    assert parity.read(store, uri) is None
    recorded(store, cfg, uri)
    write_decision(store, cfg, decide(cfg, store, champion_metrics(cfg, store)))  # gate again at the same place
    assert parity.read(store, uri) is None and not store.list(parity.parity_prefix(uri))


def test_only_an_unchanged_pass_is_released(tmp_path):
    store = Storage()
    cfg, uri = gate_with_export(store, str(tmp_path / "cafe"), "r1", {**GOOD, "pope/random/f1": 0.1})
    with pytest.raises(StageFailed, match=r"^verify-release: .* is a FAIL decision \(1 of 5 checks failed"):
        verify_release(cfg, store)
    with pytest.raises(StageFailed, match=r"^request-promotion: .* is a FAIL decision"):
        request_promotion(cfg, store)
    cfg2, uri2 = gate_with_export(store, str(tmp_path / "cafe"), "r2")
    make_model(store, cfg2.gate.checkpoint, b"retrained after the gate")
    with pytest.raises(ParityError, match="changed since it was gated"):
        parity.gated(store, uri2)


def test_verify_release_records_a_failed_check_then_fails(passed, monkeypatch):
    store, cfg, uri = passed
    bad = Measurement([ParityItem(id="retrieval/shapes/image/0", deviation=0.3)], 0.3, "e" * 64, "bfloat16", "cuda")
    monkeypatch.setattr(parity, "measure", lambda *a: bad)
    with pytest.raises(StageFailed, match=r"^verify-release: the files of .* re-embed differently .*3.00e-01 > "
                                          r"0.001, record .*parity.json"):
        verify_release(cfg, store)
    record, _ = parity.read(store, uri)
    assert not record.passed and record.max_deviation == 0.3  # committed: promote refuses on it
    with pytest.raises(StageFailed, match=r"model check failed .*parity record .* FAILED"):
        promote(cfg, store)
    assert champion(cfg, store) is None


def test_verify_release_result(passed, monkeypatch):
    store, cfg, uri = passed
    monkeypatch.setattr(parity, "measure", lambda *a: GPU_MEASURE)
    result = verify_release(cfg, store)
    assert result.summary.splitlines()[0] == ("verify-release: re-embedded 2 items from the promoted files: max "
                                              "|cosine - 1| = 2.0e-04: passed")
    assert result.meta["passed"] and result.meta["items"] == 2 and result.metrics == {"parity_max_deviation": 2e-4}
    assert result.uri == parity.parity_prefix(uri) and result.meta["manifest_sha256"]


# --- promote on the CI: accept the record instead of re-embedding --------------------------------------


def test_promote_accepts_a_matching_record_without_reembedding(passed, monkeypatch, capsys):
    store, cfg, uri = passed
    _, record_uri = recorded(store, cfg, uri)
    no_reembedding(monkeypatch)
    result = promote(cfg, store)
    assert result.meta["champion"] == "v1" and champion(cfg, store).version == "v1"
    assert f"promote: parity record {record_uri} accepted: 2 items re-embedded on cuda" in capsys.readouterr().out


def test_promote_refuses_a_record_of_other_files(passed, monkeypatch):
    store, cfg, uri = passed
    record, _ = recorded(store, cfg, uri)
    parity.write(store, record.model_copy(update={"files": {**record.files, "model/model.safetensors": "0" * 64}}))
    no_reembedding(monkeypatch)
    with pytest.raises(StageFailed, match=r"^promote: model check failed .*lists other file sha256s .*run the verify "
                                          r"step again .* or delete .*/parity/ to re-embed .*nothing was promoted"):
        promote(cfg, store)
    assert champion(cfg, store) is None


def test_promote_without_a_record_reembeds_as_before(passed, monkeypatch, capsys):
    store, cfg, uri = passed
    answers = [GPU_MEASURE, Measurement([ParityItem(id="x", deviation=0.5)], 0.5, "e" * 64, "float32", "cpu")]
    calls = []

    def measure(cfg_, store_, model_uri, export_uri):
        calls.append((model_uri, export_uri))
        return answers[len(calls) - 1]

    monkeypatch.setattr(parity, "measure", measure)
    assert promote(cfg, store).meta["champion"] == "v1"  # measured here: within tolerance
    assert "promote: re-embedded 2 items from the promoted files: max |cosine - 1| = 2.0e-04" in capsys.readouterr().out
    cfg2, _ = gate_with_export(store, cfg.root, "r2")  # gated against v1
    with pytest.raises(StageFailed, match=r"model check failed .*max \|cosine - 1\| = 5.00e-01 > 0.001"):
        promote(cfg2, store)  # measured here: too far off
    assert calls == [(cfg.gate.checkpoint, cfg.export.output), (cfg2.gate.checkpoint, cfg2.export.output)]
    assert champion(cfg, store).version == "v1"


# --- request the promotion ---------------------------------------------------------------------------


def test_request_needs_a_parity_record(passed):
    store, cfg, uri = passed
    with pytest.raises(StageFailed, match=r"has no parity record .*: run the verify-release step first"):
        request_promotion(cfg, store)


def test_request_without_ci_prints_the_command(passed):
    store, cfg, uri = passed
    recorded(store, cfg, uri)
    result = request_promotion(cfg, store)
    assert f"\n  gh workflow run promote.yml -f decision_uri={uri}\n" in result.summary
    assert result.meta["requested"] is False and result.meta["command"].endswith(f"decision_uri={uri}")


def test_request_asks_the_ci(passed, monkeypatch):
    store, cfg, uri = passed
    recorded(store, cfg, uri)
    monkeypatch.setenv("CAFE_CI_TOKEN", "ghs_pipeline_token")
    with FakeGitHub() as gh:
        cfg.promote.ci = CiConfig(api_url=gh.url, repository="acme/cafe", config="configs/cluster.yaml")
        result = request_promotion(cfg, store)
    (req,) = gh.requests
    assert req["path"] == "/repos/acme/cafe/actions/workflows/promote.yml/dispatches"
    assert req["headers"]["authorization"] == "Bearer ghs_pipeline_token"
    assert req["body"] == {"ref": "main", "inputs": {"decision_uri": uri, "config": "configs/cluster.yaml"}}
    assert result.meta["requested"] is True and "ghs_pipeline_token" not in result.summary
    assert "asked acme/cafe to run promote.yml at main (config configs/cluster.yaml)" in result.summary


def test_request_refused_by_the_ci_is_bad_input(passed, monkeypatch):
    store, cfg, uri = passed
    recorded(store, cfg, uri)
    monkeypatch.setenv("CAFE_CI_TOKEN", "expired")
    with FakeGitHub([401]) as gh:
        cfg.promote.ci = CiConfig(api_url=gh.url, repository="acme/cafe")
        with pytest.raises(BadInput, match=r"^request-promotion: the CI token was refused \(401\)"):
            request_promotion(cfg, store)


# --- on a real (tiny) model --------------------------------------------------------------------------


@pytest.mark.slow
def test_verify_release_measures_the_real_model_and_promote_accepts_it(tmp_path, monkeypatch, capsys):
    import torch

    from cafe_core.config import load_config
    from cafe_core.data.synth import generate
    from cafe_core.evaluate.export import export
    from tests.test_export_evaluate import write_model
    from tests.test_gate import RULES

    store = Storage()
    cfg = load_config("configs/local.yaml", [
        f"root={tmp_path / 'cafe'}", "run_id=v1run", "synth.train_size=4", "synth.retrieval_images=6",
        "synth.pope_images=2", "synth.mmeb_rows_per_dataset=2", "synth.mc_questions=3", "synth.caption_images=2",
        "export.shard_size=16", "export.batch_size=8"])
    cfg.gate.rules, cfg.gate.rules_from = list(RULES), None
    generate(cfg.synth, store)
    write_model(store, cfg.gate.checkpoint, seed=0)
    export(cfg, store, progress=False)
    out = OutputWriter(store, cfg.gate.metrics, kind="evaluation")
    out.put_bytes("metrics.json", json.dumps({
        "run_id": cfg.run_id, "checkpoint": cfg.gate.checkpoint,
        "checkpoint_digest": parity.manifest_digest(store, cfg.gate.checkpoint), "created": "2026-11-22T10:00:00Z",
        "code_version": "git:test", "config_digest": "c0", "embeddings": cfg.export.output, "metrics": GOOD,
        "sets": SETS}).encode())
    out.commit()
    cfg.promote.decision = write_decision(store, cfg, decide(cfg, store, champion_metrics(cfg, store)))

    result = verify_release(cfg, store)
    record, record_uri = parity.read(store, cfg.promote.decision)
    assert record.passed and len(record.items) == 16 and result.meta["items"] == 16
    on_gpu = torch.cuda.is_available()  # the cluster's step has one; export's "auto" precision is bf16 there
    assert (record.device, record.precision) == (("cuda", "bfloat16") if on_gpu else ("cpu", "float32"))
    assert 0 <= record.max_deviation <= 1e-3 and record.max_deviation == max(i.deviation for i in record.items)
    assert len({i.id.split("/")[0] for i in record.items}) > 1  # spread over the families, not one set

    no_reembedding(monkeypatch)  # the CI runner: accept the record of these files
    assert promote(cfg, store).meta["champion"] == "v1"
    assert f"parity record {record_uri} accepted: 16 items re-embedded on {record.device}" in capsys.readouterr().out
