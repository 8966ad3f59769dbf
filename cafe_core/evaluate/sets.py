"""Load the evaluation sets from their real benchmarks' file formats (local folders or ``s3://`` prefixes).

- Retrieval: Flickr30K 1K test / MSCOCO 5K test as on the HF hub (``nlphuji/flickr_1k_test_image_text_retrieval``):
  parquet shards with ``image`` {bytes, path}, ``caption`` (list), and optionally ``img_id``, ``filename``,
  ``sentids``.
- MMEB (``TIGER-Lab/MMEB-eval``): ``<Dataset>/*.parquet`` with ``qry_text``, ``qry_img_path``, ``tgt_text``
  (list), ``tgt_img_path`` (list); candidate 0 is the positive; image paths are relative to the MMEB folder
  or to its ``images/`` folder (where MMEB's ``images.zip`` unpacks).
- POPE: ``*_pope_{random,popular,adversarial}.json``, JSON lines ``{question_id, image, text, label}``, images
  in ``images/`` (or ``image_folder``).
- Caption hallucination (THRONE/CHAIR style): ``images/``, ``annotations.jsonl`` ``{image, objects}``,
  ``vocabulary.json`` (classes with their synonyms).
- Multiple choice (MMStar): parquet with ``index``, ``question`` (options inside), ``image``, ``answer``
  (a letter), ``category``.

``max_items`` keeps the first N images (retrieval, caption), rows (MMEB, per dataset) or questions (POPE,
per split; multiple choice), in file order, so a quick run is a prefix of the full one. Every problem raises
``EvalSetError`` naming the file, the record and the field, and saying how to fix it.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cafe_core.errors import BadInput
from cafe_core.prompts import IMAGE_TOKEN
from cafe_core.storage import Storage, StorageError
from cafe_core.uris import is_s3, join

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
MMEB_META_TASKS: tuple[str, ...] = ("Classification", "VQA", "Retrieval", "Grounding")
MMEB_SPLITS: tuple[str, ...] = ("IND", "OOD")
# MMEB writes Phi-3-V's placeholder; the LLaVA-OneVision prompt uses "<image>".
_MMEB_IMAGE_TOKEN = re.compile(r"<\|image_\d+\|>")

# The 36 MMEB-eval datasets (VLM2Vec, Jiang et al. 2024, Table 1) in the paper's order. In-distribution are
# the 20 datasets of MMEB-train (VLM2Vec's training subset list); the other 16 are out-of-distribution. The
# brief listed 15 OOD names; the 16th is RefCOCO: MSCOCO is the only grounding set in MMEB-train.
MMEB_DATASETS: dict[str, tuple[str, str]] = {
    **{n: ("Classification", "IND") for n in ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397")},
    **{n: ("Classification", "OOD") for n in ("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211")},
    **{n: ("VQA", "IND") for n in ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W")},
    **{n: ("VQA", "OOD") for n in ("ScienceQA", "VizWiz", "GQA", "TextVQA")},
    **{n: ("Retrieval", "IND") for n in ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i",
                                         "MSCOCO_i2t", "NIGHTS", "WebQA")},
    **{n: ("Retrieval", "OOD") for n in ("FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS")},
    "MSCOCO": ("Grounding", "IND"),
    **{n: ("Grounding", "OOD") for n in ("RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing")},
}


class EvalSetError(BadInput, ValueError):
    """An evaluation set is missing or malformed; the message names the file, record, field and the fix."""


# --- the sets ----------------------------------------------------------------------------------------


@dataclass
class RetrievalSet:
    name: str
    image_ids: list[str]
    images: list[bytes]
    captions: list[str]  # flattened, image by image
    caption_image: np.ndarray  # int64, index into images of each caption
    caption_ids: list[str]  # sentids where the file has them, else "<image_id>#<k>"


@dataclass
class MmebRow:
    qry_text: str  # MMEB's qry_text (it already starts with the instruction), "<image>" placeholder
    qry_image: bytes | None
    candidates: list[tuple[str, bytes | None]]  # (text, image); candidate 0 is the positive


@dataclass
class MmebDataset:
    name: str
    meta_task: str  # one of MMEB_META_TASKS
    split: str  # "IND" or "OOD"
    rows: list[MmebRow]


@dataclass
class PopeQuestion:
    question_id: int | str
    image_name: str
    image: bytes
    question: str
    label: str  # "yes" or "no"


@dataclass
class CaptionSet:
    image_names: list[str]
    images: list[bytes]
    objects: list[frozenset[str]]  # ground-truth classes per image
    vocabulary: dict[str, tuple[str, ...]]  # class -> phrases naming it (the class name first)

    @property
    def classes(self) -> list[str]:
        return list(self.vocabulary)


@dataclass
class ChoiceQuestion:
    index: str
    question: str  # with the options ("A: ... B: ..."), as the set writes it
    image: bytes
    answer: str  # the correct letter
    category: str
    options: str  # the option letters found in the question, e.g. "ABCD"


# --- shared helpers ----------------------------------------------------------------------------------


def _folder(uri: str) -> str:
    """A folder URI in the spelling ``Storage.list`` returns for its contents (relative names are cut from it)."""
    return uri.rstrip("/") if is_s3(uri) else str(Path(uri))


def _error(where: str, field: str, problem: str, fix: str) -> EvalSetError:
    return EvalSetError(f"{where}: field {field!r}: {problem}; fix: {fix}")


def _check_image(data: Any, where: str, field: str) -> bytes:
    """Non-empty bytes whose header an image decoder recognises (a cheap check: nothing is decoded)."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise _error(where, field, "no image bytes", "provide the image (bytes, or a path that exists)")
    try:
        Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - PIL raises several types for unrecognised data
        raise _error(where, field, f"not a readable image ({type(e).__name__})", "replace the corrupt image") from None
    return bytes(data)


def _read_image(store: Storage, uri: str, where: str, field: str, fix: str) -> bytes:
    try:
        data = store.read_bytes(uri)
    except StorageError:
        raise _error(where, field, f"image {uri} does not exist", fix) from None
    return _check_image(data, where, field)


def _parquet_files(store: Storage, uri: str, layout: str) -> list[str]:
    files = [o.uri for o in store.list(uri) if o.uri.endswith(".parquet")]
    if not files:
        raise EvalSetError(f"{uri}: no .parquet files found; fix: point the set at a folder holding {layout}")
    return files


def _parquet_rows(
    store: Storage, uri: str, required: tuple[str, ...], optional: tuple[str, ...], limit: int | None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number, record) of one parquet file, reading only the needed columns and stopping at ``limit``."""
    if limit is not None and limit <= 0:
        return
    with store.local_copy(uri) as path:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise EvalSetError(f"{uri}: not a readable parquet file ({e}); fix: replace the file") from None
        names = pf.schema_arrow.names
        for column in required:
            if column not in names:
                raise EvalSetError(f"{uri}: missing column {column!r} (it has {names}); fix: use the "
                                   f"benchmark's own layout, with columns {list(required)}")
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=[c for c in (*required, *optional) if c in names]):
            for record in batch.to_pylist():
                yield row, record
                row += 1
                if limit is not None and row >= limit:
                    return


def _limited(max_items: int | None) -> int | None:
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1 or None, not {max_items}")
    return max_items


def _jsonl(store: Storage, uri: str) -> Iterator[tuple[int, Any]]:
    """(line number, record) of a JSON-lines file; a file holding one JSON list is accepted too."""
    try:
        text = store.read_text(uri)
    except StorageError:
        raise EvalSetError(f"{uri} does not exist; fix: provide it, or point the set at the right folder") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise EvalSetError(f"{uri}: not valid JSON ({e}); fix: repair the file") from None
        yield from enumerate(records, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalSetError(f"{uri} line {number}: not valid JSON ({e.msg}); fix: one JSON object per line") from None


def _string(record: dict[str, Any], key: str, where: str, fix: str) -> str:
    value = record.get(key) if isinstance(record, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise _error(where, key, f"missing or empty (got {value!r})", fix)
    return value


# --- retrieval ---------------------------------------------------------------------------------------

_RETRIEVAL_LAYOUT = "Flickr30K/MSCOCO test parquet (columns image {bytes, path} and caption list)"


def load_retrieval(store: Storage, uri: str, name: str, max_items: int | None = None) -> RetrievalSet:
    """Images with several captions each; ``max_items`` keeps the first N images (all of their captions)."""
    limit = _limited(max_items)
    image_ids: list[str] = []
    seen: set[str] = set()
    images: list[bytes] = []
    captions: list[str] = []
    caption_image: list[int] = []
    caption_ids: list[str] = []
    for file in _parquet_files(store, uri, _RETRIEVAL_LAYOUT):
        remaining = None if limit is None else limit - len(images)
        for row, rec in _parquet_rows(store, file, ("image", "caption"), ("img_id", "filename", "sentids"), remaining):
            where = f"{file} row {row}"
            image_id = next((str(rec[k]) for k in ("img_id", "filename") if rec.get(k) not in (None, "")),
                            f"{file.rsplit('/', 1)[-1]}:{row}")
            where = f"{where} (image {image_id})"
            if image_id in seen:
                raise _error(where, "img_id", "duplicate image id", "give every image its own img_id")
            images.append(_retrieval_image(store, uri, rec["image"], where))
            texts = rec["caption"]
            texts = [texts] if isinstance(texts, str) else texts
            if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise _error(where, "caption", f"needs a non-empty list of non-empty strings, got {texts!r}",
                             "drop the image or add its captions")
            sentids = rec.get("sentids") or []
            if len(sentids) != len(texts):
                sentids = [f"{image_id}#{k}" for k in range(len(texts))]
            image_ids.append(image_id)
            seen.add(image_id)
            captions.extend(texts)
            caption_ids.extend(str(s) for s in sentids)
            caption_image.extend([len(images) - 1] * len(texts))
        if limit is not None and len(images) >= limit:
            break
    return RetrievalSet(name, image_ids, images, captions, np.asarray(caption_image, dtype=np.int64), caption_ids)


def _retrieval_image(store: Storage, uri: str, value: Any, where: str) -> bytes:
    # The HF Image feature is a struct {bytes, path}; bytes are normally embedded, else the path is read
    # relative to the set's folder (or its images/ folder).
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        path = value["path"]
        for base in (uri, join(uri, "images")):
            try:
                return _check_image(store.read_bytes(join(base, path)), where, "image")
            except (StorageError, EvalSetError):
                continue
        raise _error(where, "image.path", f"no embedded bytes and {path!r} is not under {uri} or {uri}/images",
                     "embed the image bytes or put the file there")
    return _check_image(value.get("bytes") if isinstance(value, dict) else value, where, "image")


# --- MMEB --------------------------------------------------------------------------------------------


def load_mmeb(store: Storage, uri: str, max_items: int | None = None) -> list[MmebDataset]:
    """Every dataset of an MMEB-eval folder; ``max_items`` keeps the first N rows of each."""
    return list(iter_mmeb(store, uri, max_items))


def iter_mmeb(store: Storage, uri: str, max_items: int | None = None) -> Iterator[MmebDataset]:
    """The datasets of an MMEB-eval folder one at a time, each read when asked for: at MMEB's size (36
    datasets of up to 1,000 x 1,000 candidates) only one is held in memory. The listing is checked first."""
    limit = _limited(max_items)
    base = _folder(uri)
    names = [o.uri[len(base) + 1:] for o in store.list(base)]
    known = set(names)
    folders: dict[str, list[str]] = {}
    for rel in names:
        parts = rel.split("/")
        if rel.endswith(".parquet") and len(parts) >= 2 and parts[0] != "images":
            folders.setdefault(parts[0], []).append(join(base, rel))
    listing = _mmeb_listing(store, base, known, folders)
    return (_mmeb_dataset(store, base, known, folders[name], name, meta_task, split, limit)
            for name, meta_task, split in listing)


def _mmeb_dataset(store: Storage, base: str, known: set[str], files: list[str], name: str, meta_task: str, split: str,
                  limit: int | None) -> MmebDataset:
    images: dict[str, bytes] = {}  # shared by the dataset's rows: one read (and one bytes object) per image
    # One object per distinct candidate: MMEB repeats each of a dataset's candidates in up to ~1,000 rows, and
    # a million copies of their strings would be most of the memory evaluation needs.
    pool: dict[tuple[str, bytes | None], tuple[str, bytes | None]] = {}
    rows: list[MmebRow] = []
    for file in files:
        remaining = None if limit is None else limit - len(rows)
        for row, rec in _parquet_rows(store, file, ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path"),
                                      (), remaining):
            parsed = _mmeb_row(store, base, known, images, rec, f"{file} (dataset {name}) row {row}")
            parsed.candidates = [pool.setdefault(c, c) for c in parsed.candidates]
            rows.append(parsed)
        if limit is not None and len(rows) >= limit:
            break
    return MmebDataset(name, meta_task, split, rows)


def _mmeb_listing(store: Storage, base: str, known: set[str], folders: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """(name, meta_task, split) per dataset: from datasets.json when present, else the folders with parquet
    files, described by the built-in table of the 36 MMEB-eval datasets."""
    fix = ("list it in datasets.json as {\"name\": ..., \"meta_task\": one of " + f"{list(MMEB_META_TASKS)}, "
           "\"split\": \"IND\" or \"OOD\"}, or remove its folder")
    if "datasets.json" in known:
        doc_uri = join(base, "datasets.json")
        try:
            doc = store.read_json(doc_uri)
        except json.JSONDecodeError as e:
            raise EvalSetError(f"{doc_uri}: not valid JSON ({e}); fix: repair the file") from None
        entries = doc.get("datasets") if isinstance(doc, dict) else doc
        if not isinstance(entries, list) or not entries:
            raise EvalSetError(f"{doc_uri}: expected {{\"datasets\": [...]}} with at least one entry; fix: {fix}")
        listing = []
        for k, entry in enumerate(entries):
            where = f"{doc_uri} entry {k}"
            name = _string(entry, "name", where, fix)
            table = MMEB_DATASETS.get(name, (None, None))
            meta_task = _pick(entry.get("meta_task") or table[0], MMEB_META_TASKS, f"{where} ({name})", "meta_task", fix)
            split = _pick(entry.get("split") or table[1], MMEB_SPLITS, f"{where} ({name})", "split", fix)
            if name not in folders:
                raise EvalSetError(f"{where}: dataset {name!r} has no parquet files under {base}/{name}/; fix: "
                                   "add its test parquet there or remove the entry")
            listing.append((name, meta_task, split))
        return listing
    if not folders:
        raise EvalSetError(f"{base}: no <Dataset>/*.parquet found; fix: point mmeb at an MMEB-eval folder")
    order = list(MMEB_DATASETS)
    for name in folders:
        if name not in MMEB_DATASETS:
            raise EvalSetError(f"{base}/{name}: unknown MMEB dataset {name!r} and no datasets.json; fix: {fix}")
    return [(n, *MMEB_DATASETS[n]) for n in sorted(folders, key=order.index)]


def _pick(value: Any, allowed: tuple[str, ...], where: str, field: str, fix: str) -> str:
    """``value`` matched case-insensitively against ``allowed``, returned in its canonical spelling."""
    for option in allowed:
        if isinstance(value, str) and value.lower() == option.lower():
            return option
    raise _error(where, field, f"{value!r} is not one of {list(allowed)}", fix)


def _mmeb_row(
    store: Storage, base: str, known: set[str], images: dict[str, bytes], rec: dict[str, Any], where: str
) -> MmebRow:
    texts, paths = rec["tgt_text"], rec["tgt_img_path"]
    if not isinstance(texts, list) or not texts:
        raise _error(where, "tgt_text", f"needs a non-empty list of candidates, got {texts!r}", "repair the row")
    paths = [""] * len(texts) if paths is None else paths
    if not isinstance(paths, list) or len(paths) != len(texts):
        raise _error(where, "tgt_img_path", f"{len(paths) if isinstance(paths, list) else paths!r} paths for "
                     f"{len(texts)} candidate texts", "give one path (or \"\") per candidate")

    def image(path: Any, field: str) -> bytes | None:
        if not path:
            return None
        return _mmeb_image(store, base, known, images, str(path), where, field)

    def text(value: Any, field: str) -> str:
        if value is not None and not isinstance(value, str):
            raise _error(where, field, f"expected a string, got {type(value).__name__}", "repair the row")
        return _MMEB_IMAGE_TOKEN.sub(IMAGE_TOKEN, value or "")

    qry_text, qry_image = text(rec["qry_text"], "qry_text"), image(rec["qry_img_path"], "qry_img_path")
    if not qry_text.strip() and qry_image is None:
        raise _error(where, "qry_text", "the query has neither text nor image", "repair the row")
    candidates = []
    for k, (t, p) in enumerate(zip(texts, paths)):
        cand = (text(t, f"tgt_text[{k}]"), image(p, f"tgt_img_path[{k}]"))
        if not cand[0].strip() and cand[1] is None:
            raise _error(where, f"tgt_text[{k}]", "the candidate has neither text nor image", "repair the row")
        candidates.append(cand)
    return MmebRow(qry_text, qry_image, candidates)


def _mmeb_image(
    store: Storage, base: str, known: set[str], images: dict[str, bytes], path: str, where: str, field: str
) -> bytes:
    # Paths are relative to the MMEB folder (our layout: images/<Dataset>/...) or to its images/ folder
    # (MMEB-eval's images.zip unpacked there: <Dataset>/...).
    for rel in (path, f"images/{path}"):
        if rel in known:
            uri = join(base, rel)
            if uri not in images:
                images[uri] = _read_image(store, uri, where, field, "replace the image")
            return images[uri]
    raise _error(where, field, f"image {path!r} is not under {base}/ or {base}/images/",
                 "unpack MMEB-eval's images.zip into the images/ folder of the MMEB set")


# --- POPE --------------------------------------------------------------------------------------------

_POPE_FILE = re.compile(r"^(?P<prefix>.+)_pope_(?P<split>random|popular|adversarial)\.json$")


def load_pope(
    store: Storage, uri: str, max_items: int | None = None, image_folder: str | None = None
) -> dict[str, list[PopeQuestion]]:
    """The three POPE splits (all required: ``pope/average`` must mean the same thing in every run);
    ``max_items`` keeps the first N questions of each split."""
    limit = _limited(max_items)
    base = _folder(uri)
    folder = _folder(image_folder) if image_folder else join(base, "images")
    files: dict[str, list[str]] = {split: [] for split in POPE_SPLITS}
    for o in store.list(base):
        rel = o.uri[len(base) + 1:]
        match = _POPE_FILE.match(rel)
        if match and "/" not in rel:
            files[match["split"]].append(o.uri)
    images: dict[str, bytes] = {}  # one read per image across the splits
    out: dict[str, list[PopeQuestion]] = {}
    for split in POPE_SPLITS:
        if len(files[split]) != 1:
            found = files[split] or "none"
            raise EvalSetError(f"{base}: needs exactly one <name>_pope_{split}.json, found {found}; fix: keep one "
                               "POPE dataset (e.g. coco_pope_*.json) per folder")
        questions = []
        for number, rec in _jsonl(store, files[split][0]):
            if limit is not None and len(questions) >= limit:
                break
            questions.append(_pope_question(store, folder, images, rec, f"{files[split][0]} line {number}"))
        if not questions:
            raise EvalSetError(f"{files[split][0]}: no questions; fix: provide the POPE question file")
        out[split] = questions
    return out


def _pope_question(store: Storage, folder: str, images: dict[str, bytes], rec: Any, where: str) -> PopeQuestion:
    fix = 'each line is {"question_id": ..., "image": ..., "text": ..., "label": "yes" or "no"}'
    if not isinstance(rec, dict):
        raise EvalSetError(f"{where}: expected a JSON object; fix: {fix}")
    qid = rec.get("question_id")
    if qid is None or isinstance(qid, (bool, float, dict, list)):
        raise _error(where, "question_id", f"missing or not an id ({qid!r})", fix)
    where = f"{where} (question_id {qid})"
    name, question = _string(rec, "image", where, fix), _string(rec, "text", where, fix)
    label = rec.get("label")
    if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
        raise _error(where, "label", f"{label!r} is not 'yes' or 'no'", fix)
    if name not in images:
        try:
            uri = join(folder, name)
        except StorageError as e:
            raise _error(where, "image", str(e), "use a file name relative to the image folder") from None
        images[name] = _read_image(store, uri, where, "image",
                                   "put the image there or pass image_folder (e.g. the COCO val2014 folder)")
    return PopeQuestion(qid, name, images[name], question, label.strip().lower())


# --- caption hallucination ---------------------------------------------------------------------------


def load_caption_set(store: Storage, uri: str, max_items: int | None = None) -> CaptionSet:
    """Images with their ground-truth object classes and the class vocabulary; ``max_items`` keeps the first
    N images."""
    limit = _limited(max_items)
    base = _folder(uri)
    vocabulary = _vocabulary(store, join(base, "vocabulary.json"))
    names, images, objects = [], [], []
    annotations = join(base, "annotations.jsonl")
    fix = 'each line is {"image": <file under images/>, "objects": [<vocabulary class>, ...]}'
    for number, rec in _jsonl(store, annotations):
        if limit is not None and len(names) >= limit:
            break
        where = f"{annotations} line {number}"
        name = _string(rec, "image", where, fix)
        where = f"{where} (image {name})"
        found = rec.get("objects")
        if not isinstance(found, list) or not all(isinstance(o, str) for o in found):
            raise _error(where, "objects", f"expected a list of class names, got {found!r}", fix)
        unknown = [o for o in found if o not in vocabulary]
        if unknown:
            raise _error(where, "objects", f"{unknown[0]!r} is not a vocabulary class",
                         "add it to vocabulary.json or correct the annotation")
        try:
            uri = join(base, "images", name)
        except StorageError as e:
            raise _error(where, "image", str(e), "use a file name relative to images/") from None
        images.append(_read_image(store, uri, where, "image", "put the image under images/"))
        names.append(name)
        objects.append(frozenset(found))
    if not names:
        raise EvalSetError(f"{annotations}: no images; fix: {fix}")
    return CaptionSet(names, images, objects, vocabulary)


def _vocabulary(store: Storage, uri: str) -> dict[str, tuple[str, ...]]:
    """class -> phrases. Accepts {"classes": [{"name", "synonyms"}]} (ours), {"classes": {name: [...]}} or
    {name: [...]}; the class name is always one of its phrases."""
    fix = 'write {"classes": [{"name": "dog", "synonyms": ["dog", "puppy"]}, ...]}'
    try:
        doc = store.read_json(uri)
    except StorageError:
        raise EvalSetError(f"{uri} does not exist; fix: {fix}") from None
    except json.JSONDecodeError as e:
        raise EvalSetError(f"{uri}: not valid JSON ({e}); fix: {fix}") from None
    classes = doc.get("classes", doc) if isinstance(doc, dict) else None
    if isinstance(classes, list):
        pairs = []
        for k, entry in enumerate(classes):
            name = _string(entry, "name", f"{uri} class {k}", fix)
            pairs.append((name, entry.get("synonyms") or []))
    elif isinstance(classes, dict):
        pairs = list(classes.items())
    else:
        raise EvalSetError(f"{uri}: no class list; fix: {fix}")
    vocabulary: dict[str, tuple[str, ...]] = {}
    for name, synonyms in pairs:
        if not isinstance(synonyms, list) or not all(isinstance(s, str) and s.strip() for s in synonyms):
            raise _error(f"{uri} class {name!r}", "synonyms", f"expected a list of phrases, got {synonyms!r}", fix)
        vocabulary[name] = tuple(dict.fromkeys([name, *synonyms]))
    if not vocabulary:
        raise EvalSetError(f"{uri}: the vocabulary is empty; fix: {fix}")
    return vocabulary


# --- multiple choice ---------------------------------------------------------------------------------

_OPTION = re.compile(r"(?:^|[\s,(])([A-Z])\s*[:.)]\s")


def question_options(question: str) -> str:
    """The option letters a question lists ("A: ..., B: ..."), after "Options:" when present; "ABCD" when
    they are not a run of letters from A."""
    tail = question.rsplit("Options:", 1)[-1]
    letters = "".join(dict.fromkeys(_OPTION.findall(tail)))
    expected = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(letters)]
    return letters if len(letters) >= 2 and letters == expected else "ABCD"


def load_choice(store: Storage, uri: str, name: str, max_items: int | None = None) -> list[ChoiceQuestion]:
    """MMStar-layout multiple choice; ``max_items`` keeps the first N questions."""
    limit = _limited(max_items)
    out: list[ChoiceQuestion] = []
    for file in _parquet_files(store, uri, "MMStar-style parquet (index, question, image, answer, category)"):
        remaining = None if limit is None else limit - len(out)
        for row, rec in _parquet_rows(store, file, ("question", "image", "answer"), ("index", "category"), remaining):
            index = str(rec["index"]) if rec.get("index") is not None else str(len(out))
            where = f"{file} ({name}) row {row} (index {index})"
            question = _string(rec, "question", where, "give every row its question with the options")
            value = rec["image"]
            image = _check_image(value.get("bytes") if isinstance(value, dict) else value, where, "image")
            options = question_options(question)
            answer = rec["answer"].strip().upper() if isinstance(rec["answer"], str) else rec["answer"]
            if not isinstance(answer, str) or answer not in options:
                raise _error(where, "answer", f"{rec['answer']!r} is not one of the option letters {options!r}",
                             "give the correct option's letter")
            category = rec.get("category") or "uncategorised"
            out.append(ChoiceQuestion(index, question, image, answer, str(category), options))
        if limit is not None and len(out) >= limit:
            break
    return out

