"""Names and URIs: hand-written cases for the pure helpers in cafe_core.uris (no storage, no server)."""

from __future__ import annotations

import hashlib
import re

import pytest

from cafe_core.storage import StorageError
from cafe_core.uris import (
    check_relative,
    is_s3,
    join,
    relative_to,
    safe_name,
    sha256_bytes,
    sha256_file,
    split_s3,
)

SAFE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


@pytest.mark.parametrize("uri, expected", [
    ("s3://b/k", True),
    ("s3://bucket", True),
    ("/tmp/x", False),
    ("relative/path", False),
    ("S3://b/k", False),  # the scheme is matched exactly, as boto3 would not take it either
    ("s3:/b/k", False),
    ("file://x", False),
    ("", False),
])
def test_is_s3(uri, expected):
    assert is_s3(uri) is expected


@pytest.mark.parametrize("uri, expected", [
    ("s3://b/k", ("b", "k")),
    ("s3://b/a/b/c.json", ("b", "a/b/c.json")),
    ("s3://b", ("b", "")),
    ("s3://b/", ("b", "")),
    ("s3://b//k", ("b", "/k")),  # kept as given: S3 keys may start with '/'
])
def test_split_s3(uri, expected):
    assert split_s3(uri) == expected


@pytest.mark.parametrize("uri, why", [
    ("/local/path", "is not an s3:// URI"),
    ("s3://", "has no bucket"),
    ("s3:///key", "has no bucket"),
])
def test_split_s3_refuses(uri, why):
    with pytest.raises(StorageError, match=re.escape(why)):
        split_s3(uri)


@pytest.mark.parametrize("name", ["a", "a/b", "part-00000.parquet", "x/y/z.json", "caf\u00e9", "..a", "a..", ".hidden"])
def test_check_relative_accepts(name):
    assert check_relative(name) == name


@pytest.mark.parametrize("name", [
    "",
    "/abs",
    "/",
    "..",
    ".",
    "../x",
    "a/..",
    "a/../../b",
    "./a",
    "a/./b",
    "a//b",
    "a/",
    "a\\b",
    "..\\..\\windows",
    "nul\x00byte",
    "new\nline",
    "tab\tname",
    "esc\x1b[31m",
    "bidi\u202eevil",
    "zero\u200bwidth",
])
def test_check_relative_refuses_hostile_names(name):
    with pytest.raises(StorageError, match="object name"):
        check_relative(name)


def test_join():
    assert join("s3://b/prefix", "a", "b/c.json") == "s3://b/prefix/a/b/c.json"
    assert join("s3://b/prefix/", "x") == "s3://b/prefix/x"
    assert join("/tmp/out", "x") == "/tmp/out/x"
    assert join("/tmp/out") == "/tmp/out"
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(StorageError):
            join("s3://b/prefix", bad)


def test_relative_to():
    assert relative_to("s3://b/p/a/b.json", "s3://b/p") == "a/b.json"
    assert relative_to("s3://b/p/a", "s3://b/p/") == "a"
    assert relative_to("/tmp/out/x", "/tmp/out") == "x"
    with pytest.raises(StorageError, match="is not under"):
        relative_to("s3://b/pq/x", "s3://b/p")  # a shared string prefix is not a parent folder
    with pytest.raises(StorageError, match="is not under"):
        relative_to("s3://other/p/x", "s3://b/p")


@pytest.mark.parametrize("text", ["plain-id_1.png", "a.b", "A0", "x" * 80])
def test_safe_name_keeps_safe_ids(text):
    assert safe_name(text) == text


@pytest.mark.parametrize("text", [
    "../../etc/passwd",
    "/abs/path",
    "..",
    ".",
    "",
    "...",
    ".hidden",
    "a/b",
    "C:\\Windows\\x",
    "nul\x00byte",
    "new\nline",
    "bidi\u202eevil\u202d",
    "zero\u200bwidth",
    "caf\u0065\u0301",
    "\ufb01le",  # ligature, changes under NFKC
    "\U0001f642",
    "\ud800",  # a lone surrogate (from a badly decoded file name)
    "x" * 5000,
    "id with spaces",
    "$(rm -rf ~)",
])
def test_safe_name_makes_hostile_ids_one_safe_component(text):
    name = safe_name(text)
    assert SAFE.fullmatch(name) and len(name) <= 80, name
    assert "/" not in name and name not in (".", "..")
    assert name != text
    assert name.endswith("-" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12])
    assert check_relative(name) == name and join("s3://b/p", name) == f"s3://b/p/{name}"


def test_safe_name_keeps_distinct_ids_distinct():
    ids = ["a/b", "a_b", "a b", "a\\b", "a:b", "A/B", "x" * 81, "x" * 82]
    names = [safe_name(i) for i in ids]
    assert len(set(names)) == len(names)
    assert safe_name("a_b") == "a_b" and safe_name("a/b") != "a_b"
    assert safe_name("a/b") == safe_name("a/b")  # deterministic


def test_safe_name_max_len():
    assert len(safe_name("y" * 500, max_len=20)) <= 20
    assert safe_name("short", max_len=20) == "short"


def test_sha256_helpers(tmp_path):
    assert sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    data = bytes(range(256)) * 8193  # over the 1 MiB read chunk
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path) == sha256_file(str(path)) == sha256_bytes(data) == hashlib.sha256(data).hexdigest()
