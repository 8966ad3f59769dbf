"""Names and URIs: tell ``s3://bucket/key`` from local paths, join and check object names, turn ids into safe
key components, and hash bytes or files. Pure helpers, no storage access.

A bad name or URI raises ``cafe_core.storage.StorageError``, as every other storage problem does.
"""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

_HASH_CHUNK = 1 << 20


def _invalid(message: str) -> Exception:
    # storage.py imports this module at load time, so its error class is looked up when needed.
    from cafe_core.storage import StorageError

    return StorageError(message)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    if not is_s3(uri):
        raise _invalid(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise _invalid(f"{uri!r} has no bucket (expected s3://bucket/key)")
    return bucket, key


def check_relative(name: str) -> str:
    """A relative object name inside an output: forward slashes, no '..', not absolute, printable."""
    if not name or name.startswith("/") or "\\" in name or "\x00" in name:
        raise _invalid(f"object name {name!r} must be a non-empty relative path with '/' separators")
    parts = name.split("/")
    if any(p in ("", ".", "..") or not p.isprintable() for p in parts):
        raise _invalid(f"object name {name!r} may not contain empty, '.', '..' or unprintable parts")
    return name


def safe_name(text: str, max_len: int = 80) -> str:
    """Turn any id (hostile ones too) into one safe key component: [A-Za-z0-9._-], no leading dot, bounded
    length. When anything had to change, a short hash of the original keeps distinct ids distinct."""
    norm = unicodedata.normalize("NFKC", str(text))
    cleaned = "".join(c if (c.isascii() and (c.isalnum() or c in "._-")) else "_" for c in norm)
    cleaned = cleaned.strip("._-") or "id"
    if cleaned == text and len(cleaned) <= max_len:
        return cleaned
    digest = hashlib.sha256(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned[: max_len - 13]}-{digest}"


def join(base: str, *names: str) -> str:
    """Join relative names onto a local path or URI; names are checked, never allowed to escape base."""
    out = base.rstrip("/")
    for name in names:
        out = f"{out}/{check_relative(name)}"
    return out


def relative_to(uri: str, base: str) -> str:
    base = base.rstrip("/") + "/"
    if not uri.startswith(base):
        raise _invalid(f"{uri!r} is not under {base!r}")
    return uri[len(base) :]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
