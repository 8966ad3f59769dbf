"""VLM2Vec's MMEB-train layout -> interleaved pairs: a query, a target and an optional hard negative, each a
text and/or an image.

Layout (TIGER-Lab/MMEB-train): one table per subset under the source's `uri`, either
`<Subset>/<split>-NNNNN-of-NNNNN.parquet` (the hub's splits are `original` and `diverse_instruction`: the same
pairs with other instructions, so one is read: `split`), other `<Subset>/*.parquet|jsonl` files, or a flat
`<Subset>.parquet|jsonl`; `uri` may also name one such file. String columns: `qry`, `qry_image_path`,
`pos_text`, `pos_image_path`, and optionally `neg_text`, `neg_image_path` (a hard negative). An empty path is
"no image". Paths are relative to the image root (`image_folder`, default the dataset root), as
`images/<Subset>/...`, and may not leave it.

Texts write MMEB's placeholder `<|image_1|>` where the image goes (Phi-3-V's token). As VLM2Vec does for
LLaVA-style backbones, it becomes the backbone's `<image>`. A side with an image but no placeholder gets
`<image>\\n` in front of its text: what the project's interleaved inputs do (InputBuilder.interleaved_batch),
so the stored text is the one the model reads. A side with neither text nor image is `empty_text` (VLM2Vec
skips such rows silently); a placeholder without an image path is `image_token_without_image`.

Pair ids are `<Subset>/<n>`, n counting the subset's records from 0 over its files in name order; every
reject names the file and row, the field and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow.parquet as pq

from cafe_core.config import SourceConfig
from cafe_core.data import records as R
from cafe_core.data.sources import FileProblem, SourceError, image_location
from cafe_core.prompts import IMAGE_TOKEN, MMEB_IMAGE_TOKEN
from cafe_core.storage import Storage, StorageError

TABLE_EXTENSIONS = (".parquet", ".jsonl")
REQUIRED_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
NEGATIVE_COLUMNS = ("neg_text", "neg_image_path")
# (side, text field, image path field): the stored columns are <side>_text and <side>_image.
SIDES = (("query", "qry", "qry_image_path"), ("target", "pos_text", "pos_image_path"),
         ("negative", "neg_text", "neg_image_path"))
BATCH_ROWS = 256
_HF_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")
_NUMBERED_IMAGE = re.compile(r"<\|image_(\d+)\|>")


@dataclass(frozen=True)
class TableFile:
    uri: str
    shown: str  # the path below the dataset root, named in messages
    subset: str
    split: str | None  # None: a flat <Subset>.<ext> file, which has no split


@dataclass
class MmebRecord:
    """One MMEB-train row as read: its cells by column name, where it was found (file and row), and the
    image root its paths are relative to. ``pre_reject``: a problem the reader already found."""

    source: str
    id: str
    where: str
    cells: dict[str, Any] = field(default_factory=dict)
    image_root: str = ""
    pre_reject: tuple[str, str] | None = None


# --- finding the tables --------------------------------------------------------------------------------


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _table_file(root: str, uri: str) -> TableFile | None:
    """The subset and split of a table at `uri` below `root`; None for anything else (images, deeper files)."""
    if not uri.endswith(TABLE_EXTENSIONS):
        return None
    parts = uri[len(root) + 1:].split("/")
    if len(parts) == 1:
        return TableFile(uri, parts[0], _stem(parts[0]), None)
    if len(parts) == 2:
        shard = _HF_SHARD.match(_stem(parts[1]))
        return TableFile(uri, "/".join(parts), parts[0], shard["split"] if shard else _stem(parts[1]))
    return None


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def dataset_root(uri: str) -> str:
    """The folder the subsets live in: `uri` itself, or for one file its folder (<Subset>.<ext>) or its
    folder's parent (<Subset>/<file>, named as the hub names shards)."""
    base = uri.rstrip("/")
    if not base.endswith(TABLE_EXTENSIONS):
        return base
    folder = _parent(base)
    return _parent(folder) if _HF_SHARD.match(_stem(base.rsplit("/", 1)[-1])) else folder


def table_files(src: SourceConfig, store: Storage) -> list[TableFile]:
    """The tables to read, subset by subset (the configured order, else by name), each subset's in name
    order. With `subsets` only their folders and files are listed, not the whole root (which may hold the
    images)."""
    where = f"source {src.name!r} (format mmeb_train)"
    base, root = src.uri.rstrip("/"), dataset_root(src.uri)
    if base.endswith(TABLE_EXTENSIONS):
        if not store.exists(base):
            raise SourceError(f"{where}: {base} does not exist (check data.sources[].uri)")
        uris = [base]
    elif src.subsets:
        uris = []
        for subset in src.subsets:
            uris += [o.uri for o in store.list(f"{base}/{subset}")]
            uris += [u for u in (f"{base}/{subset}{ext}" for ext in TABLE_EXTENSIONS) if store.exists(u)]
    else:
        uris = [o.uri for o in store.list(base)]
    tables = [t for t in (_table_file(root, u) for u in sorted(set(uris))) if t is not None]
    found = sorted({t.subset for t in tables})
    missing = [s for s in src.subsets or [] if s not in found]
    if missing:
        raise SourceError(f"{where}: subset(s) {missing} not found under {base} (found: {found}); "
                          "fix: data.sources[].subsets names folders <Subset>/ or files <Subset>.parquet|jsonl")
    if not tables:
        raise SourceError(
            f"{where}: no <Subset>/*.parquet|jsonl or <Subset>.parquet|jsonl under {base} "
            "(check data.sources[].uri)"
        )
    order = src.subsets or found
    chosen = []
    for subset in order:
        mine = [t for t in tables if t.subset == subset]
        splits = sorted({t.split for t in mine if t.split is not None})
        if src.split is not None:
            mine = [t for t in mine if t.split in (None, src.split)]
            if not mine:
                raise SourceError(f"{where}: subset {subset!r} has no files of split {src.split!r}; "
                                  f"its splits: {splits}")
        elif len(splits) > 1:
            raise SourceError(
                f"{where}: subset {subset!r} holds the splits {splits}; set data.sources[].split to one of them "
                "(VLM2Vec trains on 'original'; 'diverse_instruction' repeats the pairs with other instructions)"
            )
        chosen += mine
    return chosen


# --- reading rows --------------------------------------------------------------------------------------


def _parquet_rows(path: str) -> Iterator[tuple[str, dict]]:
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"missing column(s) {missing}; expected {list(REQUIRED_COLUMNS)} "
                         f"(+ optional {list(NEGATIVE_COLUMNS)})")
    columns = [*REQUIRED_COLUMNS, *(c for c in NEGATIVE_COLUMNS if c in names)]
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        for cells in batch.to_pylist():
            yield f"row {row}", cells
            row += 1


def _jsonl_rows(text: str) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"line {number}", e


def read_mmeb_train(src: SourceConfig, store: Storage, problems: list[FileProblem]) -> Iterator[MmebRecord]:
    """Every row of the chosen tables as an MmebRecord; a table that cannot be read (or lacks a required
    column) is a FileProblem and the others are still read."""
    image_root = (src.image_folder or dataset_root(src.uri)).rstrip("/")
    counters: dict[str, int] = {}
    for table in table_files(src, store):
        read = 0
        try:
            if table.uri.endswith(".jsonl"):
                rows = _jsonl_rows(store.read_text(table.uri))
                for at, cells in rows:
                    read += 1
                    yield _record(src, table, at, cells, image_root, counters)
            else:
                with store.local_copy(table.uri) as path:
                    for at, cells in _parquet_rows(str(path)):
                        read += 1
                        yield _record(src, table, at, cells, image_root, counters)
        except (OSError, ValueError, StorageError, UnicodeDecodeError) as e:  # pyarrow's ArrowInvalid is a ValueError
            problems.append(FileProblem(uri=table.uri, error=f"{type(e).__name__}: {e}"[:500], records_read=read))


def _record(src: SourceConfig, table: TableFile, at: str, cells: Any, image_root: str, counters: dict) -> MmebRecord:
    n = counters.get(table.subset, 0)
    counters[table.subset] = n + 1
    rec = MmebRecord(source=src.name, id=f"{table.subset}/{n}", where=f"{table.shown} {at}", image_root=image_root)
    if isinstance(cells, json.JSONDecodeError):
        rec.pre_reject = (R.MALFORMED_RECORD, f"{rec.where}: not JSON ({cells.msg}); fix: one JSON object per line")
    elif not isinstance(cells, dict):
        kind = type(cells).__name__
        rec.pre_reject = (R.MALFORMED_RECORD, f"{rec.where}: a {kind}, not an object; fix: one object per line")
    elif missing := [c for c in REQUIRED_COLUMNS if c not in cells]:
        rec.pre_reject = (R.MALFORMED_RECORD,
                          f"{rec.where}: no field(s) {missing}; fix: give every row {list(REQUIRED_COLUMNS)}")
    else:
        rec.cells = cells
    return rec


# --- checking one record -------------------------------------------------------------------------------


@dataclass
class CheckedSide:
    """One side of a pair as conversion keeps it: the text the model reads, the original image bytes."""

    text: str
    image: bytes | None = None
    image_sha256: str | None = None


def _string(cells: dict, name: str) -> str:
    value = cells.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise R.Reject(R.MALFORMED_RECORD, f"{name} is a {type(value).__name__}; fix: a string (\"\" for none)")
    return value


def placeholders(text: str, name: str) -> str:
    """The text with MMEB's `<|image_1|>` as this project's `<image>`; more than one image is refused."""
    others = sorted({int(n) for n in _NUMBERED_IMAGE.findall(text)} - {1})
    if others:
        raise R.Reject(R.MULTI_IMAGE, f"{name} holds <|image_{others[0]}|>: a side takes one image, <|image_1|>; "
                       "fix: drop the row")
    text = text.replace(MMEB_IMAGE_TOKEN, IMAGE_TOKEN)
    if text.count(IMAGE_TOKEN) > 1:
        raise R.Reject(R.MULTI_IMAGE, f"{name} holds {text.count(IMAGE_TOKEN)} image placeholders: a side takes one; "
                       "fix: drop the row")
    return text


def check_side(
    cells: dict, side: str, text_field: str, path_field: str, image_root: str, limits: R.Limits,
    read_image: Callable[[str], bytes],
) -> CheckedSide:
    text = placeholders(_string(cells, text_field), text_field)
    path = _string(cells, path_field)
    try:
        R.check_no_control_tokens(text, text_field)
    except R.Reject as r:
        raise R.Reject(r.reason, f"{r.detail}; fix: remove it from the text") from None
    if len(text) > limits.max_caption_chars:
        raise R.Reject(R.TEXT_TOO_LONG, f"{text_field} is {len(text)} characters (limit data.max_caption_chars="
                       f"{limits.max_caption_chars})")
    if not text.strip() and not path:
        raise R.Reject(R.EMPTY_TEXT, f"{text_field} and {path_field} are both empty: the {side} has nothing to embed; "
                       "fix: give it a text or an image")
    has_token = IMAGE_TOKEN in text
    if not path:
        if has_token:
            raise R.Reject(R.IMAGE_TOKEN_WITHOUT_IMAGE, f"{text_field} holds {MMEB_IMAGE_TOKEN} but {path_field} is "
                           "empty; fix: give the image path or remove the placeholder")
        return CheckedSide(text)
    location = image_location(image_root, path)
    if location is None:
        raise R.Reject(R.IMAGE_PATH_OUTSIDE_FOLDER, f"{path_field} {path[:200]!r} leaves the image root {image_root}; "
                       "fix: a path relative to it (images/<Subset>/...)")
    try:
        data = read_image(location)
        info = R.inspect_image(data, limits)
    except R.Reject as r:
        fix = (f"put the image there, or point data.sources[].image_folder at the image root (now {image_root})"
               if r.reason == R.IMAGE_FILE_MISSING else "replace the image file or drop the row")
        raise R.Reject(r.reason, f"{path_field} {path[:200]!r}: {r.detail}; fix: {fix}") from None
    if not has_token:
        text = f"{IMAGE_TOKEN}\n{text}"  # as InputBuilder.interleaved_batch places an image without placeholder
    return CheckedSide(text, data, info["image_sha256"])


def content_key(sides: dict[str, CheckedSide | None]) -> bytes:
    h = hashlib.sha256()
    for name, _, _ in SIDES:
        s = sides[name]
        h.update(b"\1" if s is None else s.text.encode() + b"\0" + (s.image_sha256 or "").encode() + b"\0")
    return h.digest()[:16]


def to_interleaved_pair(rec: MmebRecord, limits: R.Limits, read_image: Callable[[str], bytes]) -> R.Outcome:
    """The whole per-record check, query, then target, then negative: the first problem found is reported."""
    try:
        if rec.pre_reject:
            raise R.Reject(*rec.pre_reject)
        rid = R.check_id(rec.id, limits.max_id_chars)
        sides: dict[str, CheckedSide | None] = {}
        for side, text_field, path_field in SIDES:
            absent = not rec.cells.get(text_field) and not rec.cells.get(path_field)
            sides[side] = None if side == "negative" and absent else check_side(
                rec.cells, side, text_field, path_field, rec.image_root, limits, read_image
            )
    except R.Reject as r:
        detail = r.detail if r.detail.startswith(rec.where) else f"{rec.where}: {r.detail}"
        return R.Outcome(source=rec.source, id=rec.id, reason=r.reason, detail=detail)
    row: dict[str, Any] = {"id": R.pair_id(rec.source, rid), "source": rec.source}
    for name, s in sides.items():
        row[f"{name}_text"] = None if s is None else s.text
        row[f"{name}_image"] = None if s is None else s.image
    return R.Outcome(source=rec.source, id=rid, row=row, content_key=content_key(sides))
