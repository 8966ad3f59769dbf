"""S3 GET requests per node for N ranks reading one epoch: one private copy per rank (before) against the
node-local cache (cafe_core/cache.py) shared by the ranks (after).

    .venv/bin/python benchmarks/node_cache.py                        # 8 shards, N = 1 2 4
    .venv/bin/python benchmarks/node_cache.py --ranks 1 2 4 8 --shards 16

The dataset (synthetic pairs, random image bytes) is committed on the embedded SeaweedFS. Each rank is a
spawned process that reads its part of every batch of one epoch through PairShards (the trainer's order),
counting its GetObject calls. "private" gives each rank its own cache folder (what the trainer did before:
each rank downloaded every shard); "shared" one folder for the node; "shared, small" a limit of 3 shards,
so that shards are evicted and fetched again.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rank_main(rank: int, world: int, prefix: str, cache_dir: str, max_bytes: int | None, out: str, barrier) -> None:
    from cafe_core.cache import NodeCache
    from cafe_core.storage import Storage
    from cafe_core.train.data import BatchOrder, BatchPlan, PairShards

    store, gets = Storage(), [0]
    store.client.meta.events.register("before-parameter-build.s3.GetObject", lambda **_: gets.__setitem__(0, gets[0] + 1))
    barrier.wait()
    shards = PairShards(store, prefix, NodeCache(cache_dir, store, max_bytes=max_bytes))
    order, plan = BatchOrder(len(shards), 8 * world, seed=0), BatchPlan(8 * world, 1, world)
    for step in range(order.steps_per_epoch):
        shards.rows(plan.rows(order.batch(step), 0, rank))
    Path(out).write_text(json.dumps({"gets": gets[0] - 1, "downloads": shards.cache.downloads}))  # -1: the manifest


def run(prefix: str, world: int, mode: str, shard_bytes: int, tmp: Path) -> tuple[int, float]:
    ctx = multiprocessing.get_context("spawn")
    barrier, base = ctx.Barrier(world), Path(tempfile.mkdtemp(dir=tmp))
    limit = 3 * shard_bytes if mode == "shared, small" else None
    procs = [
        ctx.Process(target=rank_main, args=(r, world, prefix, str(base / (f"rank{r}" if mode == "private" else "node")),
                                            limit, str(base / f"r{r}.json"), barrier))
        for r in range(world)
    ]
    started = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    return sum(json.loads((base / f"r{r}.json").read_text())["gets"] for r in range(world)), time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rows", type=int, default=64)
    args = ap.parse_args()

    from cafe_core.commit import read_manifest
    from cafe_core.s3server import LOCAL_CREDENTIALS, EmbeddedS3
    from cafe_core.storage import Storage
    from tests.test_cache import write_pairs

    with tempfile.TemporaryDirectory(prefix="cafe-bench-cache-") as tmp_dir:
        tmp = Path(tmp_dir)
        with EmbeddedS3(tmp / "s3") as endpoint:
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1",
                              AWS_ACCESS_KEY_ID=LOCAL_CREDENTIALS["aws_access_key_id"],
                              AWS_SECRET_ACCESS_KEY=LOCAL_CREDENTIALS["aws_secret_access_key"])
            store = Storage()
            (tmp / "scratch").mkdir()
            prefix = write_pairs(store, "s3://bench/convert", tmp / "scratch", shards=args.shards, rows=args.rows,
                                 row_group=16, image_bytes=20_000)
            sizes = [e.size for e in read_manifest(store, prefix).entries if e.name.startswith("pairs/")]
            print(f"{args.shards} shards of {args.rows} pairs, {sum(sizes) / 2**20:.1f} MiB; GETs per node for one epoch")
            print(f"{'ranks':>5}  {'private (before)':>16}  {'shared (after)':>14}  {'shared, 3-shard limit':>21}")
            for world in args.ranks:
                cells = [run(prefix, world, mode, max(sizes), tmp) for mode in ("private", "shared", "shared, small")]
                print(f"{world:>5}  " + "  ".join(f"{g:>{w - 7}} {s:5.1f}s" for (g, s), w in zip(cells, (16, 14, 21))))


if __name__ == "__main__":
    main()
