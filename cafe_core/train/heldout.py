"""Held-out in-batch retrieval during training: image->text top-1 over a fixed set (query->target for
MMEB-train pairs, which interleaved mode reads with their own sides), so that learning is
visible while the run goes (chance is 1/N). Every rank embeds an equal share (ZeRO-3 needs the same calls
on every rank); embeddings are gathered and scored once. `split_pairs` chooses which converted pairs are
held out (drawn from every source)."""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from cafe_core.config import PromptConfig
from cafe_core.data.records import source_of
from cafe_core.model.inputs import InputBuilder, InterleavedPair, interleaved_pair
from cafe_core.storage import Storage
from cafe_core.train.data import DataError

EMBED_BATCH = 16
DEFAULT_PAIR_QUERY = PromptConfig.model_fields["pair_query"].default


class HeldoutError(DataError):
    pass


@dataclass
class Heldout:
    images: list[bytes | None]
    captions: list[str | None]
    # Set when some held-out pairs are MMEB-train pairs: what interleaved mode scores, each pair's query
    # against its target (image + pair_query against the caption for image-caption pairs). None: images
    # against captions.
    pairs: list[InterleavedPair] | None = None

    def __len__(self) -> int:
        return len(self.images)


def _shares(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many of n held-out pairs each source gives: proportional to its size (largest remainders), at
    least one from every source when n allows; when it does not, the largest sources (then names) first."""
    total = sum(sizes.values())
    names = sorted(sizes, key=lambda s: (-sizes[s], s))
    take = {s: 1 if n >= len(names) else 0 for s in names}
    for _ in range(n - sum(take.values())):  # each next pair to the source furthest below its quota
        best = max((s for s in names if take[s] < sizes[s]), key=lambda s: n * sizes[s] / total - take[s])
        take[best] += 1
    return take


def _source_seed(seed: int, source: str) -> list[int]:
    return [seed % 2**64, int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")]


def split_pairs(ids: Sequence[str], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """split_by_source over the sources named by stored pair ids ("<source>/<id>")."""
    try:
        sources = [source_of(stored) for stored in ids]
    except ValueError as e:
        raise HeldoutError(f"{e}: convert the data again with this version of `cafe convert`") from None
    return split_by_source(sources, n, seed)


def split_by_source(sources: Sequence[str], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) of rows whose sources are `sources`: n held-out rows spread over
    the sources in proportion to their sizes, at least one from each source where n allows, drawn at
    random within each source. Deterministic for (sources, n, seed); both arrays sorted, disjoint,
    together every index. A source's draw depends only on its own rows and the seed."""
    if not 0 <= n < len(sources):
        raise HeldoutError(f"train.heldout_size={n}: must be at least 0 and below the {len(sources)} pairs")
    rows: dict[str, list[int]] = defaultdict(list)
    for i, source in enumerate(sources):
        rows[str(source)].append(i)
    held = [
        np.random.default_rng(_source_seed(seed, s)).choice(np.asarray(rows[s]), size=k, replace=False)
        for s, k in _shares({s: len(r) for s, r in rows.items()}, n).items() if k
    ]
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    train = np.ones(len(sources), dtype=bool)
    train[held_idx] = False
    return np.flatnonzero(train).astype(np.int64), held_idx.astype(np.int64)


def from_pairs(rows: list[dict], pair_query: str = DEFAULT_PAIR_QUERY) -> Heldout:
    """Held-out converted pairs; `pair_query` (train.prompts.pair_query) is the query text of image-caption
    pairs among MMEB-train ones."""
    mmeb = any(r.get("query_text") is not None for r in rows)
    return Heldout([r["image"] for r in rows], [r["caption"] for r in rows],
                   [interleaved_pair(r, pair_query) for r in rows] if mmeb else None)


def load(store: Storage, uri: str, size: int) -> Heldout:
    """The first `size` images of a retrieval set (Flickr30K test layout), each with its first caption."""
    shards = [o.uri for o in store.list(uri) if o.uri.endswith(".parquet")]
    if not shards:
        raise HeldoutError(f"train.heldout: no .parquet files under {uri} (a retrieval set: image, caption list)")
    images, captions = [], []
    for shard in shards:
        with store.local_copy(shard) as path:
            for row in pq.read_table(path, columns=["image", "caption"]).to_pylist():
                image = row["image"]["bytes"] if isinstance(row["image"], dict) else row["image"]
                images.append(image)
                captions.append(row["caption"][0])
                if len(images) == size:
                    return Heldout(images, captions)
    if len(images) < 2:
        raise HeldoutError(f"train.heldout: {uri} has {len(images)} image(s); retrieval needs at least 2")
    return Heldout(images, captions)


def _embed(engine, batches, device) -> torch.Tensor:
    return torch.cat([engine(b.to(device), mode="embed").float() for b in batches])


def _gather(x: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def i2t_top1(engine, builder: InputBuilder, heldout: Heldout, device, rank: int, world: int, mode: str = "pairs") -> float:
    n = len(heldout)
    share = math.ceil(n / world)
    # Equal shares on every rank: the last rank repeats its last item, dropped after the gather.
    idx = [min(i, n - 1) for i in range(rank * share, (rank + 1) * share)]
    chunks = [idx[i : i + EMBED_BATCH] for i in range(0, share, EMBED_BATCH)]
    engine.eval()
    try:
        if mode == "interleaved" and heldout.pairs is not None:
            def sides(which: str):  # every rank runs the vision tower on each chunk (ZeRO-3 gathers in step)
                for c in chunks:
                    picked = [getattr(heldout.pairs[i], which) for i in c]
                    yield builder.interleaved_batch([(s.text, s.image) for s in picked], always_vision=True)

            img, txt = _embed(engine, sides("query"), device), _embed(engine, sides("target"), device)
        else:
            img = _embed(engine, (builder.images_batch([heldout.images[i] for i in c], mode) for c in chunks), device)
            txt = _embed(engine, (builder.texts_batch([heldout.captions[i] for i in c], mode) for c in chunks), device)
    finally:
        engine.train()
    img, txt = _gather(img, world)[:n], _gather(txt, world)[:n]
    hits = (img @ txt.T).argmax(dim=1) == torch.arange(n, device=img.device)
    return float(hits.float().mean())
