"""A small model registry in S3 (or a local folder): immutable versions, and aliases moved by compare-and-swap.

    cafe promote --config configs/local.yaml run_id=r7   # the PASS decision at promote.decision -> champion
    cafe rollback --config configs/local.yaml            # champion <- previous, in one call

Layout under ``{registry.uri}/{registry.model_name}/``::

    aliases.json                  {"champion": "v3", "previous": "v2", "history": [{time, action, from, to}]}
    versions/v3/version.json      the claim, written first with if-none-match: version id, source model,
                                  checkpoint digest, decision URI, run id, promoted time, code version
    versions/v3/checkpoint/...    byte-identical copy of the candidate's committed output, its _MANIFEST.json
                                  included (so its checkpoint digest is the candidate's)
    versions/v3/decision.json     the PASS decision record it was promoted with
    versions/v3/why.md
    versions/v3/metrics.json      the metrics it was promoted with (the gate compares later candidates to them)
    versions/v3/_MANIFEST.json    the commit point: a version without it is invisible (a crashed promotion)

Concurrency: a version id is claimed by a conditional create of its version.json, so two promoters never
share one; the files are copied and the version committed before any alias points at it; aliases.json
moves only by compare-and-swap on its etag, retried a bounded number of times. A promotion also refuses to
move the champion when it is no longer the champion the gate compared the candidate with.

A Kubeflow Model Registry (registry.kubeflow) gets each promoted version too (cafe_core.model_registry), after
the S3 version is committed and before the champion alias moves: when it cannot take the version, nothing
moves. Which version is champion stays in aliases.json.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cafe_core.commit import MANIFEST, Manifest, ManifestEntry, OutputWriter, read_manifest, verify_output
from cafe_core.config import CafeConfig
from cafe_core.errors import StageFailed
from cafe_core.layout import DECISION_FILE, METRICS_FILE, WHY_FILE
from cafe_core.records import (
    ChampionInfo,
    ChampionUnreadable,
    Decision,
    MetricsFile,
    read_passed_decision,
    registry_root,
)
from cafe_core.storage import ObjectNotFound, PreconditionFailed, Storage, StorageError, StorageUnavailable
from cafe_core.uris import join, sha256_bytes
from cafe_core.version import code_version

ALIASES = "aliases.json"
VERSIONS = "versions"
VERSION_FILE = "version.json"
CHECKPOINT_DIR = "checkpoint"
VERSION_KIND = "registry-version"
CAS_ATTEMPTS = 20
CLAIM_ATTEMPTS = 100
_VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")


class RegistryError(StageFailed, RuntimeError):
    """The registry cannot do what was asked; the message names the record and the fix."""


class PromoteError(RegistryError):
    """A promotion was refused (FAIL decision, changed files, a failed model check, a moved champion)."""


# --- records -----------------------------------------------------------------------------------------


class VersionRecord(BaseModel):
    """`versions/<vN>/version.json`, written once as the claim of the id."""

    model_config = ConfigDict(extra="forbid")

    version: str
    model_name: str
    source_model_uri: str  # the candidate's committed output it was copied from
    checkpoint_digest: str  # sha256 of that output's _MANIFEST.json bytes
    decision_uri: str
    run_id: str
    promoted: str  # UTC ISO time of the claim
    code_version: str
    claim: str  # a random id: tells our own claim apart from another promoter's after a lost reply


class AliasEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    time: str
    action: Literal["promote", "rollback"]
    from_: str | None = Field(None, alias="from")
    to: str
    id: str | None = None  # the move's own id: a retry after a lost reply finds it and does not move twice


class Aliases(BaseModel):
    """`aliases.json`."""

    model_config = ConfigDict(extra="forbid")

    champion: str | None = None
    previous: str | None = None
    history: list[AliasEvent] = Field(default_factory=list)

    def to_bytes(self) -> bytes:
        return (self.model_dump_json(indent=2, by_alias=True) + "\n").encode()


@dataclass(frozen=True)
class PromoteResult:
    version: str
    model_uri: str
    champion: str | None
    previous: str | None
    noop: bool  # nothing moved: the checkpoint already is the champion
    reused: bool  # an existing version of the same checkpoint became champion (no new copy)
    message: str


@dataclass(frozen=True)
class RollbackResult:
    champion: str  # restored
    previous: str  # the demoted champion (a second rollback swaps them back)
    message: str


# --- paths and reads ---------------------------------------------------------------------------------


def version_prefix(root: str, version: str) -> str:
    return join(root, VERSIONS, version)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_aliases(store: Storage, root: str) -> tuple[Aliases, str | None]:
    """The aliases and their etag (None: no aliases.json yet, i.e. nothing promoted)."""
    uri = join(root, ALIASES)
    try:
        data, etag = store.read_with_etag(uri)
    except ObjectNotFound:
        return Aliases(), None
    except StorageError as e:
        raise RegistryError(f"registry aliases {uri} unreadable: {e}") from None
    try:
        return Aliases.model_validate_json(data), etag
    except ValidationError as e:
        raise RegistryError(f"registry aliases {uri} is corrupt ({e.error_count()} problems: {e.errors()[0]['msg']}); "
                            "restore it from the last good copy (its history lists every move)") from None


def update_aliases(store: Storage, root: str, change: Callable[[Aliases], Aliases | None], op: str | None = None,
                   attempts: int = CAS_ATTEMPTS) -> tuple[Aliases, bool]:
    """Compare-and-swap: read aliases.json with its etag, apply `change`, write only if nobody wrote in
    between; otherwise read again and retry. `change` returns None for "nothing to do" and may raise to
    abort. `op` is the id `change` puts on its history event: when a retry finds it, the earlier write
    landed (only its reply was lost) and nothing is applied twice. Returns (the aliases now, whether this
    call moved them)."""
    uri = join(root, ALIASES)
    for attempt in range(attempts):
        current, etag = read_aliases(store, root)
        if op is not None and any(h.id == op for h in current.history):
            return current, True
        new = change(current)
        if new is None:
            return current, False
        try:
            if etag is None:
                store.write_bytes_if(uri, new.to_bytes(), if_none_match=True)
            else:
                store.write_bytes_if(uri, new.to_bytes(), if_match=etag)
            return new, True
        except PreconditionFailed:
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # another writer won: back off, re-read
    raise RegistryError(f"{uri}: {attempts} compare-and-swap attempts lost to concurrent writers; try again")


def _version_number(version: str) -> int:
    m = _VERSION_RE.match(version)
    if not m:
        raise RegistryError(f"{version!r} is not a registry version id (expected v1, v2, ...)")
    return int(m.group(1))


def claimed_versions(store: Storage, root: str) -> list[str]:
    """Every version id that has been claimed (committed or not), in numeric order."""
    base = join(root, VERSIONS)
    found = set()
    for obj in store.list(base):
        parts = obj.uri[len(base) + 1:].split("/")
        if len(parts) == 2 and parts[1] == VERSION_FILE and _VERSION_RE.match(parts[0]):
            found.add(parts[0])
    return sorted(found, key=_version_number)


def _read_listed(store: Storage, prefix: str, manifest: Manifest, name: str) -> bytes:
    """One small file of a committed output, checked against its manifest's sha256."""
    data = store.read_bytes(join(prefix, name))
    if sha256_bytes(data) != manifest.entry(name).sha256:
        raise StorageError(f"{join(prefix, name)}: sha256 differs from the manifest")
    return data


def read_version(store: Storage, root: str, version: str) -> VersionRecord:
    """The record of a committed version; RegistryError when it is not committed or unreadable."""
    _version_number(version)
    prefix = version_prefix(root, version)
    try:
        manifest = read_manifest(store, prefix)
        return VersionRecord.model_validate_json(_read_listed(store, prefix, manifest, VERSION_FILE))
    except (StorageError, ValidationError) as e:
        raise RegistryError(f"registry version {prefix} unreadable: {e}") from None


def committed_versions(store: Storage, root: str) -> list[VersionRecord]:
    """Every committed (visible) version; claimed-but-uncommitted ones (crashed promotions) are skipped."""
    out = []
    for v in claimed_versions(store, root):
        try:
            out.append(read_version(store, root, v))
        except RegistryError:
            continue
    return out


def champion(cfg: CafeConfig, store: Storage) -> ChampionInfo | None:
    """The current champion with the metrics it was promoted with; None when nothing was promoted yet.
    RegistryError when there is a champion but its records cannot be read (the gate fails closed on it)."""
    root = registry_root(cfg)
    aliases, _ = read_aliases(store, root)
    if aliases.champion is None:
        return None
    prefix = version_prefix(root, aliases.champion)
    rec = read_version(store, root, aliases.champion)
    try:
        manifest = read_manifest(store, prefix)
        metrics = MetricsFile.model_validate(json.loads(_read_listed(store, prefix, manifest, METRICS_FILE)))
        Decision.model_validate_json(_read_listed(store, prefix, manifest, DECISION_FILE))
    except (StorageError, ValueError) as e:
        raise RegistryError(f"champion {aliases.champion} ({prefix}): decision record or metrics unreadable: {e}; "
                            "roll back (cafe rollback) or repair the version") from None
    return ChampionInfo(version=rec.version, model_uri=join(prefix, CHECKPOINT_DIR), metrics=metrics.metrics,
                        checkpoint_digest=rec.checkpoint_digest, decision_uri=join(prefix, DECISION_FILE),
                        sets=metrics.sets)


def champion_metrics(cfg: CafeConfig, store: Storage) -> ChampionInfo | ChampionUnreadable | None:
    """What the gate compares a candidate with: `champion()`, except that a champion whose records cannot be
    read is returned as ChampionUnreadable (naming the problem) instead of raised, so that `gate.decide`
    records it as a FAIL reason: `decide(cfg, store, champion_metrics(cfg, store))`."""
    try:
        return champion(cfg, store)
    except (RegistryError, StorageError, ValueError) as e:
        return ChampionUnreadable(error=str(e))


# --- promote -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    model_uri: str
    manifest: Manifest
    manifest_bytes: bytes
    digest: str
    decision_bytes: bytes
    why_bytes: bytes | None
    metrics_bytes: bytes


def _load_candidate(store: Storage, decision_uri: str, decision: Decision, root: str) -> _Candidate:
    """Re-read what the decision measured and check it is still exactly that."""
    model_uri = decision.inputs.checkpoint
    if decision.inputs.registry.rstrip("/") != root:
        raise PromoteError(f"{decision_uri} was gated against registry {decision.inputs.registry}, not {root}: "
                           "gate again with this registry.uri/model_name")
    try:
        manifest_bytes = store.read_bytes(join(model_uri, MANIFEST))
        manifest = Manifest.model_validate_json(manifest_bytes)
    except (StorageError, ValueError) as e:
        raise PromoteError(f"candidate {model_uri} (from {decision_uri}) is not a readable committed output: "
                           f"{e}") from None
    digest = sha256_bytes(manifest_bytes)
    if digest != decision.checkpoint_digest:
        raise PromoteError(f"candidate {model_uri} changed since it was gated: manifest digest {digest[:12]} != "
                           f"{str(decision.checkpoint_digest)[:12]} in {decision_uri}; evaluate and gate it again")
    try:
        verify_output(store, model_uri, manifest, checksums=True)
    except StorageError as e:
        raise PromoteError(f"candidate files differ from what was measured: {e}") from None
    try:
        metrics_bytes = store.read_bytes(join(decision.inputs.metrics, METRICS_FILE))
    except StorageError as e:
        raise PromoteError(f"metrics the decision judged are gone: {e}; evaluate and gate again") from None
    if sha256_bytes(metrics_bytes) != decision.metrics_sha256:
        raise PromoteError(f"{join(decision.inputs.metrics, METRICS_FILE)} changed since {decision_uri} was made; "
                           "gate again")
    decision_prefix = decision_uri.rstrip("/").rpartition("/")[0]
    why_uri = join(decision_prefix, WHY_FILE)
    why = store.read_bytes(why_uri) if store.exists(why_uri) else None
    return _Candidate(model_uri, manifest, manifest_bytes, digest, store.read_bytes(decision_uri), why, metrics_bytes)


def _claim_version(store: Storage, root: str, rec_for: Callable[[str], VersionRecord]) -> VersionRecord:
    """Claim the next free version id by creating its version.json only if it does not exist."""
    for _ in range(CLAIM_ATTEMPTS):
        taken = claimed_versions(store, root)
        vid = f"v{_version_number(taken[-1]) + 1 if taken else 1}"
        rec = rec_for(vid)
        uri = join(version_prefix(root, vid), VERSION_FILE)
        try:
            store.write_bytes_if(uri, rec.model_dump_json(indent=2).encode(), if_none_match=True)
            return rec
        except PreconditionFailed:
            # Someone else holds vid, unless it was our own write whose reply got lost: compare claim ids.
            try:
                if VersionRecord.model_validate_json(store.read_bytes(uri)).claim == rec.claim:
                    return rec
            except (StorageError, ValidationError):
                pass
    raise RegistryError(f"{join(root, VERSIONS)}: could not claim a version id in {CLAIM_ATTEMPTS} tries")


def _register(store: Storage, root: str, model_name: str, decision_uri: str, decision: Decision,
              cand: _Candidate) -> VersionRecord:
    """Copy the candidate into a freshly claimed version, verify the copy, commit the version."""
    claim = uuid.uuid4().hex
    rec = _claim_version(store, root, lambda vid: VersionRecord(
        version=vid, model_name=model_name, source_model_uri=cand.model_uri, checkpoint_digest=cand.digest,
        decision_uri=decision_uri, run_id=decision.run_id, promoted=_now(), code_version=code_version(), claim=claim))
    prefix = version_prefix(root, rec.version)
    version_bytes = store.read_bytes(join(prefix, VERSION_FILE))
    out = OutputWriter(store, prefix, kind=VERSION_KIND)
    out.add_uploaded(ManifestEntry(name=VERSION_FILE, size=len(version_bytes), sha256=sha256_bytes(version_bytes)))
    ckpt = join(prefix, CHECKPOINT_DIR)
    for e in cand.manifest.entries:  # server-side copies; the copied manifest goes last, as in any commit
        store.copy(join(cand.model_uri, e.name), join(ckpt, e.name))
        out.add_uploaded(e.model_copy(update={"name": f"{CHECKPOINT_DIR}/{e.name}"}))
    out.put_bytes(f"{CHECKPOINT_DIR}/{MANIFEST}", cand.manifest_bytes)
    try:
        verify_output(store, ckpt, cand.manifest, checksums=True)
    except StorageError as e:
        raise PromoteError(f"the copy in {prefix} does not match the candidate: {e}; promote again "
                           f"({rec.version} stays uncommitted and invisible)") from None
    out.put_bytes(DECISION_FILE, cand.decision_bytes)
    out.put_bytes(METRICS_FILE, cand.metrics_bytes)
    if cand.why_bytes is not None:
        out.put_bytes(WHY_FILE, cand.why_bytes)
    out.commit(meta={"version": rec.version, "checkpoint_digest": cand.digest, "run_id": decision.run_id})
    return rec


def promote(cfg: CafeConfig, store: Storage, decision_uri: str,
            check_model: Callable[[str], None] | None = None, *, allow_champion_moved: bool = False) -> PromoteResult:
    """Make the checkpoint behind a PASS decision the champion (the old champion becomes previous).

    Refuses (PromoteError) a FAIL or unreadable decision, a candidate whose files or manifest changed since
    it was gated, a failed `check_model(model_uri)`, and, unless `allow_champion_moved`, a champion other
    than the one the gate compared with. Idempotent: the checkpoint already champion -> no-op; already a
    version -> that version is reused.

    With registry.kubeflow set, the version is registered there after it is committed in S3 and before the
    champion alias moves: a registry that does not take it refuses the promotion with the champion unmoved
    (the committed version is reused when the promotion is run again), so no champion is ever missing there."""
    root = registry_root(cfg)
    decision = read_passed_decision(store, decision_uri, PromoteError, "promoted")
    cand = _load_candidate(store, decision_uri, decision, root)

    def champion_digest(aliases: Aliases) -> str | None:
        return read_version(store, root, aliases.champion).checkpoint_digest if aliases.champion else None

    aliases, _ = read_aliases(store, root)
    if champion_digest(aliases) == cand.digest:
        return PromoteResult(aliases.champion, join(version_prefix(root, aliases.champion), CHECKPOINT_DIR),
                             aliases.champion, aliases.previous, noop=True, reused=False,
                             message=f"{cand.model_uri} already is the champion ({aliases.champion}): nothing to do")
    gated_against = decision.champion.version if decision.champion else None
    if not allow_champion_moved and aliases.champion != gated_against:
        raise _moved(decision_uri, gated_against, aliases.champion)

    existing = [r for r in committed_versions(store, root) if r.checkpoint_digest == cand.digest]
    if check_model is not None:
        try:
            check_model(cand.model_uri)
        except StorageUnavailable:
            raise  # the stage says so, and that nothing was promoted
        except Exception as e:  # noqa: BLE001 - any failure of the check refuses the promotion
            raise PromoteError(f"model check failed for {cand.model_uri}: {e}; nothing was promoted") from e
    if existing:
        rec = existing[-1]
        try:
            verify_output(store, version_prefix(root, rec.version), checksums=True)
        except StorageError as e:
            raise PromoteError(f"registered {rec.version} of this checkpoint is damaged: {e}") from None
    else:
        rec = _register(store, root, cfg.registry.model_name, decision_uri, decision, cand)

    registered = _register_kubeflow(cfg, root, rec, cand, decision, decision_uri, aliases.champion)
    op = uuid.uuid4().hex

    def move(a: Aliases) -> Aliases | None:
        if champion_digest(a) == cand.digest:
            return None  # a concurrent promotion of the same checkpoint got there first
        if not allow_champion_moved and a.champion != gated_against:
            raise _moved(decision_uri, gated_against, a.champion)
        event = AliasEvent(time=_now(), action="promote", from_=a.champion, to=rec.version, id=op)
        return Aliases(champion=rec.version, previous=a.champion, history=[*a.history, event])

    now, moved = update_aliases(store, root, move, op)
    model_uri = join(version_prefix(root, rec.version), CHECKPOINT_DIR)
    if not moved:
        return PromoteResult(now.champion, join(version_prefix(root, now.champion), CHECKPOINT_DIR), now.champion,
                             now.previous, noop=True, reused=bool(existing),
                             message=f"{cand.model_uri} became champion ({now.champion}) concurrently: nothing to do")
    ours = next(h for h in now.history if h.id == op)  # not `now`'s aliases: a later move may follow ours
    how = f"reused {rec.version}" if existing else f"registered {rec.version}"
    return PromoteResult(rec.version, model_uri, rec.version, ours.from_, noop=False, reused=bool(existing),
                         message=f"{how}: champion {rec.version}, previous {ours.from_}{registered}")


def _register_kubeflow(cfg: CafeConfig, root: str, rec: VersionRecord, cand: _Candidate, decision: Decision,
                       decision_uri: str, champion_now: str | None) -> str:
    """Register the committed version in the Kubeflow Model Registry when one is configured; "" otherwise,
    else "; " + the registry's account. Its failure refuses the promotion before any alias moves."""
    kf = cfg.registry.kubeflow
    if kf is None:
        return ""
    from cafe_core.model.locate import MODEL_DIR
    from cafe_core.model_registry import KubeflowRegistryError, VersionEntry, metadata_for, register

    prefix = version_prefix(root, rec.version)
    model_uri = join(prefix, CHECKPOINT_DIR)
    if any(e.name == f"{MODEL_DIR}/config.json" for e in cand.manifest.entries):
        model_uri = join(model_uri, MODEL_DIR)  # a `cafe train` output: the Hugging Face folder inside
    metadata = metadata_for(
        metrics=json.loads(cand.metrics_bytes).get("metrics", {}), decision_uri=join(prefix, DECISION_FILE),
        gate_decision_uri=decision_uri, checkpoint_digest=cand.digest, run_id=decision.run_id,
        code_version=code_version(), gate_code_version=decision.code_version, config_digest=decision.config_digest,
        s3_version=rec.version, source_model_uri=cand.model_uri)
    entry = VersionEntry(cfg.registry.model_name, rec.version, model_uri, metadata=metadata,
                         description=f"cafe {rec.version}: run {decision.run_id}, gate PASS at {decision.time}")
    try:
        return f"; {register(kf, entry)}"
    except KubeflowRegistryError as e:
        raise PromoteError(f"{e}; nothing was promoted: the champion is still {champion_now or 'none'}; promote "
                           f"again once the registry takes it ({rec.version} is committed in S3 and is "
                           "reused)") from None


def _moved(decision_uri: str, gated: str | None, now: str | None) -> PromoteError:
    return PromoteError(f"the champion moved since {decision_uri} was made (gated against {gated or 'no champion'}, "
                        f"champion now {now}): run cafe gate again so the candidate is compared with {now}")


# --- rollback ----------------------------------------------------------------------------------------


def rollback(cfg: CafeConfig, store: Storage) -> RollbackResult:
    """champion <- previous and previous <- the demoted champion, in one compare-and-swap (the S3 aliases; a
    Kubeflow Model Registry keeps both versions registered as they are)."""
    root = registry_root(cfg)
    op = uuid.uuid4().hex

    def swap(a: Aliases) -> Aliases:
        if a.champion is None or a.previous is None:
            raise RegistryError(f"{join(root, ALIASES)} has no previous champion to roll back to "
                                f"(champion {a.champion}); promote a decision instead")
        read_version(store, root, a.previous)  # it must still be a committed version
        event = AliasEvent(time=_now(), action="rollback", from_=a.champion, to=a.previous, id=op)
        return Aliases(champion=a.previous, previous=a.champion, history=[*a.history, event])

    now, _ = update_aliases(store, root, swap, op)
    ours = next(h for h in now.history if h.id == op)
    return RollbackResult(champion=ours.to, previous=str(ours.from_),
                          message=f"rolled back: champion {ours.to}, previous {ours.from_}")
