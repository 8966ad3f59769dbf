"""The parity record: the files being promoted re-embed a sample of the evaluation items to what was exported
(and so evaluated). Measured where the export ran, on a GPU (the pipeline's verify step after a PASS),
committed next to the gate's decision, and accepted by `cafe promote` on a CI runner that has no GPU
instead of re-embedding there, when it is of the same decision and the same files.

    {gate output}/decision.json, why.md     the gate's committed output
    {gate output}/parity/parity.json        this record, a committed output of its own (_MANIFEST.json)

A new gate decision at the same place deletes the old parity/ folder with the rest of the old output.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from cafe_core.commit import MANIFEST, Manifest, OutputWriter, manifest_digest, read_manifest
from cafe_core.config import CafeConfig, EvalSetsConfig, PromoteConfig, PromptConfig
from cafe_core.errors import StageFailed
from cafe_core.layout import METRICS_FILE
from cafe_core.records import Decision, read_passed_decision
from cafe_core.storage import NotCommittedError, Storage, StorageError
from cafe_core.uris import join, sha256_bytes
from cafe_core.version import code_version

PARITY_DIR = "parity"
PARITY_FILE = "parity.json"
PARITY_KIND = "release-parity"


class ParityError(StageFailed, RuntimeError):
    """The files cannot be released on this evidence: the message names the record and the fix."""


class ParityItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str  # the export's item id
    deviation: float  # |cosine(re-embedded, exported) - 1|


class ParityRecord(BaseModel):
    """`parity.json`: which decision and files were measured, how, and the outcome."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["release-parity"] = PARITY_KIND
    schema_version: int = 1
    decision_uri: str
    decision_sha256: str  # of the decision.json bytes: a new decision at the same URI is another decision
    run_id: str
    checkpoint: str
    checkpoint_digest: str  # sha256 of the checkpoint output's _MANIFEST.json bytes
    files: dict[str, str]  # every file of that output -> its sha256 (the manifest's list)
    export: str
    export_digest: str  # sha256 of the export's _MANIFEST.json bytes
    sample: int  # promote.reembed_sample at measuring time (items asked for)
    items: list[ParityItem]
    max_deviation: float | None  # None: nothing re-embedded (sample 0)
    tolerance: float
    passed: bool
    precision: str  # the dtype the model ran in
    device: str  # where (cuda / cpu)
    code_version: str
    time: str


@dataclass(frozen=True)
class Gated:
    """What a PASS decision measured, re-read and checked to be unchanged."""

    decision_uri: str
    decision: Decision
    decision_sha256: str
    checkpoint: str
    manifest: Manifest
    manifest_sha256: str
    export: str  # the embeddings the judged metrics were computed from


@dataclass(frozen=True)
class Measurement:
    items: list[ParityItem]
    max_deviation: float | None
    export_digest: str
    precision: str
    device: str

    def passed(self, tolerance: float) -> bool:
        return self.max_deviation is None or self.max_deviation <= tolerance  # NaN fails

    def line(self) -> str:
        if self.max_deviation is None:
            return "re-embedding check skipped (promote.reembed_sample=0)"
        return (f"re-embedded {len(self.items)} items from the promoted files: max |cosine - 1| = "
                f"{self.max_deviation:.1e}")


def parity_prefix(decision_uri: str) -> str:
    """Where the record of the decision at `decision_uri` is committed: `{gate output}/parity`."""
    return join(decision_uri.rstrip("/").rpartition("/")[0], PARITY_DIR)


def gated(store: Storage, decision_uri: str) -> Gated:
    """The PASS decision at `decision_uri` and the files it judged, still exactly those: a FAIL, a changed
    checkpoint or changed metrics raise ParityError naming the fix."""
    decision = read_passed_decision(store, decision_uri, ParityError, "released")
    try:
        decision_bytes = store.read_bytes(decision_uri)
    except StorageError as e:
        raise ParityError(f"decision record {decision_uri} unreadable: {e}") from None
    checkpoint = decision.inputs.checkpoint
    try:
        manifest_bytes = store.read_bytes(join(checkpoint, MANIFEST))
        manifest = Manifest.model_validate_json(manifest_bytes)
        metrics_bytes = store.read_bytes(join(decision.inputs.metrics, METRICS_FILE))
    except (StorageError, ValueError) as e:
        raise ParityError(f"what {decision_uri} judged is no longer readable: {e}; evaluate and gate again") from None
    if sha256_bytes(manifest_bytes) != decision.checkpoint_digest:
        raise ParityError(f"{checkpoint} changed since it was gated (manifest digest "
                          f"{sha256_bytes(manifest_bytes)[:12]} != {str(decision.checkpoint_digest)[:12]} in "
                          f"{decision_uri}); evaluate and gate it again")
    if sha256_bytes(metrics_bytes) != decision.metrics_sha256:
        raise ParityError(f"{join(decision.inputs.metrics, METRICS_FILE)} changed since {decision_uri} was made; "
                          "gate again")
    export = json.loads(metrics_bytes).get("embeddings")
    if not export:
        raise ParityError(f"{join(decision.inputs.metrics, METRICS_FILE)} does not say which export it used")
    return Gated(decision_uri, decision, sha256_bytes(decision_bytes), checkpoint, manifest,
                 sha256_bytes(manifest_bytes), export)


def measure(cfg: CafeConfig, store: Storage, checkpoint_uri: str, export_uri: str) -> Measurement:
    """Re-embed promote.reembed_sample items of the export at `export_uri` from the exact committed files of
    `checkpoint_uri` (fresh download, sha256 checked against the manifest), with the sets, prompts and
    precision recorded in the export, and compare with the exported embeddings."""
    from cafe_core.evaluate.export import Embeddings, ExportError, embed_items, iter_items, load_for_inference
    from cafe_core.model.inputs import InputBuilder
    from cafe_core.model.locate import locate, verified_copy

    sample = cfg.promote.reembed_sample
    ref = locate(store, checkpoint_uri)
    emb = Embeddings(store, export_uri)
    if emb.checkpoint_digest != ref.digest:
        raise ExportError(f"the export at {export_uri} is of checkpoint digest {emb.checkpoint_digest}, "
                          f"not of {checkpoint_uri} ({ref.digest}): the embeddings evaluated are not this model's")
    export_digest = manifest_digest(store, export_uri)
    if sample == 0:
        return Measurement([], None, export_digest, "-", "-")
    as_exported = cfg.model_copy(update={"eval_sets": EvalSetsConfig.model_validate(emb.summary["eval_sets"])})
    prompts = PromptConfig.model_validate(emb.summary["prompts"])
    ids = emb.index["id"]
    step = max(1, len(ids) // sample)  # spread over every set and modality in index order
    wanted = set(ids[::step][:sample])
    items = [it for it in iter_items(as_exported, store) if it.id in wanted]  # streamed: the sample is kept
    if len(items) != len(wanted):
        raise ExportError("the evaluation sets changed since the export: some exported items no longer exist")
    with verified_copy(store, ref) as folder:
        model, processor, device = load_for_inference(cfg, store, ref, emb.summary["precision"], folder=folder)
        fresh = embed_items(model, InputBuilder(processor, prompts, emb.summary["max_length"]), items,
                            cfg.export.batch_size, device)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    deviation = ((fresh * emb.get([it.id for it in items])).sum(-1) - 1).abs()
    found = [ParityItem(id=it.id, deviation=float(d)) for it, d in zip(items, deviation)]
    worst = float(deviation.max()) if len(found) else 0.0
    return Measurement(found, worst, export_digest, dtype, device.type)


def record_for(cfg: CafeConfig, g: Gated, m: Measurement) -> ParityRecord:
    tolerance = cfg.promote.reembed_tolerance
    return ParityRecord(
        decision_uri=g.decision_uri, decision_sha256=g.decision_sha256, run_id=g.decision.run_id,
        checkpoint=g.checkpoint, checkpoint_digest=g.manifest_sha256,
        files={e.name: e.sha256 for e in g.manifest.entries}, export=g.export, export_digest=m.export_digest,
        sample=cfg.promote.reembed_sample, items=m.items, max_deviation=m.max_deviation, tolerance=tolerance,
        passed=m.passed(tolerance), precision=m.precision, device=m.device, code_version=code_version(),
        time=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def write(store: Storage, record: ParityRecord) -> str:
    """Commit the record at parity_prefix(its decision); returns the record's URI."""
    out = OutputWriter(store, parity_prefix(record.decision_uri), kind=PARITY_KIND)
    uri = out.put_bytes(PARITY_FILE, (record.model_dump_json(indent=2) + "\n").encode())
    out.commit(meta={"passed": record.passed, "decision_sha256": record.decision_sha256})
    return uri


def read(store: Storage, decision_uri: str) -> tuple[ParityRecord, str] | None:
    """The committed record of this decision's folder and its URI; None when there is none (never measured, or
    a measurement that did not finish). A record that is there but damaged raises ParityError."""
    prefix = parity_prefix(decision_uri)
    uri = join(prefix, PARITY_FILE)
    try:
        manifest = read_manifest(store, prefix)
    except NotCommittedError:
        return None
    except StorageError as e:
        raise ParityError(f"parity record {uri} unreadable: {e}; run the verify step again") from None
    try:
        data = store.read_bytes(uri)
        if manifest.kind != PARITY_KIND or sha256_bytes(data) != manifest.entry(PARITY_FILE).sha256:
            raise StorageError("its content differs from its manifest")
        return ParityRecord.model_validate_json(data), uri
    except (StorageError, ValidationError) as e:
        raise ParityError(f"parity record {uri} unreadable: {e}; run the verify step again for "
                          f"{decision_uri}") from None


def accept(record: ParityRecord, uri: str, g: Gated, promote: PromoteConfig) -> str:
    """The record vouches for exactly these files and this decision, passed, and meets this configuration's
    sample size and tolerance; else ParityError naming what differs and the fix. Returns a one-line account."""
    redo = (f"run the verify step again for {g.decision_uri} (the pipeline's verify-release step, on a GPU), "
            f"or delete {parity_prefix(g.decision_uri)}/ to re-embed during promotion instead")
    if record.decision_sha256 != g.decision_sha256 or record.decision_uri != g.decision_uri:
        raise ParityError(f"parity record {uri} is of another decision ({record.decision_uri}, sha256 "
                          f"{record.decision_sha256[:12]}, not {g.decision_sha256[:12]}): {redo}")
    if record.checkpoint_digest != g.manifest_sha256 or record.checkpoint != g.checkpoint:
        raise ParityError(f"parity record {uri} measured other files ({record.checkpoint}, manifest digest "
                          f"{record.checkpoint_digest[:12]}) than those being promoted ({g.checkpoint}, "
                          f"{g.manifest_sha256[:12]}): {redo}")
    files = {e.name: e.sha256 for e in g.manifest.entries}
    if record.files != files:
        differ = sorted(n for n in files.keys() | record.files.keys() if files.get(n) != record.files.get(n))
        raise ParityError(f"parity record {uri} lists other file sha256s than {g.checkpoint} "
                          f"({', '.join(differ[:3])}): {redo}")
    if not record.passed:
        raise ParityError(f"parity record {uri} FAILED: the re-embedded items differ from the exported embeddings "
                          f"(max |cosine - 1| = {record.max_deviation} > {record.tolerance}): the files are not the "
                          "model that was evaluated; export, evaluate and gate this checkpoint again")
    if record.sample < promote.reembed_sample:
        raise ParityError(f"parity record {uri} re-embedded a sample of {record.sample}, this configuration asks "
                          f"for promote.reembed_sample={promote.reembed_sample}: {redo}")
    if record.max_deviation is not None and not record.max_deviation <= promote.reembed_tolerance:
        raise ParityError(f"parity record {uri}: max |cosine - 1| = {record.max_deviation:.1e} is above this "
                          f"configuration's promote.reembed_tolerance={promote.reembed_tolerance}: {redo}")
    what = ("no items (promote.reembed_sample was 0)" if record.max_deviation is None else
            f"{len(record.items)} items re-embedded on {record.device} ({record.precision}), max |cosine - 1| = "
            f"{record.max_deviation:.1e}")
    return f"parity record {uri} accepted: {what}, of these files (manifest {g.manifest_sha256[:12]})"
