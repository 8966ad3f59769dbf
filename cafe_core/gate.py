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
import json
import math
from typing import Any, Literal

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, computed_field

from cafe_core.config import PROJECT_DIR, CafeConfig, GateRule
from cafe_core.storage import (
    OutputWriter,
    Storage,
    StorageError,
    is_s3,
    join,
    manifest_digest,
    read_manifest,
    sha256_bytes,
    verify_output,
)
from cafe_core.version import code_version

DECISION_KIND = "gate-decision"
METRICS_KIND = "evaluation"
METRICS_FILE = "metrics.json"
DECISION_FILE = "decision.json"
WHY_FILE = "why.md"
SCHEMA_VERSION = 1
# A drop exactly at the allowed bound passes; float noise in e.g. 0.50 - 0.45 must not make it fail.
EPS = 1e-9
_GLOB_CHARS = set("*?[")


class _Record(BaseModel):
    # NaN/inf survive a JSON round trip as the strings "NaN"/"Infinity" instead of turning into null.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


# --- records -----------------------------------------------------------------------------------------


class Verdict(_Record):
    """One metric slice checked against one rule."""

    metric: str  # the metric name; the rule's pattern itself when the pattern matched nothing
    rule: str  # the rule's metric pattern (a glob may check several slices)
    value: float | None  # None when missing or not a number
    direction: Literal["higher", "lower"]
    min: float | None = None
    max: float | None = None
    max_drop: float | None = None
    max_drop_relative: float | None = None
    champion: float | None = None  # the champion's value of this metric, when a relative check needed it
    delta: float | None = None  # value - champion (signed, raw; `direction` says which sign is worse)
    passed: bool
    reason: str

    # Reading a record back: the computed `verdict` key is in the JSON but is not an input field.
    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="strings")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def verdict(self) -> Literal["PASS", "FAIL"]:
        return "PASS" if self.passed else "FAIL"


class ChampionRef(_Record):
    version: str
    model_uri: str


class DecisionInputs(_Record):
    metrics: str  # the evaluation output prefix
    checkpoint: str  # the committed model output being gated
    registry: str  # {registry.uri}/{registry.model_name}


class Decision(_Record):
    """The gate's decision record (`decision.json`): everything needed to audit or replay the decision."""

    kind: Literal["gate-decision"] = DECISION_KIND
    schema_version: int = SCHEMA_VERSION
    decision: Literal["PASS", "FAIL"]
    reasons: list[str]  # empty exactly when PASS
    verdicts: list[Verdict]
    champion: ChampionRef | None  # what the relative checks compared with; None = no champion yet
    inputs: DecisionInputs
    checkpoint_digest: str | None  # sha256 of the checkpoint's _MANIFEST.json bytes, as measured now
    metrics_sha256: str | None  # sha256 of the metrics.json that was judged
    run_id: str
    code_version: str
    config_digest: str
    rules: list[GateRule]
    time: str  # UTC ISO 8601

    @property
    def passed(self) -> bool:
        return self.decision == "PASS"

    def summary(self) -> str:
        """`why.md`: first line PASS/FAIL, then the reasons, the failed checks, and a table of all checks."""
        failed = [v for v in self.verdicts if not v.passed]
        head = f"{self.decision}: run {self.run_id}"
        head += f", {len(self.verdicts) - len(failed)}/{len(self.verdicts)} checks passed"
        champ = f"champion {self.champion.version} ({self.champion.model_uri})" if self.champion else "no champion yet"
        lines = [head, "", f"- checkpoint: `{self.inputs.checkpoint}` (manifest sha256 `{self.checkpoint_digest}`)",
                 f"- metrics: `{self.inputs.metrics}`", f"- compared with: {champ}",
                 f"- code {self.code_version}, config {self.config_digest}, {self.time}", ""]
        if self.reasons:
            lines += ["## Why it failed", ""] + [f"- {r}" for r in self.reasons] + [""]
        if failed:
            lines += ["## Failed checks", ""] + [f"- `{v.metric}`: {v.reason}" for v in failed] + [""]
        lines += ["## All checks", "", "| metric | value | bounds | champion | delta | verdict | why |",
                  "|---|---|---|---|---|---|---|"]
        for v in sorted(self.verdicts, key=lambda v: (v.passed, v.metric)):
            lines.append(f"| `{v.metric}` | {_fmt(v.value)} | {_bounds_text(v)} | {_fmt(v.champion)} | "
                         f"{_fmt(v.delta, signed=True)} | {v.verdict} | {v.reason.replace('|', '/')} |")
        return "\n".join(lines) + "\n"


class MetricsFile(BaseModel):
    """What `cafe evaluate` writes as `metrics.json` (extra fields are allowed and ignored here)."""

    model_config = ConfigDict(extra="allow")

    run_id: str
    checkpoint: str
    checkpoint_digest: str | None  # None: measured on a plain folder without a manifest (never gated)
    created: str
    code_version: str
    config_digest: str
    metrics: dict[str, Any]


# --- pure logic --------------------------------------------------------------------------------------


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def _bounds_text(v: Verdict) -> str:
    parts = []
    if v.min is not None:
        parts.append(f">= {v.min:g}")
    if v.max is not None:
        parts.append(f"<= {v.max:g}")
    if v.max_drop is not None:
        parts.append(f"drop <= {v.max_drop:g}")
    if v.max_drop_relative is not None:
        parts.append(f"drop <= {v.max_drop_relative:.0%}")
    return ", ".join(parts) + ("" if v.direction == "higher" else " (lower is better)")


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


def check_slice(rule: GateRule, name: str, raw: Any, champion: dict[str, Any] | None) -> Verdict:
    """One metric value against one rule (absolute bounds, then the champion comparisons)."""
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
        else:
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


def evaluate_rules(rules: list[GateRule], metrics: dict[str, Any], champion: dict[str, Any] | None) -> list[Verdict]:
    """Every rule against every metric it matches; pure.

    A glob (fnmatch) checks each matching metric as its own slice; a rule matching nothing fails as
    missing. `champion` is the champion's metrics, or None when there is none yet (the drop checks are
    then skipped, the absolute bounds still apply)."""
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
        verdicts.extend(check_slice(rule, name, metrics[name], champion) for name in names)
    return verdicts


# --- I/O ---------------------------------------------------------------------------------------------


def read_metrics(store: Storage, prefix: str) -> tuple[MetricsFile, str]:
    """The committed evaluation output's metrics.json (checksums verified) and its sha256.
    Raises StorageError / ValueError with a message naming the problem."""
    manifest = read_manifest(store, prefix)
    if manifest.kind != METRICS_KIND:
        raise StorageError(f"{prefix} is a {manifest.kind!r} output, not an {METRICS_KIND!r} one: point "
                           "gate.metrics at the `cafe evaluate` output")
    if METRICS_FILE not in manifest.names():
        raise StorageError(f"{prefix} is committed but lists no {METRICS_FILE}: re-run cafe evaluate")
    verify_output(store, prefix, manifest)
    data = store.read_bytes(join(prefix, METRICS_FILE))
    try:  # json.loads, not pydantic's parser: it reads the bare NaN that json.dumps writes
        return MetricsFile.model_validate(json.loads(data)), sha256_bytes(data)
    except ValueError as e:  # ValidationError and JSONDecodeError alike
        raise ValueError(f"{join(prefix, METRICS_FILE)} is not a valid metrics file: {e}") from None


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


def decide(cfg: CafeConfig, store: Storage) -> Decision:
    """Gather the inputs and judge them. Never raises for a problem with the inputs: it becomes a reason."""
    from cafe_core.registry import RegistryError, champion as read_champion, registry_root  # imports this module

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
    champ_error: str | None = None
    try:
        info = read_champion(cfg, store)
        if info is not None:
            champ_ref = ChampionRef(version=info.version, model_uri=info.model_uri)
            champ_metrics = info.metrics
    except (RegistryError, StorageError, ValueError) as e:
        champ_error = str(e)
        reasons.append(f"champion unreadable: {e}; repair the registry or roll back before gating")

    verdicts = evaluate_rules(rules, metrics, champ_metrics) if metrics is not None else []
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


def read_decision(store: Storage, uri: str) -> Decision:
    """A committed decision record (its output's manifest checked). Raises StorageError/ValueError naming
    what is wrong."""
    prefix, _, name = uri.rstrip("/").rpartition("/")
    manifest = read_manifest(store, prefix)
    if manifest.kind != DECISION_KIND or name not in manifest.names():
        raise ValueError(f"{uri} is not a decision record: {prefix} is a {manifest.kind!r} output listing "
                         f"{manifest.names()[:5]}; pass the decision.json that `cafe gate` wrote")
    verify_output(store, prefix, manifest)
    try:
        return Decision.model_validate_json(store.read_bytes(uri))
    except ValidationError as e:
        raise ValueError(f"{uri} is not a valid decision record: {e}") from None
