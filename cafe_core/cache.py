"""A node-local cache of committed objects, shared by the processes (ranks) of one machine.

    cache = NodeCache(".cafe/cache", store, max_bytes=50 << 30)
    with cache.use(uri, sha256, size) as path:   # fetched once per node; not evicted inside the block
        pq.ParquetFile(path).read_row_group(0)

Each object is fetched once per node: one process downloads it to a temporary name in the cache folder,
checks its size and sha256 against the manifest entry and renames it into place; the others wait for it and
then read the same file. Files are named by their sha256, so a file already there is reused by later
processes and runs; each process still hashes a file once before its first use (a damaged file is fetched
again). A download that does not match its manifest entry is refused (CacheError), nothing is kept.

Size limit: the files plus the downloads in flight (counted at their full size from the start) never exceed
``max_bytes``. To make room, the least recently used files are deleted, never one that a process is using.

Locks (``fcntl.flock``, released by the kernel when a process dies, so a killed rank leaves nothing locked):

- ``.cache.lock``: exclusive, held only for short bookkeeping (look up, reserve room, evict, rename into
  place), never during a download or a read.
- ``.<name>.lock``, one per object: shared while a process uses the file (``use``), exclusive while one
  downloads it or evicts it. Eviction only takes it without waiting, under the cache lock, so a file in use
  is never deleted; a shared lock is only taken under the cache lock while the file exists, so a file a
  process has just been handed cannot disappear either. Lock files are empty and stay (deleting one that
  another process may have open would split the lock in two).

Use a node-local filesystem (local disk, an emptyDir or hostPath volume): flock is not reliable on every
network filesystem, and one copy per node is the point.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from cafe_core.errors import BadInput
from cafe_core.storage import Storage
from cafe_core.uris import sha256_file

CACHE_LOCK = ".cache.lock"
_DATA = re.compile(r"^[0-9a-f]{64}(\.[A-Za-z0-9]{1,16})?$")  # the only files the cache counts or deletes
_SIDE = ".~"  # .<name>.~reserve (room reserved for a download), .<name>.~dl* (the download itself)


class CacheError(BadInput, RuntimeError):
    pass


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[None]:
    """An exclusive flock on a folder itself (created if missing; no lock file inside it): one process at a
    time mirrors into it, the others wait, then find the files there."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


class NodeCache:
    """Objects fetched once per node into ``folder``, within ``max_bytes`` (None: no limit).

    ``setting`` names the configuration key of the limit in error messages. A process waits at most
    ``wait_s`` seconds for room (other processes' files in use) before giving up."""

    def __init__(self, folder: str | Path, store: Storage, max_bytes: int | None = None,
                 setting: str = "train.cache.max_gb", wait_s: float = 600.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.store, self.max_bytes, self.setting, self.wait_s = store, max_bytes, setting, wait_s
        self.downloads = 0  # objects this process fetched (the others came from the cache)
        self._verified: set[str] = set()  # names this process has hashed
        if max_bytes is not None:
            with self._locked():  # a lower limit than last run's: trim now
                used, files = self._scan(own=None)
                self._evict(files, used - max_bytes)

    @classmethod
    def from_config(cls, cfg: Any, store: Storage, setting: str = "train.cache") -> "NodeCache":
        """From a config section with ``dir`` and ``max_gb`` (``train.cache``)."""
        return cls(cfg.dir, store, max_bytes=int(cfg.max_gb * (1 << 30)), setting=f"{setting}.max_gb")

    # --- public ----------------------------------------------------------------------------------------

    @contextmanager
    def use(self, uri: str, sha256: str, size: int) -> Iterator[Path]:
        """The local path of the object ``uri`` (manifest ``sha256`` and ``size``), fetched if this node does
        not have it yet. The file stays in place until the block ends."""
        name = self._name(uri, sha256)
        fd = self._acquire(uri, name, sha256, size)
        try:
            yield self.folder / name
        finally:
            os.close(fd)  # releases the shared lock

    def get(self, uri: str, sha256: str, size: int) -> Path:
        """Like ``use`` but only fetches: the path may be evicted by another process afterwards."""
        with self.use(uri, sha256, size) as path:
            return path

    def usage(self) -> int:
        """Bytes held: cached files plus the room reserved by downloads in flight."""
        with self._locked():
            return self._scan(own=None)[0]

    # --- internals -------------------------------------------------------------------------------------

    @staticmethod
    def _name(uri: str, sha256: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
            raise CacheError(f"{uri}: {sha256!r} is not a sha256 (64 lowercase hex digits)")
        suffix = PurePosixPath(uri).suffix
        return sha256 + (suffix if _DATA.match(sha256 + suffix) else "")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / CACHE_LOCK, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield

    def _lock_fd(self, name: str) -> int:
        return os.open(self.folder / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def _too_big(self, uri: str, size: int) -> CacheError:
        return CacheError(
            f"{uri} is {size / (1 << 30):.3f} GB ({size} bytes), more than the whole node cache "
            f"({self.setting}={self.max_bytes / (1 << 30):g} GB at {self.folder}): raise {self.setting}"
        )

    def _acquire(self, uri: str, name: str, sha256: str, size: int) -> int:
        """A descriptor holding the shared lock of ``name``, whose file is in place and checked."""
        if self.max_bytes is not None and size > self.max_bytes:
            raise self._too_big(uri, size)
        path = self.folder / name
        deadline, pause = time.monotonic() + self.wait_s, 0.02
        damaged: tuple[int, int] | None = None  # (device, inode) of a copy found damaged
        while True:
            fd = self._lock_fd(name)
            try:
                with self._locked():
                    state = self._look(fd, path, name, size, damaged)
                if state == "present":
                    if name in self._verified:
                        return fd
                    if sha256_file(path) == sha256:
                        self._verified.add(name)
                        return fd
                    st = path.stat()  # damaged at rest: fetch again once nobody uses it
                    damaged = (st.st_dev, st.st_ino)
                elif state == "download":
                    self._download(fd, uri, path, name, sha256, size)
                    return fd
                elif state == "wait":  # another process is downloading it: wait for it to finish
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    pause = 0.02
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # "busy" or "full", or damaged: try again shortly
            if time.monotonic() > deadline:
                raise CacheError(
                    f"no room in the node cache at {self.folder} for {uri} ({size} bytes) after {self.wait_s:.0f} s: "
                    f"the other processes' files in use fill {self.setting}={self.max_bytes / (1 << 30):g} GB; raise it"
                    if state == "full" else f"{uri}: its damaged copy in {self.folder} stayed in use for {self.wait_s:.0f} s"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _look(self, fd: int, path: Path, name: str, size: int, damaged: tuple[int, int] | None) -> str:
        """Under the cache lock: take the shared lock of a file in place ("present"), or the exclusive lock
        and the room to download it ("download"), or say why not ("wait", "busy", "full")."""
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        if st is not None and st.st_size == size and (st.st_dev, st.st_ino) != damaged:
            # Nobody holds the exclusive lock of a file in place outside the cache lock: this never blocks.
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.utime(path)  # least recently used = oldest mtime
            return "present"
        if not _try_lock(fd, fcntl.LOCK_EX):
            return "wait" if st is None else "busy"  # downloading, or the bad copy is still in use
        if st is not None:  # wrong size, or damaged: nobody uses it any more
            path.unlink()
        for p in self._sides(name):  # a crashed download's leftovers (we hold its lock, so it is dead)
            p.unlink(missing_ok=True)
        if self.max_bytes is not None:
            used, files = self._scan(own=name)
            if not self._evict(files, used + size - self.max_bytes):
                fcntl.flock(fd, fcntl.LOCK_UN)
                return "full"
        (self.folder / f".{name}{_SIDE}reserve").write_text(str(size))
        return "download"

    def _download(self, fd: int, uri: str, path: Path, name: str, sha256: str, size: int) -> None:
        partial = self.folder / f".{name}{_SIDE}dl"
        try:
            self.store.download(uri, partial)
            got = partial.stat().st_size
            if got != size or sha256_file(partial) != sha256:
                what = f"size {got} != {size}" if got != size else "sha256 differs"
                raise CacheError(
                    f"{uri} does not match its manifest entry ({what}): the object changed after its output "
                    "was committed, or the download was damaged; nothing was cached"
                )
            with self._locked():
                os.replace(partial, path)
                (self.folder / f".{name}{_SIDE}reserve").unlink(missing_ok=True)
                fcntl.flock(fd, fcntl.LOCK_SH)  # exclusive -> shared; no evictor runs in the gap
        except BaseException:
            with self._locked():
                for p in self._sides(name):
                    p.unlink(missing_ok=True)
            raise
        self._verified.add(name)
        self.downloads += 1

    def _sides(self, name: str) -> list[Path]:
        return [p for p in self.folder.glob(f".{name}{_SIDE}*")]

    def _scan(self, own: str | None) -> tuple[int, list[tuple[float, int, Path]]]:
        """Under the cache lock: bytes used (files + live reservations, but not ``own``'s) and the cached
        files as (mtime, size, path). Leftovers of downloads whose process died are removed."""
        used, files, sides = 0, [], {}
        with os.scandir(self.folder) as it:
            for e in it:
                if _DATA.match(e.name):
                    if e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        used += st.st_size
                        files.append((st.st_mtime, st.st_size, Path(e.path)))
                elif e.name.startswith(".") and _SIDE in e.name:
                    sides.setdefault(e.name[1:].split(_SIDE, 1)[0], []).append(Path(e.path))
        for name, paths in sides.items():
            if name == own:
                continue
            fd = self._lock_fd(name)
            try:
                if _try_lock(fd, fcntl.LOCK_EX):  # nobody downloads it: leftovers
                    for p in paths:
                        p.unlink(missing_ok=True)
                    continue
            finally:
                os.close(fd)
            reserve = self.folder / f".{name}{_SIDE}reserve"
            try:
                used += int(reserve.read_text())
            except (FileNotFoundError, ValueError):
                used += sum(p.stat().st_size for p in paths if p.exists())
        return used, files

    def _evict(self, files: list[tuple[float, int, Path]], excess: int) -> bool:
        """Delete least recently used files not in use until ``excess`` bytes are freed; False if it cannot."""
        for _, size, path in sorted(files):
            if excess <= 0:
                break
            fd = self._lock_fd(path.name)
            try:
                if _try_lock(fd, fcntl.LOCK_EX):
                    path.unlink(missing_ok=True)
                    excess -= size
            finally:
                os.close(fd)
        return excess <= 0
