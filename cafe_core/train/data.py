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

from cafe_core.commit import read_manifest
from cafe_core.errors import BadInput
from cafe_core.storage import Storage
from cafe_core.uris import join, safe_name, sha256_file

COLUMNS = ["id", "image", "caption", "conversations"]
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
    """Rows of a committed pairs dataset by global index. Shards are fetched once to a local cache and
    checked against the manifest's sha256; a few decoded row groups are kept in memory."""

    def __init__(self, store: Storage, prefix: str, cache_dir: str | Path):
        manifest = read_manifest(store, prefix)
        entries = [e for e in manifest.entries if e.name.startswith("pairs/") and e.name.endswith(".parquet")]
        if not entries:
            raise DataError(f"{prefix} has no pairs/*.parquet shards: is it the output of `cafe convert`?")
        folder = Path(cache_dir) / safe_name(prefix)
        folder.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        for e in entries:
            local = folder / safe_name(e.name)
            if not (local.exists() and local.stat().st_size == e.size and sha256_file(local) == e.sha256):
                store.download(join(prefix, e.name), local)
                if sha256_file(local) != e.sha256:
                    raise DataError(f"{join(prefix, e.name)} does not match its manifest checksum")
            self.files.append(local)
        self._meta = [pq.ParquetFile(f).metadata for f in self.files]
        # (file, row group) boundaries as global row offsets
        self._groups: list[tuple[int, int, int]] = []  # (start, file index, group index)
        start = 0
        for fi, meta in enumerate(self._meta):
            for gi in range(meta.num_row_groups):
                self._groups.append((start, fi, gi))
                start += meta.row_group(gi).num_rows
        self._starts = np.array([g[0] for g in self._groups])
        self.n_rows = start
        self._cache: OrderedDict[tuple[int, int], list[dict]] = OrderedDict()

    def __len__(self) -> int:
        return self.n_rows

    def _group(self, fi: int, gi: int) -> list[dict]:
        key = (fi, gi)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            self._cache[key] = pq.ParquetFile(self.files[fi]).read_row_group(gi, columns=COLUMNS).to_pylist()
            if len(self._cache) > ROW_GROUP_CACHE:
                self._cache.popitem(last=False)
        return self._cache[key]

    def rows(self, indices: np.ndarray) -> list[dict]:
        out = []
        for i in indices:
            g = int(np.searchsorted(self._starts, i, side="right") - 1)
            start, fi, gi = self._groups[g]
            out.append(self._group(fi, gi)[int(i) - start])
        return out
