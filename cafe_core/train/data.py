"""Training data: random access to committed pair shards and a deterministic, resumable batch order.

The order is a pure function of (seed, step): epoch e uses the permutation drawn from (seed, e), and the
global batch of step s is the next slice of it. Resuming at step s therefore continues exactly where an
uninterrupted run would be, on any number of ranks. A global batch is split first into gradient-
accumulation micro-steps, then across ranks, so that one rank holding the global micro-batch and W ranks
holding a part each see the same rows in the same contrastive batch (accumulation adds no negatives).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cafe_core.cache import NodeCache
from cafe_core.commit import read_manifest
from cafe_core.data.records import INTERLEAVED_ROWS, NEGATIVE_ROWS, SHARD_ROWS, SOURCE_RUNS, source_of
from cafe_core.errors import BadInput
from cafe_core.storage import Storage
from cafe_core.uris import join

COLUMNS = ["id", "image", "caption", "conversations"]
# Pair schema 2 (cafe_core.data.records.PAIR_SCHEMA_VERSION): an interleaved pair's sides. Shards written
# before them lack these columns; their rows read them as null.
SIDE_COLUMNS = ["query_text", "query_image", "target_text", "target_image", "negative_text", "negative_image"]
ROW_GROUP_CACHE = 8


class DataError(BadInput, ValueError):
    pass


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    grad_accum: int
    world_size: int

    def __post_init__(self):
        if self.global_batch % (self.world_size * self.grad_accum):
            raise DataError(
                f"train.global_batch_size={self.global_batch} is not divisible by world size {self.world_size} "
                f"x train.grad_accum {self.grad_accum}; use a multiple of {self.world_size * self.grad_accum}"
            )

    @property
    def micro_batch(self) -> int:
        """Rows per rank per micro-step."""
        return self.global_batch // (self.world_size * self.grad_accum)

    def rows(self, batch: np.ndarray, micro: int, rank: int) -> np.ndarray:
        per_micro = self.global_batch // self.grad_accum
        step_rows = batch[micro * per_micro : (micro + 1) * per_micro]
        return step_rows[rank * self.micro_batch : (rank + 1) * self.micro_batch]


class BatchOrder:
    def __init__(self, n_rows: int, global_batch: int, seed: int):
        if n_rows < global_batch:
            raise DataError(f"{n_rows} training pairs are fewer than train.global_batch_size={global_batch}")
        self.n_rows, self.global_batch, self.seed = n_rows, global_batch, seed
        self.steps_per_epoch = n_rows // global_batch  # the incomplete last batch is dropped
        self._cached: tuple[int, np.ndarray] | None = None

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps if max_steps else max(1, math.ceil(epochs * self.steps_per_epoch))

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_rows))
        return self._cached[1]

    def batch(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[pos * self.global_batch : (pos + 1) * self.global_batch]


class PairShards:
    """Rows of a committed pairs dataset by global index, each shard fetched lazily, when a row of it is
    first needed, through a node-local cache (one copy per node, checked against the manifest's sha256);
    a few decoded row groups are kept in memory.

    ``cache`` is a NodeCache shared by the node's ranks, or a folder (an unlimited cache there). Row
    counts come from the manifest (`cafe convert` records them as meta ``shard_rows``); a dataset written
    before that has each shard fetched once at start to count its rows."""

    def __init__(self, store: Storage, prefix: str, cache: NodeCache | str | Path):
        manifest = read_manifest(store, prefix)
        self.entries = [e for e in manifest.entries if e.name.startswith("pairs/") and e.name.endswith(".parquet")]
        if not self.entries:
            raise DataError(f"{prefix} has no pairs/*.parquet shards: is it the output of `cafe convert`?")
        self.prefix = prefix
        self.cache = cache if isinstance(cache, NodeCache) else NodeCache(cache, store)
        counts = manifest.meta.get(SHARD_ROWS)
        if not isinstance(counts, dict) or any(e.name not in counts for e in self.entries):
            counts = {e.name: self._read_meta(i).num_rows for i, e in enumerate(self.entries)}  # older datasets
        self._rows = [int(counts[e.name]) for e in self.entries]
        self._shard_starts = np.cumsum([0] + self._rows)
        self.n_rows = int(self._shard_starts[-1])
        self._source_runs = manifest.meta.get(SOURCE_RUNS)
        # MMEB-train pairs (own query and target sides) and pairs with a hard negative; 0 in older datasets.
        self.interleaved_rows = int(manifest.meta.get(INTERLEAVED_ROWS, 0))
        self.negative_rows = int(manifest.meta.get(NEGATIVE_ROWS, 0))
        self._meta: dict[int, tuple[pq.FileMetaData, np.ndarray]] = {}  # shard -> footer, row-group starts
        self._cache: OrderedDict[tuple[int, int], list[dict]] = OrderedDict()

    def __len__(self) -> int:
        return self.n_rows

    def sources(self) -> np.ndarray:
        """The source of every row, from the manifest (a dataset written before it recorded them: from the
        rows' ids, which fetches every shard)."""
        runs = self._source_runs
        if isinstance(runs, list) and sum(n for _, n in runs) == self.n_rows:
            return np.repeat([name for name, _ in runs], [n for _, n in runs])
        ids = [row["id"] for fi in range(len(self.entries)) for row in self._ids(fi)]
        try:
            return np.array([source_of(i) for i in ids])
        except ValueError as e:
            raise DataError(f"{self.prefix}: {e}; convert the data again with this version of `cafe convert`") from None

    def _ids(self, fi: int) -> list[dict]:
        with self._use(fi) as path:
            return pq.read_table(path, columns=["id"]).to_pylist()

    def _use(self, fi: int):
        e = self.entries[fi]
        return self.cache.use(join(self.prefix, e.name), e.sha256, e.size)

    def _read_meta(self, fi: int) -> pq.FileMetaData:
        with self._use(fi) as path:
            return pq.read_metadata(path)

    def _groups(self, fi: int) -> np.ndarray:
        """Row-group start offsets within shard ``fi`` (its footer is read when the shard is first used)."""
        if fi not in self._meta:
            meta = self._read_meta(fi)
            if meta.num_rows != self._rows[fi]:
                raise DataError(f"{join(self.prefix, self.entries[fi].name)} has {meta.num_rows} rows, its manifest "
                                f"says {self._rows[fi]}: the dataset was not written by `cafe convert`; convert it again")
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self._meta[fi] = (meta, np.cumsum([0] + sizes)[:-1])
        return self._meta[fi][1]

    def _group(self, fi: int, gi: int) -> list[dict]:
        key = (fi, gi)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            with self._use(fi) as path:
                shard = pq.ParquetFile(path)
                columns = [c for c in COLUMNS + SIDE_COLUMNS if c in shard.schema_arrow.names]
                rows = shard.read_row_group(gi, columns=columns).to_pylist()
            self._cache[key] = [{**dict.fromkeys(SIDE_COLUMNS), **row} for row in rows]
            if len(self._cache) > ROW_GROUP_CACHE:
                self._cache.popitem(last=False)
        return self._cache[key]

    def rows(self, indices) -> list[dict]:
        out = []
        for i in indices:
            i = int(i)
            if not 0 <= i < self.n_rows:
                raise IndexError(f"row {i} of a dataset of {self.n_rows} pairs")
            fi = int(np.searchsorted(self._shard_starts, i, side="right") - 1)
            starts = self._groups(fi)
            local = i - int(self._shard_starts[fi])
            gi = int(np.searchsorted(starts, local, side="right") - 1)
            out.append(self._group(fi, gi)[local - int(starts[gi])])
        return out
