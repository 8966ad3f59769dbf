"""`cafe convert`: training data (LLaVA-OneVision parquet, LLaVA-NeXT JSON, MMEB-train) -> pair shards.

Streams: readers yield records in a fixed order, worker processes check and decode them chunk by chunk
(a bounded window of chunks in flight, answers taken in submission order), and the main process keeps the
global bookkeeping (duplicate ids, exact duplicates) and writes parquet shards as they fill. Memory stays
flat as the input grows, apart from one small key per accepted record for de-duplication.

Output under `data.output`, committed by its manifest:
    pairs/part-00000.parquet ...  id ("<source name>/<id as found>"), source, image (original bytes),
                                  image_sha256, image_format, width, height, caption, conversations;
                                  query_text, query_image, target_text, target_image, negative_text,
                                  negative_image (MMEB-train pairs; those hold null image ... conversations)
    rejects.jsonl                 one line per rejected record: id (as found), source, reason, detail
    stats.json                    input = accepted + rejected + deduped, per reason and per source
    config.yaml                   the resolved configuration
    _MANIFEST.json meta           the counts above, shard_rows (rows of each shard), source_runs ([source,
                                  rows] of consecutive rows), interleaved_rows, negative_rows and
                                  pair_schema (records.PAIR_SCHEMA_VERSION), read by training
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cafe_core.commit import Manifest, OutputWriter
from cafe_core.config import DataConfig
from cafe_core.data import records as R
from cafe_core.data.mmeb_train import MmebRecord, to_interleaved_pair
from cafe_core.data.sources import FileProblem, check_source_names, read_source
from cafe_core.errors import StageFailed
from cafe_core.storage import Storage, StorageError

PAIR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("image", pa.binary()),
        ("image_sha256", pa.string()),
        ("image_format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        # schema version 2: the sides of an interleaved (MMEB-train) pair; null on image-caption pairs
        ("query_text", pa.string()),
        ("query_image", pa.binary()),
        ("target_text", pa.string()),
        ("target_image", pa.binary()),
        ("negative_text", pa.string()),
        ("negative_image", pa.binary()),
    ]
)
PAIRS_DIR = "pairs"
ROW_GROUP_ROWS = 256


class ConvertError(StageFailed, RuntimeError):
    pass


class RejectLimitExceeded(ConvertError):
    pass


# --- worker side -------------------------------------------------------------------------------------

_worker: dict[str, Any] = {}


def _init_worker(limits: R.Limits, store: Storage) -> None:
    _worker["limits"], _worker["store"] = limits, store


def _read_image(uri: str) -> bytes:
    try:
        return _worker["store"].read_bytes(uri)
    except StorageError as e:
        raise R.Reject(R.IMAGE_FILE_MISSING, str(e)) from None


def _check_chunk(chunk: list[R.RawRecord | MmebRecord]) -> list[R.Outcome]:
    limits = _worker["limits"]
    return [
        to_interleaved_pair(rec, limits, _read_image) if isinstance(rec, MmebRecord) else R.to_pair(rec, limits, _read_image)
        for rec in chunk
    ]


def ordered_map(
    fn: Callable, items: Iterable, workers: int, initializer: Callable, initargs: tuple, window: int
) -> Iterator:
    """map() over worker processes with at most `window` items in flight, results in input order."""
    if workers == 0:
        initializer(*initargs)
        yield from map(fn, items)
        return
    ctx = multiprocessing.get_context("spawn")  # no inherited locks or clients from the parent
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# --- main side ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Counts that must always satisfy input = accepted + rejected + deduped, overall and per source."""

    input: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    deduped: Counter = field(default_factory=Counter)
    reasons: dict[str, Counter] = field(default_factory=dict)

    def reject(self, source: str, reason: str) -> None:
        self.rejected[source] += 1
        self.reasons.setdefault(source, Counter())[reason] += 1

    def totals(self) -> dict[str, int]:
        return {k: sum(getattr(self, k).values()) for k in ("input", "accepted", "rejected", "deduped")}

    def balanced(self) -> bool:
        return all(
            self.input[s] == self.accepted[s] + self.rejected[s] + self.deduped[s] for s in self.input
        )

    def by_source(self) -> dict[str, dict]:
        return {
            s: {
                "input": self.input[s], "accepted": self.accepted[s], "rejected": self.rejected[s],
                "deduped": self.deduped[s], "rejected_by_reason": dict(sorted(self.reasons.get(s, {}).items())),
            }
            for s in self.input
        }


class ShardWriter:
    """Buffers rows into row groups and uploads each shard once it is full."""

    def __init__(self, out: OutputWriter, tmp: Path, shard_rows: int):
        self.out, self.tmp, self.shard_rows = out, tmp, shard_rows
        self.names: list[str] = []
        self.counts: dict[str, int] = {}  # name -> rows, committed as manifest meta "shard_rows"
        self._rows: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._in_shard = 0

    def add(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= ROW_GROUP_ROWS or self._in_shard + len(self._rows) >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            self._path = self.tmp / f"part-{len(self.names):05d}.parquet"
            self._writer = pq.ParquetWriter(self._path, PAIR_SCHEMA, compression="zstd")
        self._writer.write_table(pa.Table.from_pylist(self._rows, schema=PAIR_SCHEMA))
        self._in_shard += len(self._rows)
        self._rows = []
        if self._in_shard >= self.shard_rows:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._writer is not None and self._path is not None
        self._writer.close()
        name = f"{PAIRS_DIR}/{self._path.name}"
        self.out.put_file(name, self._path)
        self._path.unlink()
        self.names.append(name)
        self.counts[name] = self._in_shard
        self._writer, self._path, self._in_shard = None, None, 0

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._close_shard()


@dataclass
class ConvertResult:
    output: str
    stats: dict
    manifest: Manifest | None


def _records(cfg: DataConfig, store: Storage, problems: list[FileProblem]) -> Iterator[R.RawRecord | MmebRecord]:
    stream = itertools.chain.from_iterable(read_source(s, store, problems, cfg.seed) for s in cfg.sources)
    return itertools.islice(stream, cfg.max_samples) if cfg.max_samples else stream


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _content_key(o: R.Outcome) -> bytes:
    if o.content_key is not None:
        return o.content_key
    row = o.row
    return hashlib.sha256(row["image_sha256"].encode() + b"\0" + row["caption"].encode()).digest()[:16]


def convert(cfg: DataConfig, store: Storage, config_yaml: str, progress: bool | None = None) -> ConvertResult:
    """Run the conversion; raises RejectLimitExceeded (output left uncommitted) when too much is rejected."""
    started = time.monotonic()
    check_source_names(cfg.sources)  # names namespace the ids: one name, one source
    limits = R.Limits(
        caption_rule=cfg.caption_rule, max_caption_chars=cfg.max_caption_chars, max_id_chars=cfg.max_id_chars,
        max_image_pixels=cfg.max_image_pixels, min_image_side=cfg.min_image_side,
    )
    problems: list[FileProblem] = []
    tally = Tally()
    seen_ids: set[str] = set()  # stored ids, "<source>/<id>": a repeat can only come from the same source
    seen_content: set[bytes] = set()
    source_runs: list[list] = []  # [source, rows] of consecutive accepted rows, in row order
    sides = Counter()  # accepted interleaved rows, and those of them with a hard negative
    out = OutputWriter(store, cfg.output, kind="pairs")
    with tempfile.TemporaryDirectory(prefix="cafe-convert-") as tmp_dir:
        tmp = Path(tmp_dir)
        shards = ShardWriter(out, tmp, cfg.shard_rows)
        rejects_path = tmp / "rejects.jsonl"
        with open(rejects_path, "w") as rejects, tqdm(
            unit=" records", desc="convert", disable=None if progress is None else not progress
        ) as bar:  # None: shown on a terminal only

            def reject(o: R.Outcome, reason: str, detail: str) -> None:
                tally.reject(o.source, reason)
                line = {"id": str(o.id)[:300], "source": o.source, "reason": reason, "detail": detail}
                rejects.write(json.dumps(line, ensure_ascii=True) + "\n")

            results = ordered_map(
                _check_chunk, _chunks(_records(cfg, store, problems), cfg.chunk_records),
                workers=cfg.workers, initializer=_init_worker, initargs=(limits, store),
                window=2 * max(cfg.workers, 1) + 2,
            )
            for outcomes in results:
                for o in outcomes:
                    tally.input[o.source] += 1
                    if o.row is None:
                        reject(o, o.reason or "unknown", o.detail)
                    elif o.row["id"] in seen_ids:
                        reject(o, R.DUPLICATE_ID, f"id already used by an earlier record of source {o.source!r}")
                    else:
                        seen_ids.add(o.row["id"])
                        key = _content_key(o)
                        if key in seen_content:
                            tally.deduped[o.source] += 1
                        else:
                            seen_content.add(key)
                            tally.accepted[o.source] += 1
                            shards.add(o.row)
                            sides[R.INTERLEAVED_ROWS] += o.row.get("query_text") is not None
                            sides[R.NEGATIVE_ROWS] += o.row.get("negative_text") is not None
                            if source_runs and source_runs[-1][0] == o.source:
                                source_runs[-1][1] += 1
                            else:
                                source_runs.append([o.source, 1])
                bar.update(len(outcomes))
        shards.close()
        totals = tally.totals()
        if not tally.balanced():  # a bookkeeping bug, never a data problem
            raise ConvertError(f"internal error: counts do not add up: {totals}")
        n = totals["input"]
        stats = {
            **totals,
            "reject_rate": totals["rejected"] / n if n else 0.0,
            "duplicate_rate": totals["deduped"] / n if n else 0.0,
            "rejected_by_reason": dict(sorted(sum(tally.reasons.values(), Counter()).items())),
            "by_source": tally.by_source(),
            "files": {"unreadable": [vars(p) for p in problems]},
            "shards": len(shards.names),
            R.INTERLEAVED_ROWS: sides[R.INTERLEAVED_ROWS],
            R.NEGATIVE_ROWS: sides[R.NEGATIVE_ROWS],
            "caption_rule": cfg.caption_rule,
            "max_reject_rate": cfg.max_reject_rate,
            "elapsed_s": round(time.monotonic() - started, 3),
        }
        stats["records_per_s"] = round(n / stats["elapsed_s"], 1) if stats["elapsed_s"] else None
        failure = _failure(stats, cfg)
        stats["status"] = f"failed: {failure}" if failure else "committed"
        out.put_file("rejects.jsonl", rejects_path)
        out.put_json("stats.json", stats)
        out.put_text("config.yaml", config_yaml)
        if failure:
            error = RejectLimitExceeded if n else ConvertError
            raise error(f"{failure}; nothing was committed. See {out.uri('rejects.jsonl')} and {out.uri('stats.json')}")
        counted = ("input", "accepted", "rejected", "deduped", "shards", R.INTERLEAVED_ROWS, R.NEGATIVE_ROWS)
        meta = {k: stats[k] for k in counted}
        # Rows per shard and the source of every row: training maps row indices to shards and draws its
        # held-out pairs from every source without downloading the shards first.
        manifest = out.commit(meta={
            **meta, R.SHARD_ROWS: shards.counts, R.SOURCE_RUNS: source_runs, R.PAIR_SCHEMA: R.PAIR_SCHEMA_VERSION,
        })
    return ConvertResult(output=out.prefix, stats=stats, manifest=manifest)


def _failure(stats: dict, cfg: DataConfig) -> str | None:
    if stats["input"] == 0:
        unreadable = "; ".join(f"{p['uri']}: {p['error']}" for p in stats["files"]["unreadable"][:5])
        return "no records were read from any source" + (f" (unreadable: {unreadable})" if unreadable else "")
    if stats["reject_rate"] > cfg.max_reject_rate:
        top = ", ".join(f"{k}={v}" for k, v in Counter(stats["rejected_by_reason"]).most_common(3))
        return (
            f"reject rate {stats['reject_rate']:.2%} ({stats['rejected']} of {stats['input']}) is over the limit "
            f"data.max_reject_rate={cfg.max_reject_rate:.2%} (most common: {top})"
        )
    return None


def summary(stats: dict) -> str:
    lines = [
        f"input {stats['input']} = accepted {stats['accepted']} + rejected {stats['rejected']} "
        f"+ deduped {stats['deduped']}   ({stats['reject_rate']:.2%} rejected, {stats['shards']} shards, "
        f"{stats['records_per_s']} records/s)"
    ]
    for reason, n in stats["rejected_by_reason"].items():
        lines.append(f"  rejected {reason}: {n}")
    for p in stats["files"]["unreadable"]:
        lines.append(f"  unreadable file {p['uri']} (after {p['records_read']} records): {p['error']}")
    return "\n".join(lines)
