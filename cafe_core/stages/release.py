"""Release: the gate's decision, promotion of a PASS to champion, rollback to the previous champion."""

from __future__ import annotations

from cafe_core.config import CafeConfig
from cafe_core.layout import METRICS_FILE
from cafe_core.stages.base import Result, committed, stage
from cafe_core.storage import Storage
from cafe_core.uris import join


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


@stage("promote", lambda cfg: cfg.registry.uri)
def promote(cfg: CafeConfig, store: Storage) -> Result:
    """Make the model of the PASS decision at promote.decision the registry's champion. Its files' sha256 and
    a re-embedded sample from a fresh download must match what was gated."""
    from cafe_core.evaluate.export import reembed_check
    from cafe_core.records import read_decision
    from cafe_core.registry import RegistryError
    from cafe_core.registry import promote as run

    def check_model(model_uri: str) -> None:
        decision = read_decision(store, cfg.promote.decision)
        embeddings = store.read_json(join(decision.inputs.metrics, METRICS_FILE)).get("embeddings")
        if not embeddings:
            raise RegistryError(f"{decision.inputs.metrics}/{METRICS_FILE} does not say which export it used")
        print(f"promote: {reembed_check(cfg, store, model_uri, embeddings)}", flush=True)

    r = run(cfg, store, cfg.promote.decision, check_model=check_model)
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
