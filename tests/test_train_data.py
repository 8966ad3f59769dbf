"""The batch order that exact resume depends on (cafe_core/train/data.py), without a model or a process group."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from cafe_core.cache import NodeCache
from cafe_core.commit import read_manifest
from cafe_core.storage import Storage
from cafe_core.train.data import BatchOrder, BatchPlan, DataError, PairShards
from tests.test_cache import CountingStorage, write_pairs


def _steps(order: BatchOrder, start: int, stop: int) -> list[list[int]]:
    return [order.batch(s).tolist() for s in range(start, stop)]


# --- BatchOrder --------------------------------------------------------------------------------------


def test_order_is_a_pure_function_of_seed():
    a, b = BatchOrder(40, 8, seed=3), BatchOrder(40, 8, seed=3)
    assert _steps(a, 0, 15) == _steps(b, 0, 15)
    assert _steps(BatchOrder(40, 8, seed=4), 0, 5) != _steps(a, 0, 5)


def test_order_is_pinned():
    """The order of a released version: changing it silently breaks resuming existing checkpoints. The
    values are numpy's PCG64 permutation for SeedSequence([seed, epoch]) (recorded once)."""
    order = BatchOrder(10, 4, seed=0)
    assert order.steps_per_epoch == 2
    assert order.permutation(0).tolist() == np.random.default_rng([0, 0]).permutation(10).tolist()
    assert order.permutation(1).tolist() == np.random.default_rng([0, 1]).permutation(10).tolist()
    assert _steps(order, 0, 4) == PINNED_SEED0_N10_B4


PINNED_SEED0_N10_B4 = [[4, 6, 2, 7], [3, 5, 9, 0], [9, 1, 3, 8], [7, 6, 0, 4]]


def test_every_example_exactly_once_per_epoch():
    order = BatchOrder(24, 6, seed=1)
    assert order.steps_per_epoch == 4
    for epoch in range(3):
        rows = np.concatenate([order.batch(epoch * 4 + i) for i in range(4)])
        assert sorted(rows.tolist()) == list(range(24)), epoch
    # Epochs are reshuffled, not repeated.
    assert _steps(order, 0, 4) != _steps(order, 4, 8)


def test_incomplete_last_batch_is_dropped():
    order = BatchOrder(26, 8, seed=0)
    assert order.steps_per_epoch == 3  # 26 // 8; 2 rows sit out this epoch
    epoch0 = np.concatenate([order.batch(s) for s in range(3)]).tolist()
    assert len(epoch0) == len(set(epoch0)) == 24 and set(epoch0) <= set(range(26))
    assert set(range(26)) - set(epoch0) == set(order.permutation(0)[24:].tolist())
    assert all(len(order.batch(s)) == 8 for s in range(10))


def test_resume_from_a_step_continues_the_same_order():
    straight = BatchOrder(30, 4, seed=7)
    uninterrupted = _steps(straight, 0, 20)  # 7 steps per epoch: crosses two epoch boundaries
    for resume_at in (0, 1, 6, 7, 13, 19):
        fresh = BatchOrder(30, 4, seed=7)  # a restarted process: nothing cached
        assert _steps(fresh, resume_at, 20) == uninterrupted[resume_at:], resume_at


def test_random_access_across_epochs_gives_the_same_batches():
    """The one-epoch cache must not leak: asking for epochs out of order returns the same rows."""
    order = BatchOrder(12, 4, seed=2)
    forward = _steps(order, 0, 9)
    back_and_forth = [order.batch(s).tolist() for s in (8, 0, 5, 1, 7, 2, 3, 6, 4)]
    assert back_and_forth == [forward[s] for s in (8, 0, 5, 1, 7, 2, 3, 6, 4)]


def test_total_steps():
    order = BatchOrder(100, 16, seed=0)  # 6 steps per epoch
    assert order.total_steps(epochs=1.0, max_steps=None) == 6
    assert order.total_steps(epochs=2.5, max_steps=None) == 15
    assert order.total_steps(epochs=0.1, max_steps=None) == 1  # ceil(0.6), and never 0
    assert order.total_steps(epochs=0.01, max_steps=None) == 1
    assert order.total_steps(epochs=3.0, max_steps=4) == 4  # max_steps wins


def test_fewer_rows_than_a_batch_is_refused():
    with pytest.raises(DataError, match="3 training pairs are fewer than train.global_batch_size=4"):
        BatchOrder(3, 4, seed=0)
    assert BatchOrder(4, 4, seed=0).steps_per_epoch == 1


# --- BatchPlan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("global_batch, accum, world, micro", [(8, 1, 1, 8), (8, 1, 2, 4), (8, 2, 2, 2), (12, 3, 2, 2), (16, 4, 4, 1)])
def test_plan_partitions_the_global_batch(global_batch, accum, world, micro):
    plan = BatchPlan(global_batch, accum, world)
    assert plan.micro_batch == micro
    batch = np.arange(100, 100 + global_batch)
    parts = [plan.rows(batch, m, r) for m in range(accum) for r in range(world)]
    assert all(len(p) == micro for p in parts)
    # Micro-steps first, ranks within: concatenated in that order they are the batch itself.
    assert np.concatenate(parts).tolist() == batch.tolist()


def test_accumulation_splits_before_ranks():
    """A micro-step's contrastive batch is the same rows whether one rank holds it or several."""
    batch = np.arange(8)
    one = BatchPlan(8, 2, 1)
    two = BatchPlan(8, 2, 2)
    assert one.rows(batch, 0, 0).tolist() == [0, 1, 2, 3] and one.rows(batch, 1, 0).tolist() == [4, 5, 6, 7]
    assert two.rows(batch, 0, 0).tolist() == [0, 1] and two.rows(batch, 0, 1).tolist() == [2, 3]
    assert two.rows(batch, 1, 0).tolist() == [4, 5] and two.rows(batch, 1, 1).tolist() == [6, 7]


def test_ranks_together_cover_an_epoch_once():
    order, plan = BatchOrder(48, 12, seed=5), BatchPlan(12, 2, 3)
    seen = [int(i) for s in range(order.steps_per_epoch) for m in range(2) for r in range(3)
            for i in plan.rows(order.batch(s), m, r)]
    assert sorted(seen) == list(range(48))


@pytest.mark.parametrize("global_batch, accum, world", [(6, 4, 2), (8, 3, 1), (10, 1, 4)])
def test_indivisible_batch_names_the_fix(global_batch, accum, world):
    with pytest.raises(DataError) as e:
        BatchPlan(global_batch, accum, world)
    assert str(e.value) == (
        f"train.global_batch_size={global_batch} is not divisible by world size {world} x train.grad_accum {accum}; "
        f"use a multiple of {world * accum}"
    )


# --- PairShards: rows by global index, shards fetched lazily through the node cache ---------------------


def _all_rows(folder) -> list[str]:
    return [r["id"] for f in sorted(folder.glob("part-*.parquet")) for r in pq.read_table(f, columns=["id"]).to_pylist()]


def test_shards_are_fetched_when_a_row_is_first_needed(tmp_path):
    store = CountingStorage()
    prefix = write_pairs(store, str(tmp_path / "convert"), tmp_path, shards=4, rows=10, row_group=4)
    shards = PairShards(store, prefix, NodeCache(tmp_path / "cache", store))
    assert len(shards) == 40 and store.downloads == []  # row counts from the manifest: nothing fetched
    assert [r["id"] for r in shards.rows([25, 21])] == ["shapes/00025", "shapes/00021"]
    assert [u.rsplit("/", 1)[1] for u in store.downloads] == ["part-00002.parquet"]
    order = BatchOrder(40, 8, seed=0)
    expected = _all_rows(tmp_path)
    for step in range(order.steps_per_epoch):  # every row group of every shard, in the pinned order
        batch = order.batch(step)
        assert [r["id"] for r in shards.rows(batch)] == [expected[i] for i in batch]
    assert len(store.downloads) == 4
    with pytest.raises(IndexError):
        shards.rows([40])


def test_shards_of_a_dataset_without_row_counts_are_still_read(tmp_path):
    """Converted before `cafe convert` recorded shard_rows: each shard is fetched once at start to count."""
    store = CountingStorage()
    prefix = write_pairs(store, str(tmp_path / "convert"), tmp_path, shards=3, rows=5, counts=False)
    shards = PairShards(store, prefix, tmp_path / "cache")  # a folder: an unlimited cache there
    assert len(shards) == 15 and len(store.downloads) == 3
    assert [r["id"] for r in shards.rows(range(15))] == _all_rows(tmp_path)
    assert list(shards.sources()) == ["shapes"] * 15  # from the ids, without a source_runs record
    assert len(store.downloads) == 3


def test_a_shard_unlike_its_row_count_is_refused(tmp_path):
    store = Storage()
    prefix = write_pairs(store, str(tmp_path / "convert"), tmp_path, shards=2, rows=5)
    manifest = read_manifest(store, prefix)
    manifest.meta["shard_rows"]["pairs/part-00001.parquet"] = 6
    store.write_bytes(f"{prefix}/_MANIFEST.json", manifest.model_dump_json().encode())
    shards = PairShards(store, prefix, tmp_path / "cache")
    assert shards.rows([0])[0]["id"] == "shapes/00000"
    with pytest.raises(DataError, match="part-00001.parquet has 5 rows, its manifest says 6"):
        shards.rows([5])


def test_convert_records_the_rows_of_each_shard(train_data, tmp_path):
    prefix = str(train_data / "runs" / "data" / "convert")
    manifest = read_manifest(Storage(), prefix)
    shard_rows = manifest.meta["shard_rows"]
    assert sorted(shard_rows) == sorted(e.name for e in manifest.entries if e.name.startswith("pairs/"))
    assert sum(shard_rows.values()) == manifest.meta["accepted"]
    store = CountingStorage()
    shards = PairShards(store, prefix, tmp_path / "cache")
    assert len(shards) == manifest.meta["accepted"] and store.downloads == []
