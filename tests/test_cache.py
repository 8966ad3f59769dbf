"""The node-local cache (cafe_core/cache.py): one fetch per node, a size limit that holds, eviction of the least
recently used file not in use, damaged copies fetched again, wrong downloads refused. The ranks are real
processes reading a committed dataset on the real S3 server; their GET requests are counted."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cafe_core.cache import CacheError, NodeCache
from cafe_core.commit import OutputWriter, read_manifest
from cafe_core.data.convert import PAIR_SCHEMA
from cafe_core.storage import Storage
from cafe_core.train.data import BatchOrder, BatchPlan, PairShards
from cafe_core.uris import join, sha256_file

# --- helpers -----------------------------------------------------------------------------------------


def pair_rows(start: int, n: int, image_bytes: int = 1500) -> list[dict]:
    rng = np.random.default_rng(start)
    return [
        {
            "id": f"shapes/{i:05d}", "source": "shapes", "image": rng.bytes(image_bytes), "image_sha256": "-",
            "image_format": "PNG", "width": 8, "height": 8, "caption": f"caption {i}",
            "conversations": [{"from": "gpt", "value": f"caption {i}"}],
        }
        for i in range(start, start + n)
    ]


def write_pairs(store: Storage, prefix: str, scratch: Path, shards: int = 4, rows: int = 10, row_group: int = 4,
                counts: bool = True, image_bytes: int = 1500) -> str:
    """A committed pairs dataset as `cafe convert` writes it: `shards` shards of `rows` rows in row groups of
    `row_group`; `counts=False` leaves out the shard_rows meta (datasets converted before it existed)."""
    out = OutputWriter(store, prefix, kind="pairs")
    shard_rows = {}
    for k in range(shards):
        local = scratch / f"part-{k:05d}.parquet"
        table = pa.Table.from_pylist(pair_rows(k * rows, rows, image_bytes), schema=PAIR_SCHEMA)
        pq.write_table(table, local, row_group_size=row_group, compression="zstd")
        out.put_file(f"pairs/part-{k:05d}.parquet", local)
        shard_rows[f"pairs/part-{k:05d}.parquet"] = rows
    out.commit(meta={"shard_rows": shard_rows} if counts else {})
    return prefix


class CountingStorage(Storage):
    """Counts downloads; optionally waits before each one (to hold a download in flight) and records the
    size of a folder right after each one (the moment the cache is fullest)."""

    def __init__(self, *a, pause: float = 0.0, watch: Path | None = None, **kw):
        super().__init__(*a, **kw)
        self.downloads: list[str] = []
        self.pause, self.watch, self.peak = pause, watch, 0
        self.gate: threading.Event | None = None

    def download(self, uri, local_path):
        self.downloads.append(uri)
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.pause)
        out = super().download(uri, local_path)
        if self.watch is not None:
            self.peak = max(self.peak, folder_bytes(self.watch))
        return out


def folder_bytes(folder: Path) -> int:
    """Everything in the folder, temporary and hidden files included (one the other rank renames or evicts
    between the listing and its stat is not counted: it is gone)."""
    total = 0
    for path in Path(folder).iterdir():
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            pass
    return total


def blob(tmp_path: Path, name: str, size: int = 100, fill: bytes = b"") -> tuple[str, str, int]:
    """A 'remote' object (a local file): (uri, sha256, size)."""
    remote = tmp_path / "remote"
    remote.mkdir(exist_ok=True)
    path = remote / name
    path.write_bytes((fill or name.encode()) * (size // len(fill or name.encode()) + 1))
    with open(path, "r+b") as f:
        f.truncate(size)
    return str(path), sha256_file(path), size


def cached(cache: NodeCache) -> set[str]:
    return {p.name for p in cache.folder.iterdir() if not p.name.startswith(".")}


# --- one process -------------------------------------------------------------------------------------


def test_fetched_once_then_reused(tmp_path):
    a = blob(tmp_path, "a.parquet")
    store = CountingStorage()
    cache = NodeCache(tmp_path / "cache", store, max_bytes=1000)
    path = cache.get(*a)
    assert path.name == f"{a[1]}.parquet" and path.read_bytes() == Path(a[0]).read_bytes()
    assert cache.get(*a) == path and store.downloads == [a[0]]
    later = NodeCache(tmp_path / "cache", store, max_bytes=1000)  # another process, a later run
    assert later.get(*a) == path and later.downloads == 0 and store.downloads == [a[0]]
    assert cache.usage() == 100


def test_least_recently_used_is_evicted_first(tmp_path):
    a, b, c, d = (blob(tmp_path, n) for n in ("a", "b", "c", "d"))
    cache = NodeCache(tmp_path / "cache", CountingStorage(), max_bytes=300)
    for x in (a, b, c):
        cache.get(*x)
        time.sleep(0.01)
    cache.get(*a)  # a is now the most recently used: b is the oldest
    time.sleep(0.01)
    cache.get(*d)
    assert cached(cache) == {a[1], c[1], d[1]}
    cache.get(*b)
    assert cached(cache) == {a[1], d[1], b[1]} and folder_bytes(cache.folder) <= 300


def test_a_file_in_use_is_never_evicted(tmp_path):
    a, b, c = (blob(tmp_path, n) for n in ("a", "b", "c"))
    cache = NodeCache(tmp_path / "cache", CountingStorage(), max_bytes=200, wait_s=0.3)
    with cache.use(*a) as path_a:
        cache.get(*b)
        time.sleep(0.01)
        cache.get(*c)  # a is the oldest but in use: b goes
        assert path_a.exists() and cached(cache) == {a[1], c[1]}
        with cache.use(*c):  # both in use, nothing can make room
            with pytest.raises(CacheError, match=r"no room .* fill train.cache.max_gb=.*raise it"):
                cache.get(*b)
    cache.get(*b)  # released: now it fits
    assert len(cached(cache)) == 2


def test_a_file_larger_than_the_cache_is_refused(tmp_path):
    big = blob(tmp_path, "big", size=2000)
    store = CountingStorage()
    cache = NodeCache(tmp_path / "cache", store, max_bytes=1000, setting="train.cache.max_gb")
    with pytest.raises(CacheError, match=r"more than the whole node cache \(train.cache.max_gb=.*\): raise train.cache.max_gb"):
        cache.get(*big)
    assert store.downloads == []


def test_a_damaged_copy_is_fetched_again(tmp_path):
    a = blob(tmp_path, "a.parquet")
    store = CountingStorage()
    path = NodeCache(tmp_path / "cache", store).get(*a)
    path.write_bytes(b"x" * 100)  # same size, other bytes: damaged on disk
    fresh = NodeCache(tmp_path / "cache", store)  # the next process hashes before its first use
    assert fresh.get(*a).read_bytes() == Path(a[0]).read_bytes()
    assert fresh.downloads == 1 and len(store.downloads) == 2


def test_a_download_that_does_not_match_the_manifest_is_refused(tmp_path):
    uri, _, size = blob(tmp_path, "a.parquet")
    cache = NodeCache(tmp_path / "cache", Storage())
    with pytest.raises(CacheError, match=r"a.parquet does not match its manifest entry \(sha256 differs\).*nothing was cached"):
        cache.get(uri, "0" * 64, size)
    with pytest.raises(CacheError, match=r"size 100 != 99"):
        cache.get(uri, "0" * 64, size - 1)
    assert [p.name for p in cache.folder.iterdir() if not p.name.endswith(".lock")] == []


def test_a_download_in_flight_counts_against_the_limit(tmp_path):
    """A waits inside its download (nothing on disk yet); B, needing room, must count A's reservation and
    evict the idle file rather than overfill the cache."""
    a, b, c = (blob(tmp_path, n) for n in ("a", "b", "c"))
    slow = CountingStorage()
    slow.gate = threading.Event()
    first = NodeCache(tmp_path / "cache", CountingStorage(), max_bytes=250)
    first.get(*c)  # idle, evictable
    worker = threading.Thread(target=NodeCache(tmp_path / "cache", slow, max_bytes=250).get, args=a)
    worker.start()
    while not slow.downloads:
        time.sleep(0.005)
    assert first.usage() == 200  # c + a's reservation
    first.get(*b)
    assert cached(first) == {b[1]}  # c made room for b next to a's download
    slow.gate.set()
    worker.join()
    assert cached(first) == {a[1], b[1]} and folder_bytes(first.folder) <= 250


def test_leftovers_of_a_killed_download_are_cleaned(tmp_path):
    a = blob(tmp_path, "a")
    cache = NodeCache(tmp_path / "cache", CountingStorage(), max_bytes=150)
    name = NodeCache._name(*a[:2])
    (cache.folder / f".{name}.~reserve").write_text("100")
    (cache.folder / f".{name}.~dl.1a2b").write_bytes(b"x" * 60)
    assert cache.usage() == 0  # no process holds its lock: its download is dead
    assert not list(cache.folder.glob(".*~*"))
    cache.get(*a)
    assert cache.usage() == 100


def test_a_lower_limit_trims_at_start(tmp_path):
    blobs = [blob(tmp_path, n) for n in "abcd"]
    cache = NodeCache(tmp_path / "cache", CountingStorage())
    for x in blobs:
        cache.get(*x)
        time.sleep(0.01)
    NodeCache(tmp_path / "cache", CountingStorage(), max_bytes=250)
    assert cached(cache) == {blobs[2][1], blobs[3][1]}


def test_configured_by_train_cache(tmp_path):
    from cafe_core.config import ConfigError, TrainConfig, load_config

    cfg = load_config(None, [f"train.cache.dir={tmp_path / 'c'}", "train.cache.max_gb=0.5"])
    cache = NodeCache.from_config(cfg.train.cache, Storage())
    assert (cache.folder, cache.max_bytes, cache.setting) == (tmp_path / "c", 1 << 29, "train.cache.max_gb")
    assert TrainConfig().cache.dir == ".cafe/cache"
    with pytest.raises(ConfigError, match="train.cache.dir: .*a local folder"):
        load_config(None, ["train.cache.dir=s3://b/cache"])


# --- ranks: processes sharing a node's cache ---------------------------------------------------------


def _rank(rank: int, world: int, prefix: str, cache_dir: str, max_bytes: int | None, out: str, barrier) -> None:
    """One rank: reads its part of every batch of an epoch (the trainer's order), counting its GET requests
    per key and the cache folder's size after each fetch. (Its Storage is made here: a pickled one loses its
    TransferConfig's defaults and cannot download from S3.)"""
    store = CountingStorage(watch=Path(cache_dir))
    gets: dict[str, int] = {}

    def count(params, **_):
        gets[params["Key"]] = gets.get(params["Key"], 0) + 1

    store.client.meta.events.register("before-parameter-build.s3.GetObject", count)
    barrier.wait()
    shards = PairShards(store, prefix, NodeCache(cache_dir, store, max_bytes=max_bytes, wait_s=30))
    order, plan = BatchOrder(len(shards), 8, seed=0), BatchPlan(8, 1, world)
    ids, peak = [], 0
    for step in range(order.steps_per_epoch):
        ids += [r["id"] for r in shards.rows(plan.rows(order.batch(step), 0, rank))]
        peak = max(peak, folder_bytes(Path(cache_dir)))
    Path(out).write_text(json.dumps({"gets": gets, "ids": ids, "peak": max(peak, store.peak),
                                     "downloads": shards.cache.downloads}))


def _run_ranks(prefix: str, cache_dir: Path, max_bytes: int | None, tmp_path: Path, world: int = 2):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(world)
    procs = [ctx.Process(target=_rank, args=(r, world, prefix, str(cache_dir), max_bytes,
                                             str(tmp_path / f"rank{r}.json"), barrier)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * world
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture
def s3_pairs(s3_env, bucket, tmp_path):
    store = CountingStorage(multipart_threshold_mb=5, multipart_chunk_mb=5)
    prefix = write_pairs(store, f"{bucket}/runs/r1/convert", tmp_path, shards=6, rows=8, row_group=3)
    return store, prefix


def test_ranks_of_a_node_fetch_each_shard_once(s3_pairs, tmp_path):
    store, prefix = s3_pairs
    results = _run_ranks(prefix, tmp_path / "cache", None, tmp_path)
    shard_keys = {join(prefix, e.name).split("/", 3)[3] for e in read_manifest(store, prefix).entries
                  if e.name.startswith("pairs/")}
    per_key = {k: sum(r["gets"].get(k, 0) for r in results) for k in shard_keys}
    for r in results:  # each rank needs every shard: unshared, that would be 12 GETs
        assert {int(i[-5:]) // 8 for i in r["ids"]} == set(range(6))
    assert per_key == dict.fromkeys(shard_keys, 1)  # 6 shards, 6 GETs for the node
    assert sum(r["downloads"] for r in results) == len(shard_keys)
    assert sorted(results[0]["ids"] + results[1]["ids"]) == [f"shapes/{i:05d}" for i in range(48)]


def test_ranks_stay_within_a_small_cache(s3_pairs, tmp_path):
    store, prefix = s3_pairs
    sizes = [e.size for e in read_manifest(store, prefix).entries if e.name.startswith("pairs/")]
    limit = int(2.5 * max(sizes))  # room for two shards of six: eviction all the time
    results = _run_ranks(prefix, tmp_path / "cache", limit, tmp_path)
    assert max(r["peak"] for r in results) <= limit
    assert sum(r["downloads"] for r in results) > len(sizes)  # evicted shards were fetched again
    assert sorted(results[0]["ids"] + results[1]["ids"]) == [f"shapes/{i:05d}" for i in range(48)]


# --- model checkpoints -------------------------------------------------------------------------------


def test_ranks_of_a_node_mirror_a_checkpoint_once(s3_env, bucket, tmp_path):
    """Two ranks (threads: the folder lock is per open file, like between processes) build from the same
    s3:// checkpoint at once: one downloads, the other waits and finds every file in place."""
    from cafe_core.model.build import fetch_checkpoint

    ckpt = f"{bucket}/models/m1"
    Storage().write_bytes(f"{ckpt}/config.json", b"{}")
    Storage().write_bytes(f"{ckpt}/model.safetensors", b"w" * 1000)
    Storage().write_bytes(f"{ckpt}/tokenizer.json", b"{}")
    stores = [CountingStorage(pause=0.1) for _ in range(2)]
    barrier = threading.Barrier(2)
    folders = []

    def rank(store):
        barrier.wait()
        folders.append(fetch_checkpoint(ckpt, tmp_path / "models", store))

    threads = [threading.Thread(target=rank, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(folders) == 2 and folders[0] == folders[1]
    assert sorted(p.name for p in folders[0].iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sum(len(s.downloads) for s in stores) == 3
