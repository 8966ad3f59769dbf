"""Readers for the training-data formats, streaming RawRecords in a deterministic order.

- LLaVA-OneVision-Data parquet: a folder or S3 prefix of shards (sorted by name); rows `id`, `image`
  (struct with `bytes`, or null), `conversations` (list of {from, value}), `data_source`.
- LLaVA-NeXT: a JSON list (or JSONL) of {id, image: relative path, conversations} plus an image folder, or a
  dataset YAML listing `json_path` + `sampling_strategy` (all | first:N | end:N | random:N, N a count or a
  percentage like 10%; a bare `P%` means random:P%). JSON lists are loaded whole, as the reference does
  (they hold no image bytes); images are read one by one in the workers.
- MMEB-train (VLM2Vec): interleaved query/target/negative rows, read by cafe_core.data.mmeb_train.

A file that cannot be read is reported as a FileProblem and the other files are still read.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pyarrow.parquet as pq
import yaml

from cafe_core.config import SourceConfig
from cafe_core.data.records import IMAGE_PATH_OUTSIDE_FOLDER, MALFORMED_RECORD, MULTI_IMAGE, RawRecord
from cafe_core.errors import BadInput
from cafe_core.storage import Storage, StorageError
from cafe_core.uris import is_s3

PARQUET_COLUMNS = ("id", "image", "conversations")
BATCH_ROWS = 64


@dataclass
class FileProblem:
    uri: str
    error: str
    records_read: int = 0


class SourceError(BadInput, ValueError):
    """The source as configured cannot be read at all (not a per-file problem)."""


# --- LLaVA-OneVision-Data parquet --------------------------------------------------------------------


def _image_bytes(cell: Any) -> bytes | None:
    if cell is None or isinstance(cell, (bytes, bytearray)):
        return cell
    if isinstance(cell, dict):
        return cell.get("bytes")
    return None


def read_onevision(src: SourceConfig, store: Storage, problems: list[FileProblem]) -> Iterator[RawRecord]:
    shards = [o.uri for o in store.list(src.uri) if o.uri.endswith(".parquet")]
    if not shards:
        raise SourceError(f"source {src.name!r}: no .parquet files under {src.uri} (check data.sources[].uri)")
    for uri in shards:
        read = 0
        try:
            with store.local_copy(uri) as path:
                pf = pq.ParquetFile(path)
                missing = [c for c in PARQUET_COLUMNS if c not in pf.schema_arrow.names]
                if missing:
                    raise ValueError(f"missing column(s) {missing}; expected {list(PARQUET_COLUMNS)}")
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(PARQUET_COLUMNS)):
                    for row in batch.to_pylist():
                        read += 1
                        yield RawRecord(
                            source=src.name, id=row["id"], conversations=row["conversations"],
                            image=_image_bytes(row["image"]),
                        )
        except (OSError, ValueError, StorageError) as e:  # pyarrow raises ArrowInvalid (a ValueError)
            problems.append(FileProblem(uri=uri, error=f"{type(e).__name__}: {e}"[:500], records_read=read))


# --- LLaVA-NeXT JSON + image folder ------------------------------------------------------------------


def parse_strategy(strategy: str, n: int, seed: int) -> list[int]:
    """Indices kept by a LLaVA-NeXT sampling strategy, in input order."""
    s = str(strategy).strip()
    if s == "all":
        return list(range(n))
    if s.endswith("%") and ":" not in s:
        s = f"random:{s}"
    kind, _, amount = s.partition(":")
    if kind not in ("first", "end", "random") or not amount:
        raise SourceError(f"sampling_strategy {strategy!r}: expected all | first:N | end:N | random:N | P%")
    try:
        k = math.ceil(float(amount[:-1]) * n / 100) if amount.endswith("%") else int(amount)
    except ValueError:
        raise SourceError(f"sampling_strategy {strategy!r}: {amount!r} is not a count or a percentage") from None
    if k < 0:
        raise SourceError(f"sampling_strategy {strategy!r}: the amount must not be negative")
    k = min(k, n)
    if kind == "first":
        return list(range(k))
    if kind == "end":
        return list(range(n - k, n))
    return sorted(random.Random(seed).sample(range(n), k))


def _resolve(base_file: str, path: str) -> str:
    if is_s3(path) or Path(path).is_absolute():
        return path
    parent = base_file.rsplit("/", 1)[0] if "/" in base_file else "."
    return f"{parent}/{path}"


def _load_entries(uri: str, store: Storage) -> list[Any]:
    text = store.read_text(uri)
    if uri.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"top level is a {type(data).__name__}, expected a list of records")
    return data


def image_location(folder: str, rel: str) -> str | None:
    """Where a JSON record's image lives, or None when the path would leave the image folder."""
    if not rel or rel.startswith(("/", "\\")) or "\x00" in rel or "\\" in rel or is_s3(rel):
        return None
    if is_s3(folder):
        if ".." in PurePosixPath(rel).parts:
            return None
        return f"{folder.rstrip('/')}/{rel}"
    root = Path(folder).resolve()
    target = (root / rel).resolve()  # follows symlinks: a link pointing outside is caught too
    return str(target) if target.is_relative_to(root) else None


def _llava_next_record(src: SourceConfig, entry: Any, folder: str) -> RawRecord:
    if not isinstance(entry, dict):
        kind = type(entry).__name__
        return RawRecord(source=src.name, id=None, conversations=None, pre_reject=(MALFORMED_RECORD, f"a {kind}, not an object"))
    rec = RawRecord(source=src.name, id=entry.get("id"), conversations=entry.get("conversations"))
    image = entry.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            rec.pre_reject = (MULTI_IMAGE, f"{len(image)} images; pairs take exactly one")
            return rec
        image = image[0]
    if image is None:
        return rec  # no image: rejected as missing_image by the record check
    if not isinstance(image, str):
        rec.pre_reject = (IMAGE_PATH_OUTSIDE_FOLDER, f"image is a {type(image).__name__}, expected a relative path")
        return rec
    location = image_location(folder, image)
    if location is None:
        rec.pre_reject = (IMAGE_PATH_OUTSIDE_FOLDER, f"image path {image[:200]!r} leaves the image folder")
    else:
        rec.image_uri = location
    return rec


def read_llava_next(
    src: SourceConfig, store: Storage, problems: list[FileProblem], seed: int
) -> Iterator[RawRecord]:
    if src.uri.endswith((".yaml", ".yml")):
        try:
            spec = yaml.safe_load(store.read_text(src.uri)) or {}
        except (yaml.YAMLError, StorageError) as e:
            raise SourceError(f"source {src.name!r}: cannot read dataset YAML {src.uri}: {e}") from None
        datasets = spec.get("datasets") if isinstance(spec, dict) else None
        if not isinstance(datasets, list) or not all(isinstance(d, dict) and "json_path" in d for d in datasets):
            raise SourceError(
                f"source {src.name!r}: {src.uri} must hold 'datasets:' as a list of {{json_path, sampling_strategy}}"
            )
        files = [(_resolve(src.uri, str(d["json_path"])), str(d.get("sampling_strategy", "all"))) for d in datasets]
    else:
        files = [(src.uri, "all")]
    for uri, strategy in files:
        folder = src.image_folder or (uri.rsplit("/", 1)[0] if "/" in uri else ".")
        try:
            entries = _load_entries(uri, store)
        except (ValueError, StorageError, UnicodeDecodeError) as e:
            problems.append(FileProblem(uri=uri, error=f"{type(e).__name__}: {e}"[:500]))
            continue
        for i in parse_strategy(strategy, len(entries), seed):
            yield _llava_next_record(src, entries[i], folder)


def check_source_names(sources: list[SourceConfig]) -> None:
    """Source names namespace the pair ids ("<name>/<id>") and the per-source counts: each must be unique."""
    first: dict[str, int] = {}
    for i, src in enumerate(sources):
        if src.name in first:
            raise SourceError(
                f"data.sources.{i}.name={src.name!r} is also the name of data.sources.{first[src.name]}: "
                "each source needs its own name (it prefixes the ids of its pairs)"
            )
        first[src.name] = i


def read_source(src: SourceConfig, store: Storage, problems: list[FileProblem], seed: int) -> Iterator[Any]:
    """RawRecords (image-caption sources) or MmebRecords (mmeb_train)."""
    if src.format == "onevision_parquet":
        return read_onevision(src, store, problems)
    if src.format == "mmeb_train":
        from cafe_core.data.mmeb_train import read_mmeb_train  # it builds on this module's helpers

        return read_mmeb_train(src, store, problems)
    return read_llava_next(src, store, problems, seed)
