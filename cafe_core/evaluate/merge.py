"""Combine the evaluation families' committed outputs into one metrics file and an HTML report.

Needs no model (no torch): the pipeline's merge task only reads what the family tasks committed.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from cafe_core.commit import MANIFEST, ManifestEntry, OutputWriter, read_manifest, verify_output
from cafe_core.config import CafeConfig
from cafe_core.errors import BadInput
from cafe_core.evaluate.report import render_report
from cafe_core.layout import METRICS_FILE
from cafe_core.model.locate import CheckpointRef, locate
from cafe_core.records import METRICS_KIND
from cafe_core.storage import Storage
from cafe_core.uris import join, sha256_bytes
from cafe_core.version import code_version


class EvaluationError(BadInput, ValueError):
    pass


def header(cfg: CafeConfig, ref: CheckpointRef) -> dict[str, Any]:
    return {"run_id": cfg.run_id, "checkpoint": ref.uri, "checkpoint_digest": ref.digest,
            "embeddings": cfg.evaluate.embeddings,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "code_version": code_version(), "config_digest": cfg.digest()}


def uncommit(store: Storage, prefix: str) -> None:
    manifest = join(prefix, MANIFEST)
    if store.exists(manifest):
        store.delete(manifest)


def merge(cfg: CafeConfig, store: Storage, families: list[str] | None = None) -> dict[str, Any]:
    """Combine the families' committed outputs into `metrics.json` + `report.html`, committed at
    `{evaluate.output}` with a manifest that also lists every family's files."""
    families = families or list(cfg.evaluate.families)
    ref = locate(store, cfg.evaluate.checkpoint)
    base = cfg.evaluate.output
    metrics: dict[str, float] = {}
    sets: dict[str, dict] = {}
    tables, images, entries = [], {}, []
    for family in families:
        prefix = join(base, family)
        manifest = verify_output(store, prefix, read_manifest(store, prefix), checksums=False)
        part = store.read_json(join(prefix, METRICS_FILE))
        if part.get("checkpoint_digest") != ref.digest or part.get("run_id") != cfg.run_id:
            raise EvaluationError(f"{prefix} was computed for another checkpoint or run; run `cafe evaluate --family {family}` again")
        metrics.update(part["metrics"])
        sets.update(part.get("sets", {}))
        tables += [(t["title"], t["header"], t["rows"]) for t in part["tables"]]
        for e in manifest.entries:
            entries.append(e.model_copy(update={"name": f"{family}/{e.name}"}))
            if e.name.endswith(".png"):
                images[f"{family}/{e.name}"] = store.read_bytes(join(prefix, e.name))
        manifest_bytes = store.read_bytes(join(prefix, MANIFEST))
        entries.append(ManifestEntry(name=f"{family}/{MANIFEST}", size=len(manifest_bytes), sha256=sha256_bytes(manifest_bytes)))
    # `sets`: exactly which items each number was computed on (identity.set_identity), for the gate.
    record = {**header(cfg, ref), "families": families, "metrics": dict(sorted(metrics.items())),
              "sets": dict(sorted(sets.items()))}
    out = OutputWriter(store, base, kind=METRICS_KIND)
    for e in entries:
        out.add_uploaded(e)
    out.put_json(METRICS_FILE, record)
    out.put_text("report.html", render_report(record, tables, images))
    out.commit(meta={"families": families, "metrics": len(metrics), "checkpoint_digest": ref.digest})
    return record
