"""Evaluation at scale: MMEB's content-addressed items and blockwise scoring, the modality gap read in blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cafe_core.evaluate.export import mmeb_layout
from cafe_core.evaluate.mmeb import candidate_scores, hits_in_blocks, wins
from cafe_core.evaluate.sets import MmebDataset, MmebRow


def _pool_problem(seed: int, queries: int = 23, pool: int = 17, dim: int = 5, tied: bool = False):
    """Queries as keys into a pool of items; lists of varying length drawn from the pool (so candidates repeat
    across and within rows); with ``tied`` the embeddings take 3 values only, so exact ties are everywhere."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((pool + queries, dim)).astype(np.float32)
    if tied:
        emb = emb[rng.integers(0, 3, len(emb))]
    keys = [f"item/{k}" for k in range(len(emb))]
    table = dict(zip(keys, torch.from_numpy(emb)))
    qkeys = keys[pool:]
    cands = [[keys[c] for c in rng.integers(0, pool, rng.integers(1, 9))] for _ in range(queries)]
    return table, qkeys, cands


def _reference(table, qkeys, cands):
    """Every row scored on its own, without pooling or blocks."""
    first, strict = [], []
    for q, row in zip(qkeys, cands):
        scores = candidate_scores(table[q][None], torch.stack([table[c] for c in row])[None])
        first.append(bool(wins(scores, "first")[0]))
        strict.append(bool(wins(scores, "against")[0]))
    return first, strict


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("block_slots", [1, 5, 9, 40, 10_000])
def test_blockwise_hits_equal_row_by_row_scoring_and_fetch_at_most_a_block(tied, block_slots):
    table, qkeys, cands = _pool_problem(seed=3 + tied, tied=tied)
    asked: list[int] = []

    def fetch(keys):
        asked.append(len(keys))
        return torch.stack([table[k] for k in keys])

    hits, strict = hits_in_blocks(qkeys, cands, fetch, block_slots)
    first, strict_ref = _reference(table, qkeys, cands)
    assert hits.tolist() == first and strict.tolist() == strict_ref
    if tied:
        assert first != strict_ref  # the data does exercise the two tie rules
    longest = max(len(c) for c in cands)
    assert max(asked) <= max(block_slots, longest)  # a block holds one query's list at least
    blocks = len(asked) // 2  # each block fetches its queries, then its distinct candidates
    if block_slots == 1:
        assert blocks == len(qkeys)  # one query per block
    if block_slots == 10_000:
        assert blocks == 1


def test_hits_in_blocks_refuses_malformed_input():
    fetch = lambda keys: torch.ones(len(keys), 2)  # noqa: E731
    with pytest.raises(ValueError, match="2 queries but 1 candidate lists"):
        hits_in_blocks(["a", "b"], [["c"]], fetch, 4)
    with pytest.raises(ValueError, match="query 1 has no candidates"):
        hits_in_blocks(["a", "b"], [["c"], []], fetch, 4)
    with pytest.raises(ValueError, match="block_slots must be >= 1"):
        hits_in_blocks(["a"], [["c"]], fetch, 0)


def test_mmeb_layout_addresses_items_by_content():
    png, other = b"\x89PNG-a", b"\x89PNG-b"
    ds = MmebDataset("X", "Classification", "IND", [
        MmebRow("<image> classify", png, [("cat", None), ("dog", None), ("cat", None)]),
        MmebRow("<image> classify", other, [("dog", None), ("cat", None), ("bird", None)]),
        MmebRow("cat", None, [("<image> classify", png), ("cat", other), ("cat", None)]),
    ])
    layout = mmeb_layout(ds)
    assert layout.slots == 3 + 9
    # distinct: the two image queries, the three class names, and ("cat", other image)
    assert len(layout.items) == 6 and all(k.startswith("mmeb/item/") for k in layout.items)
    q0, q1, q2 = layout.queries
    assert q0 != q1 and layout.candidates[2][0] == q0  # the same text and image bytes: the same item
    assert layout.candidates[0][0] == layout.candidates[0][2] == q2 == layout.candidates[2][2]  # "cat", no image
    assert layout.candidates[2][1] not in (q2, q0)  # "cat" with an image is another item
    assert layout.items[q0] == ("<image> classify", png)
    # The key depends on content only: the same row in another dataset gets the same keys.
    assert mmeb_layout(MmebDataset("Y", "VQA", "OOD", ds.rows[:1])).queries == [q0]


def test_mmeb_identity_follows_content_order_and_images():
    from cafe_core.evaluate.export import mmeb_identity

    def identity(rows):
        ds = MmebDataset("X", "VQA", "IND", rows)
        return mmeb_identity(ds, mmeb_layout(ds), "s3://b/mmeb", None)

    base = [MmebRow("<image> q", b"img-1", [("yes", None), ("no", None)])]
    same = identity([MmebRow("<image> q", bytes(bytearray(b"img-1")), [("yes", None), ("no", None)])])
    assert identity(base) == same and same["items"] == 1
    assert identity([MmebRow("<image> q", b"img-2", [("yes", None), ("no", None)])])["digest"] != same["digest"]
    assert identity([MmebRow("<image> q", b"img-1", [("no", None), ("yes", None)])])["digest"] != same["digest"]


class _Rows:
    """A lazy rows source: ``len()`` and slices, recording the largest slice served."""

    def __init__(self, data: torch.Tensor):
        self.data, self.largest = data, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        out = self.data[rows]
        self.largest = max(self.largest, len(out))
        return out


def test_the_modality_gap_read_in_blocks_equals_the_whole():
    from cafe_core.evaluate.gap import modality_gap

    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(37, 6, generator=gen) + 1, torch.randn(37, 6, generator=gen) - 1
    whole = modality_gap(img, txt)
    images, texts = _Rows(img), _Rows(txt)
    blocked = modality_gap(images, texts, block_rows=5)
    assert blocked == pytest.approx(whole, abs=1e-6) and images.largest == texts.largest == 5
    assert modality_gap(img, txt[:30], block_rows=4).keys() == {"gap/centroid_distance"}
    # hand-computed: unit rows (1,0),(0,1) vs (1,0),(1,0): centroids (.5,.5) and (1,0) -> distance sqrt(.5)
    got = modality_gap(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([[1.0, 0.0], [5.0, 0.0]]), block_rows=1)
    assert got == pytest.approx({"gap/centroid_distance": 0.5 ** 0.5, "gap/mean_cosine_pairs": 0.5})
