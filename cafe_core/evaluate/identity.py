"""Which evaluation items were scored: a digest of a loaded set's content, so that two numbers are only
compared (embeddings with a set, a candidate with the champion) when they come from the same items.

The digest is the sha256 of a canonical encoding of the set as loaded (after `eval_sets.max_items`): every
image's bytes, text, label and order, whatever files held them. Two exports of the same files agree; a
truncated, re-ordered or edited set does not.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np


def _feed(h: "hashlib._Hash", value: Any) -> None:
    """Type-tagged and length-prefixed, so that no two different values encode alike."""
    if value is None or isinstance(value, (bool, int, float)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, str):
        data = value.encode()
        h.update(b"s%d:" % len(data) + data)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        h.update(b"b%d:" % len(data) + data)
    elif isinstance(value, np.ndarray):
        h.update(f"a{value.dtype.str}{value.shape}:".encode() + np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (list, tuple)):
        h.update(b"l%d:" % len(value))
        for v in value:
            _feed(h, v)
    elif isinstance(value, (set, frozenset)):
        h.update(b"S%d:" % len(value))
        for v in sorted(value, key=repr):
            _feed(h, v)
    elif isinstance(value, dict):
        h.update(b"d%d:" % len(value))
        for k in sorted(value, key=str):
            _feed(h, str(k))
            _feed(h, value[k])
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(f"o{type(value).__name__}:".encode())
        for f in dataclasses.fields(value):
            _feed(h, f.name)
            _feed(h, getattr(value, f.name))
    else:
        raise TypeError(f"cannot digest a {type(value).__name__}")


def content_digest(value: Any) -> str:
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def set_identity(content: Any, items: int, uri: str, max_items: int | None) -> dict[str, Any]:
    """What metrics.json records for one scored set: the digest of its content, its item count, where it was
    read from and the `eval_sets.max_items` it was cut to."""
    return {"digest": content_digest(content), "items": int(items), "uri": uri, "max_items": max_items}


def differences(ours: dict[str, dict], theirs: dict[str, dict], keys: list[str] | None = None) -> list[str]:
    """Human-readable differences between two {set: identity} maps over ``keys`` (default: ours)."""
    out = []
    for key in keys if keys is not None else sorted(ours):
        a, b = ours.get(key), theirs.get(key)
        if a is None or b is None:
            out.append(f"{key}: {'not scored here' if a is None else 'not recorded there'}")
        elif a["digest"] != b["digest"]:
            out.append(f"{key}: {a['items']} items (digest {a['digest'][:12]}, max_items {a.get('max_items')}) vs "
                       f"{b['items']} items (digest {b['digest'][:12]}, max_items {b.get('max_items')})")
    return out
