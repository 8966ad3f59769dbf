"""Held-out image->text top-1 (cafe_core/train/heldout.py) with hand-made embeddings: no model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cafe_core.storage import Storage
from cafe_core.train import heldout
from cafe_core.train.data import DataError
from cafe_core.train.heldout import EMBED_BATCH, Heldout, HeldoutError, from_pairs, i2t_top1, load, split_pairs


class Batch:
    def __init__(self, kind: str, items: list, mode: str):
        self.kind, self.items, self.mode = kind, items, mode

    def to(self, device):
        return self


class FakeBuilder:
    """images_batch / texts_batch as InputBuilder has them; records what it was asked to embed."""

    def __init__(self):
        self.calls: list[tuple[str, list, str]] = []

    def images_batch(self, images, mode):
        self.calls.append(("image", list(images), mode))
        return Batch("image", list(images), mode)

    def texts_batch(self, texts, mode):
        self.calls.append(("text", list(texts), mode))
        return Batch("text", list(texts), mode)

    def interleaved_batch(self, items, always_vision=False):
        self.calls.append(("interleaved", list(items), always_vision))
        return Batch("image", list(items), "interleaved")


class FakeEngine:
    """engine(batch, mode="embed") -> one row per item, looked up in fixed tables."""

    def __init__(self, image_vecs: dict, text_vecs: dict, fail: bool = False):
        self.image_vecs, self.text_vecs, self.fail = image_vecs, text_vecs, fail
        self.training = True
        self.modes_seen: list[bool] = []

    def eval(self):
        self.training = False

    def train(self):
        self.training = True

    def __call__(self, batch, mode):
        assert mode == "embed"
        self.modes_seen.append(self.training)
        if self.fail:
            raise RuntimeError("out of memory")
        table = self.image_vecs if batch.kind == "image" else self.text_vecs
        return torch.tensor([table[x] for x in batch.items], dtype=torch.float16)  # cast to float by the scorer


def test_top1_by_hand():
    # sims = img @ txt.T = [[1, 0, .6], [0, 1, .8], [1, 0, .6]]: rows 0 and 1 pick their own caption, row 2 picks 0.
    data = Heldout([b"a", b"b", b"c"], ["A", "B", "C"])
    engine = FakeEngine({b"a": [1, 0], b"b": [0, 1], b"c": [1, 0]}, {"A": [1, 0], "B": [0, 1], "C": [0.6, 0.8]})
    builder = FakeBuilder()
    assert i2t_top1(engine, builder, data, "cpu", rank=0, world=1) == pytest.approx(2 / 3)
    assert builder.calls == [("image", [b"a", b"b", b"c"], "pairs"), ("text", ["A", "B", "C"], "pairs")]
    assert engine.modes_seen == [False, False] and engine.training  # embedded in eval mode, training mode restored


def test_top1_uses_raw_dot_products():
    """Scores are the dot products of what the model returns (it returns normalised embeddings): a longer
    wrong caption vector wins over a shorter right one."""
    data = Heldout([b"a", b"b"], ["A", "B"])
    engine = FakeEngine({b"a": [1, 0], b"b": [0, 1]}, {"A": [0.5, 0], "B": [2, 1]})
    assert i2t_top1(engine, FakeBuilder(), data, "cpu", 0, 1) == pytest.approx(0.5)  # a -> B (2 > .5), b -> B


def test_top1_in_chunks_of_embed_batch():
    n = EMBED_BATCH + 4
    images, captions = [bytes([i]) for i in range(n)], [f"c{i}" for i in range(n)]
    one_hot = lambda i: [float(i == j) for j in range(n)]  # noqa: E731
    swapped = {5: 7, 7: 5}  # captions 5 and 7 trade places: those two images miss
    engine = FakeEngine({bytes([i]): one_hot(i) for i in range(n)}, {f"c{i}": one_hot(swapped.get(i, i)) for i in range(n)})
    builder = FakeBuilder()
    assert i2t_top1(engine, builder, Heldout(images, captions), "cpu", 0, 1, mode="interleaved") == pytest.approx((n - 2) / n)
    assert [(kind, len(items), mode) for kind, items, mode in builder.calls] == [
        ("image", EMBED_BATCH, "interleaved"), ("image", 4, "interleaved"),
        ("text", EMBED_BATCH, "interleaved"), ("text", 4, "interleaved"),
    ]


def test_each_rank_embeds_an_equal_share(monkeypatch):
    """5 items on 2 ranks: shares of 3; rank 1 embeds items 3, 4 and 4 again, and the repeat is dropped."""
    images, captions = [bytes([i]) for i in range(5)], [f"c{i}" for i in range(5)]
    vec = lambda i: [float(i == j) for j in range(5)]  # noqa: E731
    engine = FakeEngine({bytes([i]): vec(i) for i in range(5)}, {f"c{i}": vec(i if i != 4 else 0) for i in range(5)})
    def fake_gather(x, world):  # what all_gather returns: rank 0's share (items 0, 1, 2), then this rank's
        assert world == 2 and x.shape == (3, 5)
        return torch.cat([torch.tensor([vec(0), vec(1), vec(2)]), x])

    monkeypatch.setattr(heldout, "_gather", fake_gather)
    builder = FakeBuilder()
    acc = i2t_top1(engine, builder, Heldout(images, captions), "cpu", rank=1, world=2)
    assert builder.calls[0][1] == [b"\x03", b"\x04", b"\x04"] and builder.calls[1][1] == ["c3", "c4", "c4"]
    # 6 gathered rows cut to 5; item 4's caption embeds like item 0: 4 of 5 right.
    assert acc == pytest.approx(4 / 5)


def test_training_mode_is_restored_when_embedding_fails():
    engine = FakeEngine({}, {}, fail=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        i2t_top1(engine, FakeBuilder(), Heldout([b"a", b"b"], ["A", "B"]), "cpu", 0, 1)
    assert engine.training


def test_from_pairs():
    h = from_pairs([{"image": b"x", "caption": "X", "id": "1"}, {"image": b"y", "caption": "Y", "id": "2"}])
    assert (h.images, h.captions, len(h)) == ([b"x", b"y"], ["X", "Y"], 2)


def test_mmeb_pairs_score_each_query_against_the_targets():
    """Held-out MMEB-train pairs (interleaved mode): each side with its own text and image, through
    interleaved_batch with the blank image for chunks without one; image-caption pairs among them read as
    image + pair_query against the caption. Negatives are not candidates here."""
    side_columns = ("query_text", "query_image", "target_text", "target_image", "negative_text", "negative_image")
    mmeb = lambda *cells: {"image": None, "caption": None, **dict(zip(side_columns, cells))}  # noqa: E731
    rows = [mmeb("q0", b"i0", "t0", None, "t1", None), mmeb("q1", None, "t1", b"i1", None, None),
            {"image": b"i2", "caption": "t2", "query_text": None}]
    data = from_pairs(rows, "<image>\nQ")
    assert [p.query.text for p in data.pairs] == ["q0", "q1", "<image>\nQ"] and data.pairs[0].negative.text == "t1"
    vec = {("q0", b"i0"): [1, 0, 0], ("q1", None): [0, 0, 1], ("<image>\nQ", b"i2"): [0, 1, 0],
           ("t0", None): [1, 0, 0], ("t1", b"i1"): [0, 1, 0], ("t2", None): [0, 0, 1]}
    builder = FakeBuilder()
    assert i2t_top1(FakeEngine(vec, {}), builder, data, "cpu", 0, 1, mode="interleaved") == pytest.approx(1 / 3)
    assert builder.calls == [("interleaved", [("q0", b"i0"), ("q1", None), ("<image>\nQ", b"i2")], True),
                             ("interleaved", [("t0", None), ("t1", b"i1"), ("t2", None)], True)]
    assert from_pairs(rows[2:]).pairs is None  # image-caption pairs alone: images against captions, as before


def _write_set(path, rows, struct_images=True):
    images = [{"bytes": img, "path": None} for img, _ in rows] if struct_images else [img for img, _ in rows]
    pq.write_table(pa.table({"image": images, "caption": [caps for _, caps in rows]}), path)


def test_load_takes_the_first_images_with_their_first_caption(tmp_path):
    _write_set(tmp_path / "test-00000.parquet", [(b"i0", ["c0", "c0b"]), (b"i1", ["c1"])])
    _write_set(tmp_path / "test-00001.parquet", [(b"i2", ["c2", "x"]), (b"i3", ["c3"])], struct_images=False)
    (tmp_path / "README.md").write_text("not a shard")
    got = load(Storage(), str(tmp_path), size=3)
    assert (got.images, got.captions) == ([b"i0", b"i1", b"i2"], ["c0", "c1", "c2"])
    everything = load(Storage(), str(tmp_path), size=100)  # fewer than asked: all of them
    assert (everything.images, everything.captions) == ([b"i0", b"i1", b"i2", b"i3"], ["c0", "c1", "c2", "c3"])


def test_load_errors_name_the_setting(tmp_path):
    with pytest.raises(HeldoutError) as e:
        load(Storage(), str(tmp_path), size=4)
    assert str(e.value) == f"train.heldout: no .parquet files under {tmp_path} (a retrieval set: image, caption list)"
    assert isinstance(e.value, DataError)  # reported like other data errors (exit 2)
    _write_set(tmp_path / "one.parquet", [(b"i0", ["c0"])])
    with pytest.raises(HeldoutError, match=r"has 1 image\(s\); retrieval needs at least 2"):
        load(Storage(), str(tmp_path), size=4)


# --- which converted pairs are held out (split_pairs) --------------------------------------------------


def ids_of(**sizes):
    """Hand-built stored ids, sources interleaved (a converted dataset keeps its sources' input order)."""
    out = [f"{s}/{i}" for s, n in sizes.items() for i in range(n)]
    return sorted(out, key=lambda x: int(x.rsplit("/", 1)[1]))


def by_source(ids, idx):
    from collections import Counter

    return Counter(ids[i].split("/", 1)[0] for i in idx)


def check_partition(ids, train, held, n):
    assert len(held) == n and len(train) == len(ids) - n
    assert list(held) == sorted(held) and list(train) == sorted(train)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(ids)))
    assert train.dtype == held.dtype == np.int64


def test_split_pairs_is_proportional_with_one_from_every_source():
    ids = ids_of(big=80, mid=15, small=5)
    train, held = split_pairs(ids, 10, seed=0)
    check_partition(ids, train, held, 10)
    assert by_source(ids, held) == {"big": 8, "mid": 1, "small": 1}  # quotas 8, 1.5, .5; one each first
    train, held = split_pairs(ids, 20, seed=0)
    assert by_source(ids, held) == {"big": 16, "mid": 3, "small": 1}  # exactly proportional
    ids = ids_of(big=98, tiny=1, tinier=1)
    assert by_source(ids, split_pairs(ids, 3, seed=0)[1]) == {"big": 1, "tiny": 1, "tinier": 1}


def test_split_pairs_not_the_last_rows():
    """The old rule (the last n rows) held out only the last source; these come from all of them."""
    ids = [f"a/{i}" for i in range(50)] + [f"b/{i}" for i in range(50)]
    _, held = split_pairs(ids, 10, seed=3)
    assert by_source(ids, held) == {"a": 5, "b": 5}


def test_split_pairs_fewer_than_the_sources_takes_the_largest():
    ids = ids_of(a=10, b=30, c=20, d=20)
    assert by_source(ids, split_pairs(ids, 2, seed=0)[1]) == {"b": 1, "c": 1}  # c before d: by name on ties
    train, held = split_pairs(ids, 0, seed=0)
    check_partition(ids, train, held, 0)


def test_split_pairs_is_deterministic_and_seeded():
    ids = ids_of(a=200, b=100)
    first = split_pairs(ids, 30, seed=7)
    again = split_pairs(list(ids), 30, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    other = split_pairs(ids, 30, seed=8)[1]
    assert not np.array_equal(first[1], other) and by_source(ids, other) == by_source(ids, first[1])
    # a source's draw depends on its own rows only: more rows of b leave a's choice as it was
    more = ids + [f"b/{i}" for i in range(100, 400)]
    a_only = lambda ids, idx: [ids[i] for i in idx if ids[i].startswith("a/")]  # noqa: E731
    held_more = split_pairs(more, 30 * 2, seed=7)[1]  # a's share stays 20
    assert by_source(more, held_more)["a"] == 20 and a_only(more, held_more) == a_only(ids, first[1])


def test_split_pairs_ids_with_slashes_in_the_original_id():
    ids = ["coco/train/1.jpg", "coco/train/2.jpg", "sam/1/2/3", "sam/x", "coco/val/1"]
    assert by_source(ids, split_pairs(ids, 2, seed=0)[1]) == {"coco": 1, "sam": 1}


@pytest.mark.parametrize("n", [-1, 4, 5])
def test_split_pairs_refuses_sizes_that_leave_no_training(n):
    with pytest.raises(HeldoutError, match="heldout_size"):
        split_pairs(["a/1", "a/2", "b/1", "b/2"], n, seed=0)


def test_split_pairs_refuses_ids_without_a_source():
    with pytest.raises(HeldoutError, match="not '<source>/<id>'.*convert the data again"):
        split_pairs(["a/1", "r0003", "b/2"], 1, seed=0)
