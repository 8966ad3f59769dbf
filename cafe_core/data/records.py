"""Checks of one raw training record -> an image-text pair, or a reject with a reason.

Pure functions (no I/O beyond decoding the bytes they are given), run in worker processes by the converter.
Image policy: the original encoded bytes are kept as they are (never re-encoded). Images are fully decoded
once to prove they are whole. Modes that a model cannot turn into RGB without guessing a value scale
(32-bit integer ``I``, float ``F``, 16-bit ``I;16*``) are rejected as ``unsupported_mode``; palette, grey,
alpha and CMYK images are accepted and converted to RGB when the model loads them.
"""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from cafe_core.prompts import ENDOFTEXT, IM_END, IM_START, IMAGE_TOKEN, VIDEO_TOKEN

# Manifest meta of a converted dataset that training reads (so it need not download shards to plan).
SHARD_ROWS = "shard_rows"  # shard name -> rows
SOURCE_RUNS = "source_runs"  # [[source, rows], ...] of consecutive rows, in row order
INTERLEAVED_ROWS = "interleaved_rows"  # rows with their own query/target sides (MMEB-train), no conversation
NEGATIVE_ROWS = "negative_rows"  # rows with a hard negative
PAIR_SCHEMA = "pair_schema"  # the pair shards' layout version (absent: 1)
# 1: id, source, image, image_sha256, image_format, width, height, caption, conversations.
# 2: + query_text, query_image, target_text, target_image, negative_text, negative_image (null on image-caption
#    pairs; an interleaved pair has null image ... conversations). Version 1 shards read as version 2 with
#    the new columns null.
PAIR_SCHEMA_VERSION = 2

# Reject reasons: stable names, counted in stats.json and written to rejects.jsonl.

MISSING_ID = "missing_id"
HOSTILE_ID = "hostile_id"
DUPLICATE_ID = "duplicate_id"
MISSING_IMAGE = "missing_image"
EMPTY_IMAGE = "empty_image"
IMAGE_FILE_MISSING = "image_file_missing"
IMAGE_PATH_OUTSIDE_FOLDER = "image_path_outside_folder"
MULTI_IMAGE = "multi_image"
MISPLACED_IMAGE = "misplaced_image"
CHAT_CONTROL_TOKEN = "chat_control_token"
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_IMAGE = "truncated_image"
DECOMPRESSION_BOMB = "decompression_bomb"
UNSUPPORTED_MODE = "unsupported_mode"
IMAGE_TOO_SMALL = "image_too_small"
MISSING_CONVERSATIONS = "missing_conversations"
MALFORMED_CONVERSATIONS = "malformed_conversations"
NO_GPT_TURN = "no_gpt_turn"
EMPTY_CAPTION = "empty_caption"
CAPTION_TOO_LONG = "caption_too_long"
MALFORMED_RECORD = "malformed_record"
# Interleaved (MMEB-train) pairs: a side (query, target, negative) with neither text nor image; a text over
# data.max_caption_chars; an image placeholder in the text but no image path.
EMPTY_TEXT = "empty_text"
TEXT_TOO_LONG = "text_too_long"
IMAGE_TOKEN_WITHOUT_IMAGE = "image_token_without_image"

REJECT_REASONS = (
    MISSING_ID, HOSTILE_ID, DUPLICATE_ID, MISSING_IMAGE, EMPTY_IMAGE, IMAGE_FILE_MISSING,
    IMAGE_PATH_OUTSIDE_FOLDER, MULTI_IMAGE, MISPLACED_IMAGE, CHAT_CONTROL_TOKEN, CORRUPT_IMAGE, TRUNCATED_IMAGE,
    DECOMPRESSION_BOMB,
    UNSUPPORTED_MODE, IMAGE_TOO_SMALL, MISSING_CONVERSATIONS, MALFORMED_CONVERSATIONS, NO_GPT_TURN,
    EMPTY_CAPTION, CAPTION_TOO_LONG, MALFORMED_RECORD, EMPTY_TEXT, TEXT_TOO_LONG, IMAGE_TOKEN_WITHOUT_IMAGE,
)
UNSUPPORTED_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N", "LAB", "HSV")
ROLES = ("human", "gpt", "system")
_DRIVE = re.compile(r"^[A-Za-z]:")
# Text that the tokenizer would read as chat structure rather than as words: the chat template's special
# tokens (cafe_core/prompts.py; <image> is handled by the placement rule), plus anything of Qwen's
# `<|name|>` special-token shape, so that a tokenizer with more of them (Qwen2.5's <|vision_start|>, ...)
# is covered too.
CONTROL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VIDEO_TOKEN)
_CONTROL = re.compile("|".join(re.escape(t) for t in CONTROL_TOKENS) + r"|<\|[^<>|\s]{1,64}\|>")
# A stored pair id is "<source name>/<id as found>": source names cannot hold "/" (SourceConfig.name), so
# the first "/" always ends the source name, whatever the original id holds.
ID_SEPARATOR = "/"


class Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:500]


@dataclass
class RawRecord:
    """One input record as a reader found it. ``image`` holds bytes, or ``image_uri`` says where to read
    them; ``pre_reject`` is a problem the reader already found (e.g. an image path outside the folder)."""

    source: str
    id: Any
    conversations: Any
    image: bytes | None = None
    image_uri: str | None = None
    pre_reject: tuple[str, str] | None = None


@dataclass
class Limits:
    caption_rule: str = "joined"
    max_caption_chars: int = 8000
    max_id_chars: int = 256
    max_image_pixels: int = 64_000_000
    min_image_side: int = 1


@dataclass
class Outcome:
    """A worker's answer for one record: a pair row, or a reject."""

    source: str
    id: str
    row: dict | None = None
    reason: str | None = None
    detail: str = ""
    content_key: bytes | None = None  # what exact duplicates share (None: from the row's image and caption)


def pair_id(source: str, raw_id: str) -> str:
    """The stored id: namespaced by source, so equal ids of different sources never collide."""
    if not source or ID_SEPARATOR in source:
        raise ValueError(f"source name {source!r} must be non-empty and hold no {ID_SEPARATOR!r}")
    return f"{source}{ID_SEPARATOR}{raw_id}"


def source_of(stored_id: str) -> str:
    """The source name of a stored pair id (the inverse of pair_id's namespacing)."""
    source, sep, rest = stored_id.partition(ID_SEPARATOR)
    if not (source and sep and rest):
        raise ValueError(f"pair id {stored_id[:100]!r} is not '<source>{ID_SEPARATOR}<id>'")
    return source


def check_id(raw_id: Any, max_chars: int) -> str:
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        raise Reject(MISSING_ID, "id is null or empty")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise Reject(HOSTILE_ID, f"id has type {type(raw_id).__name__}; expected a string")
    text = str(raw_id)
    if len(text) > max_chars:
        raise Reject(HOSTILE_ID, f"id is {len(text)} characters long (limit {max_chars})")
    if any(not c.isprintable() or unicodedata.category(c) == "Cf" for c in text):
        raise Reject(HOSTILE_ID, "id contains control, format (bidi/zero-width) or unprintable characters")
    if unicodedata.normalize("NFKC", text) != text:
        raise Reject(HOSTILE_ID, "id changes under Unicode NFKC normalisation (look-alike characters)")
    if text.startswith(("/", "\\")) or _DRIVE.match(text):
        raise Reject(HOSTILE_ID, "id is an absolute path")
    if ".." in re.split(r"[/\\]", text):
        raise Reject(HOSTILE_ID, "id contains a '..' path segment")
    return text


def parse_conversations(conv: Any) -> list[dict[str, str]]:
    if conv is None:
        raise Reject(MISSING_CONVERSATIONS, "conversations is null or absent")
    if isinstance(conv, (str, bytes)) or not hasattr(conv, "__iter__"):
        raise Reject(MALFORMED_CONVERSATIONS, f"conversations is a {type(conv).__name__}, expected a list of turns")
    turns = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise Reject(MALFORMED_CONVERSATIONS, f"turn {i} is a {type(turn).__name__}, expected {{from, value}}")
        role, value = turn.get("from"), turn.get("value")
        if role not in ROLES:
            raise Reject(MALFORMED_CONVERSATIONS, f"turn {i}: from={role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(value, str):
            raise Reject(MALFORMED_CONVERSATIONS, f"turn {i}: value is {type(value).__name__}, expected a string")
        turns.append({"from": role, "value": value})
    if not turns:
        raise Reject(MISSING_CONVERSATIONS, "conversations is an empty list")
    for i, t in enumerate(turns):
        check_no_control_tokens(t["value"], f"turn {i} ({t['from']})")
    check_image_placement(turns)
    return turns


def check_no_control_tokens(text: str, where: str) -> None:
    found = _CONTROL.search(text)
    if found:
        raise Reject(
            CHAT_CONTROL_TOKEN, f"{where} holds {found.group()!r}, which the tokenizer reads as chat structure"
        )


def check_image_placement(turns: list[dict[str, str]]) -> None:
    """At most one <image>, and only in the first human turn (training's rule, cafe_core/model/inputs.py
    InputBuilder.conversation). A conversation without one is accepted as it is: training puts the
    placeholder at the start of its first human turn (or adds a human turn holding it), the LLaVA way."""
    where = [i for i, t in enumerate(turns) for _ in range(t["value"].count(IMAGE_TOKEN))]
    if len(where) > 1:
        raise Reject(MULTI_IMAGE, f"{len(where)} {IMAGE_TOKEN} placeholders in the conversation; pairs take one image")
    first_human = next((i for i, t in enumerate(turns) if t["from"] == "human"), None)
    if where and where[0] != first_human:
        i = where[0]
        raise Reject(
            MISPLACED_IMAGE,
            f"{IMAGE_TOKEN} in turn {i} ({turns[i]['from']}); only the first human turn may hold it"
            + ("" if first_human is None else f" (turn {first_human})"),
        )


def caption_of(turns: list[dict[str, str]], rule: str, max_chars: int) -> str:
    """The pair's caption: the gpt turns joined (the reference's rule), or the first or the last gpt turn."""
    answers = [t["value"].strip() for t in turns if t["from"] == "gpt"]
    if not answers:
        raise Reject(NO_GPT_TURN, f"{len(turns)} turns, none from gpt")
    picked = {"first": answers[:1], "last": answers[-1:]}.get(rule, answers)
    caption = "\n".join(a for a in picked if a)
    if not caption.strip():
        raise Reject(EMPTY_CAPTION, "the caption is empty or whitespace")
    if len(caption) > max_chars:
        raise Reject(CAPTION_TOO_LONG, f"caption is {len(caption)} characters (limit {max_chars})")
    check_no_control_tokens(caption, "the caption")
    if IMAGE_TOKEN in caption:  # the text-side prompt has no image for it
        raise Reject(MISPLACED_IMAGE, f"the caption holds {IMAGE_TOKEN}")
    return caption


def inspect_image(data: bytes | None, limits: Limits) -> dict[str, Any]:
    """Decode fully once; return format, width, height and sha256 of the original bytes."""
    if data is None:
        raise Reject(MISSING_IMAGE, "image is null")
    if len(data) == 0:
        raise Reject(EMPTY_IMAGE, "image has zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Reject(DECOMPRESSION_BOMB, str(e)) from None
        except UnidentifiedImageError:
            raise Reject(CORRUPT_IMAGE, f"{len(data)} bytes that no image decoder recognises") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a property of the record
            raise Reject(CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None
        width, height = img.size
        # Checked from the header, before pixels are allocated.
        if width * height > limits.max_image_pixels:
            raise Reject(DECOMPRESSION_BOMB, f"{width}x{height} = {width * height} pixels (limit {limits.max_image_pixels})")
        if img.mode in UNSUPPORTED_MODES:
            raise Reject(UNSUPPORTED_MODE, f"mode {img.mode} has no lossless RGB meaning")
        if min(width, height) < limits.min_image_side:
            raise Reject(IMAGE_TOO_SMALL, f"{width}x{height} (minimum side {limits.min_image_side})")
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Reject(DECOMPRESSION_BOMB, str(e)) from None
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}"
            reason = TRUNCATED_IMAGE if "truncat" in msg.lower() or isinstance(e, EOFError) else CORRUPT_IMAGE
            raise Reject(reason, msg) from None
    return {
        "image_format": img.format or "",
        "width": width,
        "height": height,
        "image_sha256": hashlib.sha256(data).hexdigest(),
    }


def to_pair(rec: RawRecord, limits: Limits, read_image=None) -> Outcome:
    """The whole per-record check, in a fixed order so the first problem found is the reason reported."""
    shown_id = rec.id if isinstance(rec.id, str) else repr(rec.id)
    try:
        if rec.pre_reject:
            raise Reject(*rec.pre_reject)
        rid = check_id(rec.id, limits.max_id_chars)
        turns = parse_conversations(rec.conversations)
        caption = caption_of(turns, limits.caption_rule, limits.max_caption_chars)
        data = rec.image
        if data is None and rec.image_uri is not None and read_image is not None:
            data = read_image(rec.image_uri)
        info = inspect_image(data, limits)
    except Reject as r:
        return Outcome(source=rec.source, id=shown_id, reason=r.reason, detail=r.detail)
    row = {
        "id": pair_id(rec.source, rid), "source": rec.source, "image": data, **info, "caption": caption,
        "conversations": turns,
    }
    return Outcome(source=rec.source, id=rid, row=row)
