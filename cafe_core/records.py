"""The records the gate writes and the registry keeps, and their file names: pure record I/O.

`decision.json` (a `Decision`, with `why.md` its summary) is what `cafe gate` commits and `cafe promote`
reads; `metrics.json` (a `MetricsFile`) is what `cafe evaluate` commits and the gate judges. `ChampionInfo`
is what the registry hands the gate about the current champion (or `ChampionUnreadable` when it has one
but cannot read it). Both cafe_core.gate and cafe_core.registry import this module; it imports neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError, computed_field

from cafe_core.commit import read_manifest, verify_output
from cafe_core.config import CafeConfig, GateRule
from cafe_core.layout import METRICS_FILE
from cafe_core.storage import Storage, StorageError
from cafe_core.uris import join, sha256_bytes

DECISION_KIND = "gate-decision"
METRICS_KIND = "evaluation"
SCHEMA_VERSION = 1


class _Record(BaseModel):
    # NaN/inf survive a JSON round trip as the strings "NaN"/"Infinity" instead of turning into null.
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")


# --- records -----------------------------------------------------------------------------------------


class Verdict(_Record):
    """One metric slice checked against one rule."""

    metric: str  # the metric name; the rule's pattern itself when the pattern matched nothing
    rule: str  # the rule's metric pattern (a glob may check several slices)
    value: float | None  # None when missing or not a number
    direction: Literal["higher", "lower"] | None  # None: the metric has no better side (absolute bounds only)
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
    sets: dict[str, dict[str, Any]] | None = None  # set -> identity (evaluate.identity); None: an older file


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
    return ", ".join(parts) + (" (lower is better)" if v.direction == "lower" else "")


@dataclass(frozen=True)
class ChampionInfo:
    """The registry's current champion, as the gate compares candidates with it."""

    version: str
    model_uri: str  # the committed copy inside the registry (versions/<vN>/checkpoint)
    metrics: dict[str, Any]  # the metrics it was promoted with
    checkpoint_digest: str
    decision_uri: str
    sets: dict[str, Any] | None = None  # the evaluation-set identities it was scored on; None: not recorded


@dataclass(frozen=True)
class ChampionUnreadable:
    """There is a champion but its records cannot be read: the gate fails closed on it."""

    error: str  # what is wrong, naming the record


# What the gate is told about the champion: None = nothing promoted yet.
Champion = Union[ChampionInfo, ChampionUnreadable, None]


def registry_root(cfg: CafeConfig) -> str:
    """`{registry.uri}/{registry.model_name}`: the registry a decision is gated against."""
    return join(cfg.registry.uri, cfg.registry.model_name)


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


def read_passed_decision(store: Storage, uri: str, error: type[Exception], action: str) -> Decision:
    """A committed PASS decision record; `error` naming the fix when it is unreadable or a FAIL (`action`:
    what only a PASS may be, e.g. "promoted")."""
    try:
        decision = read_decision(store, uri)
    except (StorageError, ValueError) as e:
        raise error(f"decision record {uri} unreadable: {e}") from None
    if not decision.passed:
        why = "; ".join(decision.reasons[:3]) or "see why.md"
        raise error(f"{uri} is a FAIL decision ({why}): only a PASS can be {action}; fix the cause and run cafe "
                    "gate again")
    return decision
