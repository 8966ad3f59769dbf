"""The promotion gate: a candidate's metrics against configured bounds and against the current champion.

    cafe gate --config configs/local.yaml run_id=r7            # decide and write the decision record
    cafe gate --config configs/local.yaml run_id=r7 --dry-run  # decide and print, write nothing

`evaluate_rules` is the pure truth table. `decide` gathers its inputs and fails closed: every problem with
them (metrics missing, uncommitted, from another run, stale, non-finite; champion unreadable; no rules) is
a FAIL whose reason is in the record, never an exception that skips writing it. `write_decision` commits
`decision.json` and `why.md` together as one output, which is what `cafe promote` reads.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cafe_core.commit import OutputWriter, manifest_digest
from cafe_core.config import PROJECT_DIR, CafeConfig, GateRule
from cafe_core.evaluate.identity import differences
from cafe_core.layout import DECISION_FILE, WHY_FILE
from cafe_core.records import (
    DECISION_KIND,
    Champion,
    ChampionInfo,
    ChampionRef,
    ChampionUnreadable,
    Decision,
    DecisionInputs,
    Verdict,
    read_metrics,
    registry_root,
)
from cafe_core.storage import Storage, StorageError
from cafe_core.uris import is_s3
from cafe_core.version import code_version

# A drop exactly at the allowed bound passes; float noise in e.g. 0.50 - 0.45 must not make it fail.
EPS = 1e-9
_GLOB_CHARS = set("*?[")


# --- pure logic --------------------------------------------------------------------------------------


def as_number(x: Any) -> float | None:
    """A finite float, or None for NaN, inf, bools, strings and anything else that is not a number."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _slices(pattern: str, metrics: dict[str, Any]) -> list[str]:
    if not (_GLOB_CHARS & set(pattern)):
        return [pattern] if pattern in metrics else []
    return sorted(name for name in metrics if fnmatch.fnmatchcase(name, pattern))


def _has_relative(rule: GateRule) -> bool:
    return rule.max_drop is not None or rule.max_drop_relative is not None


def sets_behind(name: str, sets: dict[str, Any]) -> list[str]:
    """The evaluation sets a metric was computed on: its own set ("retrieval/<set>/...", "mmeb/dataset/<d>/...",
    "pope/<split>/...", "mc/<set>/...", "caption/..."; the modality gap reads the retrieval sets), or every
    set of its family for an average ("pope/average/f1", "mmeb/overall/p@1")."""
    parts = name.split("/")
    family = "retrieval" if parts[0] == "gap" else parts[0]
    if parts[0] == "mmeb" and len(parts) > 3 and parts[1] == "dataset":
        own = f"mmeb/{parts[2]}"
    else:
        own = family if family == "caption" else f"{family}/{parts[1]}" if len(parts) > 2 else None
    if own in sets:
        return [own]
    return sorted(k for k in sets if k == family or k.startswith(f"{family}/"))


def comparability(name: str, sets: dict[str, Any], champion_sets: dict[str, Any] | None) -> str | None:
    """Why a candidate's metric cannot be compared with the champion's, or None when it was scored on the very
    same items (`identity.set_identity`)."""
    behind = sets_behind(name, sets)
    if not behind:
        return f"no record of which evaluation items {name} was computed on: re-run cafe evaluate"
    if champion_sets is None:
        return ("the champion's metrics record no evaluation-set identities (evaluated by an older version), so "
                "its numbers may come from other items")
    found = differences(sets, champion_sets, behind)
    return f"scored on other items than the champion: {'; '.join(found)}" if found else None


def check_slice(rule: GateRule, name: str, raw: Any, champion: dict[str, Any] | None,
                incomparable: str | None = None) -> Verdict:
    """One metric value against one rule (absolute bounds, then the champion comparisons). `incomparable`:
    why the champion's value of this metric comes from other items (`comparability`), if it does."""
    bounds = dict(rule=rule.metric, direction=rule.direction, min=rule.min, max=rule.max, max_drop=rule.max_drop,
                  max_drop_relative=rule.max_drop_relative)
    value = as_number(raw)
    if value is None:
        why = "is NaN" if isinstance(raw, float) and math.isnan(raw) else f"is not a finite number ({raw!r})"
        return Verdict(metric=name, value=None, passed=False, reason=f"value {why}: the evaluation is broken; "
                       "re-run cafe evaluate", **bounds)
    fails: list[str] = []
    oks: list[str] = []
    if rule.min is not None:
        (fails if value < rule.min else oks).append(f"{value:.4g} {'<' if value < rule.min else '>='} min {rule.min:g}")
    if rule.max is not None:
        (fails if value > rule.max else oks).append(f"{value:.4g} {'>' if value > rule.max else '<='} max {rule.max:g}")
    champ_value: float | None = None
    delta: float | None = None
    if _has_relative(rule):
        if champion is None:
            oks.append("no champion yet (first promotion): drop checks skipped")
        elif name not in champion:
            fails.append(f"the champion has no {name!r} to compare with: add the metric to the champion's "
                         "evaluation, or remove max_drop/max_drop_relative from this rule")
        elif (champ_value := as_number(champion[name])) is None:
            fails.append(f"the champion's {name} is {champion[name]!r}, not a finite number: cannot compare")
        elif incomparable and not rule.allow_other_sets:
            fails.append(f"{incomparable}; re-evaluate on the champion's sets, or set allow_other_sets: true on "
                         "this rule to compare anyway")
            champ_value = None
        else:
            if incomparable:
                oks.append(f"compared although {incomparable} (allow_other_sets)")
            delta = value - champ_value
            worse = -delta if rule.direction == "higher" else delta  # > 0: the candidate is worse
            if rule.max_drop is not None:
                ok = worse <= rule.max_drop + EPS
                (oks if ok else fails).append(f"drop {worse:+.4g} vs champion {champ_value:.4g} "
                                              f"{'<=' if ok else '>'} max_drop {rule.max_drop:g}")
            if rule.max_drop_relative is not None:
                allowed = rule.max_drop_relative * abs(champ_value)
                ok = worse <= allowed + EPS
                (oks if ok else fails).append(f"drop {worse:+.4g} vs champion {champ_value:.4g} {'<=' if ok else '>'} "
                                              f"{rule.max_drop_relative:.0%} of it ({allowed:.4g})")
    return Verdict(metric=name, value=value, champion=champ_value, delta=delta, passed=not fails,
                   reason="; ".join(fails or oks), **bounds)


def evaluate_rules(rules: list[GateRule], metrics: dict[str, Any], champion: dict[str, Any] | None,
                   sets: dict[str, Any] | None = None, champion_sets: dict[str, Any] | None = None) -> list[Verdict]:
    """Every rule against every metric it matches; pure.

    A glob (fnmatch) checks each matching metric as its own slice; a rule matching nothing fails as
    missing. `champion` is the champion's metrics, or None when there is none yet (the drop checks are
    then skipped, the absolute bounds still apply). With `sets` (the candidate's evaluation-set identities)
    a drop check passes only where the champion (`champion_sets`) was scored on the same items."""
    verdicts: list[Verdict] = []
    for rule in rules:
        names = _slices(rule.metric, metrics)
        if not names:
            what = "no metric matches the pattern" if _GLOB_CHARS & set(rule.metric) else "the metric is missing"
            verdicts.append(Verdict(metric=rule.metric, rule=rule.metric, value=None, direction=rule.direction,
                                    min=rule.min, max=rule.max, max_drop=rule.max_drop,
                                    max_drop_relative=rule.max_drop_relative, passed=False,
                                    reason=f"missing: {what} in metrics.json; check the rule's name against "
                                           "the evaluation's metric names, or the families evaluated"))
            continue
        verdicts.extend(
            check_slice(rule, name, metrics[name], champion,
                        comparability(name, sets, champion_sets) if sets is not None and champion is not None else None)
            for name in names)
    return verdicts


# --- I/O ---------------------------------------------------------------------------------------------


def load_rules(store: Storage, uri: str) -> list[GateRule]:
    """The `rules:` list of a gate rules file (YAML, local or s3://), each rule validated. A relative local
    path that does not exist from here is read from the project folder (configs/gate.yaml anywhere)."""
    if not is_s3(uri) and not Path(uri).is_absolute() and not Path(uri).exists():
        uri = str(PROJECT_DIR / uri)
    try:
        data = yaml.safe_load(store.read_text(uri))
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise ValueError("expected a mapping with a `rules:` list (see configs/gate.yaml)")
    out = []
    for i, rule in enumerate(data["rules"]):
        try:
            out.append(GateRule.model_validate(rule))
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'rule'}: {err['msg']}" for err in e.errors())
            raise ValueError(f"rules[{i}] ({rule.get('metric') if isinstance(rule, dict) else rule}): {problems}") from None
    return out


def decide(cfg: CafeConfig, store: Storage, champion: Champion) -> Decision:
    """Gather the inputs and judge them. Never raises for a problem with the inputs: it becomes a reason.

    `champion` is what the registry says about the current champion (`registry.champion_metrics`): its
    metrics, None when nothing was promoted yet, or `ChampionUnreadable`, which fails the decision."""
    if champion is not None and not isinstance(champion, (ChampionInfo, ChampionUnreadable)):
        raise TypeError(f"champion must be a ChampionInfo, ChampionUnreadable or None, not {type(champion).__name__}")
    g = cfg.gate
    reasons: list[str] = []
    rules = list(g.rules)
    if g.rules_from:
        try:
            rules += load_rules(store, g.rules_from)
        except (StorageError, ValueError) as e:
            reasons.append(f"gate rules at {g.rules_from} unreadable: {e}")
    if not rules:
        reasons.append("no gate rules: nothing checked is not a pass; add gate.rules or gate.rules_from "
                       "(see configs/gate.yaml)")

    metrics: dict[str, Any] | None = None
    metrics_sha: str | None = None
    try:
        mf, metrics_sha = read_metrics(store, g.metrics)
        metrics = mf.metrics
        if mf.run_id != cfg.run_id:
            reasons.append(f"metrics.json run_id is {mf.run_id!r}, not this run's {cfg.run_id!r}: evaluate this "
                           "run, or set gate.metrics to this run's evaluation")
        bad = sorted(k for k, v in metrics.items() if as_number(v) is None)
        if bad:
            reasons.append(f"metrics.json has non-finite or non-numeric values for {', '.join(bad)}: the evaluation "
                           "is broken; fix it and re-run cafe evaluate")
    except (StorageError, ValueError) as e:
        mf = None
        reasons.append(f"metrics at {g.metrics} unreadable: {e}")

    digest: str | None = None
    try:
        digest = manifest_digest(store, g.checkpoint)
    except StorageError as e:
        reasons.append(f"checkpoint {g.checkpoint} unreadable: {e}")
    if mf is not None and mf.checkpoint_digest is None:
        reasons.append(f"the metrics were measured on {mf.checkpoint}, which has no manifest digest: only a "
                       "committed output (cafe train's) can be gated; evaluate that instead")
    elif mf is not None and digest is not None and mf.checkpoint_digest != digest:
        reasons.append(f"stale metrics: they were measured on checkpoint digest {mf.checkpoint_digest[:12]}, but "
                       f"{g.checkpoint} now has digest {digest[:12]}; re-run cafe export and cafe evaluate")

    champ_ref: ChampionRef | None = None
    champ_metrics: dict[str, Any] | None = None
    champ_sets: dict[str, Any] | None = None
    champ_error: str | None = None
    if isinstance(champion, ChampionUnreadable):
        champ_error = champion.error
        reasons.append(f"champion unreadable: {champion.error}; repair the registry or roll back before gating")
    elif champion is not None:
        champ_ref = ChampionRef(version=champion.version, model_uri=champion.model_uri)
        champ_metrics, champ_sets = champion.metrics, champion.sets

    verdicts = evaluate_rules(rules, metrics, champ_metrics, mf.sets or {}, champ_sets) if metrics is not None else []
    if champ_error is not None:
        # Evaluated as "no champion", which would wrongly skip the drop checks: they cannot pass.
        impossible = "champion unreadable, drop checks impossible"
        verdicts = [v.model_copy(update={"passed": False, "reason": f"{impossible}; {v.reason}"})
                    if v.max_drop is not None or v.max_drop_relative is not None else v for v in verdicts]
    failed = [v for v in verdicts if not v.passed]
    if failed:
        names = ", ".join(v.metric for v in failed[:8]) + (" ..." if len(failed) > 8 else "")
        reasons.append(f"{len(failed)} of {len(verdicts)} checks failed: {names}")

    return Decision(
        decision="FAIL" if reasons else "PASS",
        reasons=reasons,
        verdicts=verdicts,
        champion=champ_ref,
        inputs=DecisionInputs(metrics=g.metrics, checkpoint=g.checkpoint, registry=registry_root(cfg)),
        checkpoint_digest=digest,
        metrics_sha256=metrics_sha,
        run_id=cfg.run_id,
        code_version=code_version(),
        config_digest=cfg.digest(),
        rules=rules,
        time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def write_decision(store: Storage, cfg: CafeConfig, decision: Decision) -> str:
    """Commit `decision.json` and `why.md` at gate.output as one output; returns the decision.json URI."""
    out = OutputWriter(store, cfg.gate.output, kind=DECISION_KIND)
    uri = out.put_bytes(DECISION_FILE, (decision.model_dump_json(indent=2) + "\n").encode())
    out.put_text(WHY_FILE, decision.summary())
    out.commit(meta={"decision": decision.decision, "run_id": decision.run_id,
                     "checkpoint_digest": decision.checkpoint_digest})
    return uri
