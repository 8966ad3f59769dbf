"""Release: the gate's decision; for a PASS, the parity check on a GPU (verify-release) and the request to the CI
(request-promotion), or the promotion itself; rollback to the previous champion."""

from __future__ import annotations

from cafe_core.config import CafeConfig
from cafe_core.parity import parity_prefix
from cafe_core.stages.base import Result, committed, stage
from cafe_core.storage import Storage


@stage("gate", lambda cfg: cfg.gate.output)
def gate(cfg: CafeConfig, store: Storage, dry_run: bool = False) -> Result:
    """Judge the run's metrics against the gate rules and the champion, fail closed. The record is committed
    (unless dry_run); a FAIL is the Result's failure, not an exception, so the pipeline can branch on it."""
    from cafe_core.gate import decide, write_decision
    from cafe_core.registry import champion_metrics

    decision = decide(cfg, store, champion_metrics(cfg, store))
    why = decision.summary()
    if dry_run:
        result = Result("gate", cfg.gate.output, f"{why}\ngate: --dry-run: nothing written")
    else:
        uri = write_decision(store, cfg, decision)
        result = committed(store, "gate", cfg.gate.output, f"{why}\ngate: decision record {uri}", decision_uri=uri)
    result.meta["decision"] = decision.decision
    result.documents["why.md"] = why
    if not decision.passed:
        result.failure = f"gate: FAIL ({'; '.join(decision.reasons[:2])})"
    return result


@stage("verify-release", lambda cfg: parity_prefix(cfg.promote.decision))
def verify_release(cfg: CafeConfig, store: Storage) -> Result:
    """Re-embed a sample of the evaluation items from the files a PASS decision judged and compare with the
    exported embeddings, on this machine's GPU; commit the parity record next to the decision, which a
    promotion on a machine without a GPU (the CI) accepts instead of re-embedding. A FAIL decision is refused; a
    failed check is recorded, then raised."""
    from cafe_core import parity

    g = parity.gated(store, cfg.promote.decision)
    measured = parity.measure(cfg, store, g.checkpoint, g.export)
    record = parity.record_for(cfg, g, measured)
    uri = parity.write(store, record)  # a failed check is recorded too: promote refuses on it
    if not record.passed:  # raised, not a Result's failure: no adapter can go on to request the promotion
        raise parity.ParityError(
            f"the files of {g.checkpoint} re-embed differently from the export (max |cosine - 1| = "
            f"{record.max_deviation:.2e} > {record.tolerance}, record {uri}): they are not the model that was "
            "evaluated; export, evaluate and gate again")
    result = committed(store, "verify-release", parity_prefix(cfg.promote.decision),
                       f"verify-release: {measured.line()}: passed\nverify-release: parity record {uri}",
                       parity_uri=uri, passed=True, max_deviation=record.max_deviation, items=len(record.items),
                       checkpoint_digest=record.checkpoint_digest)
    if record.max_deviation is not None:
        result.metrics["parity_max_deviation"] = record.max_deviation
    return result


@stage("request-promotion", lambda cfg: cfg.promote.decision)
def request_promotion(cfg: CafeConfig, store: Storage) -> Result:
    """Ask the CI to promote a verified PASS decision: start promote.ci's workflow (its approval and its
    registry credential then decide), or, without promote.ci, print the `gh workflow run` command."""
    from cafe_core import ci_trigger, parity

    decision_uri = cfg.promote.decision
    g = parity.gated(store, decision_uri)
    found = parity.read(store, decision_uri)
    if found is None:
        raise parity.ParityError(f"{decision_uri} has no parity record ({parity_prefix(decision_uri)}): run the "
                                 "verify-release step first (on a GPU), so that the CI need not re-embed")
    checked = parity.accept(*found, g, cfg.promote)
    ci = cfg.promote.ci
    meta = {"decision_uri": decision_uri, "parity_uri": found[1]}
    if ci is None:
        command = ci_trigger.gh_command(decision_uri)
        return Result("request-promotion", decision_uri, f"request-promotion: {checked}\nrequest-promotion: no "
                      f"promote.ci configured; request the promotion with:\n  {command}\n  (add -f config=<the "
                      "config file in the repository that names this registry> unless it is configs/local.yaml)",
                      {**meta, "requested": False, "command": command})
    sent = ci_trigger.dispatch(ci, decision_uri)
    where = sent.run_url or sent.url
    return Result("request-promotion", decision_uri, f"request-promotion: {checked}\nrequest-promotion: asked "
                  f"{ci.repository} to run {ci.workflow} at {ci.ref} (config {ci.config}); approve and follow it at "
                  f"{where}", {**meta, "requested": True, "workflow_url": where})


@stage("promote", lambda cfg: cfg.registry.uri)
def promote(cfg: CafeConfig, store: Storage) -> Result:
    """Make the model of the PASS decision at promote.decision the registry's champion. Its files' sha256 must
    match what was gated, and a sample re-embedded from a fresh download must match the export: measured here,
    or taken from the decision's parity record (verify-release) when that record is of these very files."""
    from cafe_core import parity
    from cafe_core.evaluate.export import ExportError
    from cafe_core.registry import promote as run

    decision_uri = cfg.promote.decision

    def check_model(model_uri: str) -> None:
        g = parity.gated(store, decision_uri)
        found = parity.read(store, decision_uri)
        if found is not None:  # the CI runner has no GPU: the pipeline measured it, on these files
            print(f"promote: {parity.accept(*found, g, cfg.promote)}", flush=True)
            return
        measured = parity.measure(cfg, store, model_uri, g.export)
        if not measured.passed(cfg.promote.reembed_tolerance):
            raise ExportError(f"re-embedded items differ from the exported embeddings (max |cosine - 1| = "
                              f"{measured.max_deviation:.2e} > {cfg.promote.reembed_tolerance}): the files being "
                              "promoted are not the model that was evaluated")
        print(f"promote: {measured.line()}", flush=True)

    r = run(cfg, store, decision_uri, check_model=check_model)
    version = r.model_uri.rsplit("/", 1)[0]
    return committed(store, "promote", version, f"promote: {r.message}", version=r.version, champion=r.champion,
                     model_uri=r.model_uri)


@stage("rollback", lambda cfg: cfg.registry.uri)
def rollback(cfg: CafeConfig, store: Storage) -> Result:
    """Restore the previous champion (champion <- previous; a second rollback swaps them back)."""
    from cafe_core.registry import rollback as run

    r = run(cfg, store)
    return Result("rollback", cfg.registry.uri, f"rollback: {r.message}", {"champion": r.champion,
                                                                              "previous": r.previous})
