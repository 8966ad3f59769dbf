"""The commit protocol for stage outputs: a stage writes its parts under a prefix, then ``_MANIFEST.json``
(every object with size and sha256) as the single commit point.

A reader refuses a prefix without a manifest and reads only the objects the manifest lists, so it never sees a
half-written output. Rewriting a prefix first removes the old manifest (the output reads as uncommitted until
the new one lands), and objects of the old output that the new manifest does not list are deleted after the
commit.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cafe_core.storage import ChecksumError, NotCommittedError, Storage, StorageError
from cafe_core.uris import check_relative, join, sha256_bytes, sha256_file

MANIFEST = "_MANIFEST.json"


class ManifestEntry(BaseModel):
    name: str
    size: int
    sha256: str


class Manifest(BaseModel):
    kind: str
    created: str
    entries: list[ManifestEntry]
    meta: dict[str, Any] = {}

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def entry(self, name: str) -> ManifestEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise StorageError(f"{name!r} is not part of this output (manifest lists {len(self.entries)} objects)")


class OutputWriter:
    """Collects the parts of one stage output and commits them with a manifest.

    with OutputWriter(store, "s3://cafe/runs/r1/convert", kind="pairs") as out:
        out.put_file("pairs/part-00000.parquet", local)
        out.put_json("stats.json", stats)
        out.commit(meta={...})

    Leaving the block without commit() (an exception, a kill) leaves the output uncommitted.
    """

    def __init__(self, store: Storage, prefix: str, kind: str):
        self.store = store
        self.prefix = prefix.rstrip("/")
        self.kind = kind
        self._entries: dict[str, ManifestEntry] = {}
        self.committed: Manifest | None = None
        # Un-commit an earlier output at this prefix before any part is overwritten.
        self._previous = {o.uri for o in store.list(self.prefix)}
        manifest_uri = join(self.prefix, MANIFEST)
        if manifest_uri in self._previous:
            store.delete(manifest_uri)

    def __enter__(self) -> "OutputWriter":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def uri(self, name: str) -> str:
        return join(self.prefix, name)

    def _record(self, name: str, size: int, digest: str) -> str:
        if name == MANIFEST:
            raise StorageError(f"{MANIFEST} is written by commit() only")
        self._entries[name] = ManifestEntry(name=name, size=size, sha256=digest)
        return self.uri(name)

    def add_uploaded(self, entry: ManifestEntry) -> str:
        """List an object that another process (e.g. another rank) already uploaded under this prefix."""
        check_relative(entry.name)
        return self._record(entry.name, entry.size, entry.sha256)

    def put_bytes(self, name: str, data: bytes) -> str:
        uri = self.uri(name)
        self.store.write_bytes(uri, data)
        return self._record(name, len(data), sha256_bytes(data))

    def put_text(self, name: str, text: str) -> str:
        return self.put_bytes(name, text.encode("utf-8"))

    def put_json(self, name: str, obj: Any) -> str:
        return self.put_bytes(name, (json.dumps(obj, indent=2, default=str) + "\n").encode())

    def put_file(self, name: str, local_path: str | Path) -> str:
        uri = self.uri(name)
        self.store.upload(local_path, uri)
        return self._record(name, Path(local_path).stat().st_size, sha256_file(local_path))

    def commit(self, meta: dict[str, Any] | None = None) -> Manifest:
        manifest = Manifest(
            kind=self.kind,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            entries=sorted(self._entries.values(), key=lambda e: e.name),
            meta=meta or {},
        )
        self.store.write_bytes(self.uri(MANIFEST), manifest.model_dump_json(indent=2).encode())
        keep = {self.uri(n) for n in self._entries} | {self.uri(MANIFEST)}
        for stale in sorted(self._previous - keep):
            self.store.delete(stale)
        self.committed = manifest
        return manifest


def read_manifest(store: Storage, prefix: str) -> Manifest:
    uri = join(prefix.rstrip("/"), MANIFEST)
    if not store.exists(uri):
        raise NotCommittedError(
            f"{prefix} is not a committed output (no {MANIFEST}): the stage writing it did not finish or "
            "was interrupted; run it again"
        )
    try:
        return Manifest.model_validate_json(store.read_bytes(uri))
    except ValueError as e:
        raise StorageError(f"{uri} is not a valid manifest: {e}") from None


def manifest_digest(store: Storage, prefix: str) -> str:
    """sha256 of the bytes of a committed output's manifest (which lists every file's sha256): equal digests
    mean exactly the same files. Raises NotCommittedError when the output has none."""
    uri = join(prefix.rstrip("/"), MANIFEST)
    if not store.exists(uri):
        raise NotCommittedError(f"{prefix} is not a committed output (no {MANIFEST}): run the stage that writes it")
    return hashlib.sha256(store.read_bytes(uri)).hexdigest()


def verify_output(store: Storage, prefix: str, manifest: Manifest | None = None, checksums: bool = True) -> Manifest:
    """Check every listed object exists with its size (and sha256). Raises ChecksumError naming each bad one."""
    manifest = manifest or read_manifest(store, prefix)
    sizes = {o.uri: o.size for o in store.list(prefix)}
    problems = []
    for e in manifest.entries:
        uri = join(prefix, e.name)
        if uri not in sizes:
            problems.append(f"{e.name}: missing")
        elif sizes[uri] != e.size:
            problems.append(f"{e.name}: size {sizes[uri]} != {e.size} in manifest")
        elif checksums and store.sha256(uri) != e.sha256:
            problems.append(f"{e.name}: sha256 differs from manifest")
    if problems:
        raise ChecksumError(f"{prefix} does not match its manifest:\n  " + "\n  ".join(problems))
    return manifest
