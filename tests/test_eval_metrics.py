"""Hand-computed cases for the evaluation metrics: every matrix is written out here, every expected number
is worked out in the comments beside it."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cafe_core.data.shapes import detailed_caption, sample_scene
from cafe_core.data.synth import vocabulary
from cafe_core.evaluate.caption import caption_metrics, objects_mentioned, plural
from cafe_core.evaluate.choice import choice_accuracy, choice_metrics, extract_letter, metric_part
from cafe_core.evaluate.gap import gap_scatter_png, modality_gap
from cafe_core.evaluate.mmeb import candidate_scores, hits_at_1, mmeb_summary, precision_at_1, wins
from cafe_core.evaluate.pope import parse_yes_no, pope_metrics, pope_summary
from cafe_core.evaluate.retrieval import recall_at_k, retrieval_ranks, retrieval_recall, unit_rows
from cafe_core.evaluate.sets import MmebDataset


def unit(*degrees: float) -> np.ndarray:
    """2-D unit vectors at the given angles: the cosine of two of them is cos(angle difference)."""
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


# --- retrieval ---------------------------------------------------------------------------------------

# images at 0, 90, 45 degrees; captions c0, c1 of image 0 at 10 and 80 degrees, c2 of image 1 at 60,
# c3 of image 2 at 170. Cosines (rows images, columns captions):
#          c0     c1     c2     c3
#   i0   .985   .174   .500  -.985
#   i1   .174   .985   .866   .174
#   i2   .819   .819   .966  -.574
IMAGES = unit(0, 90, 45) * np.array([[1.0], [3.0], [0.5]], dtype=np.float32)  # lengths must not matter
CAPTIONS = unit(10, 80, 60, 170)
CAPTION_IMAGE = [0, 0, 1, 2]


def test_retrieval_ranks_by_hand():
    ranks = retrieval_ranks(IMAGES, CAPTIONS, CAPTION_IMAGE)
    # i0: best own caption c0 .985, no wrong caption >= it -> 1
    # i1: own c2 .866, wrong c1 .985 is higher -> 2
    # i2: own c3 -.574, wrong c0, c1, c2 all higher -> 4
    assert ranks.i2t.tolist() == [1, 2, 4]
    # c0: own i0 .985 highest -> 1; c1: own i0 .174, i1 .985 and i2 .819 are >= -> 3
    # c2: own i1 .866, i2 .966 higher -> 2; c3: own i2 -.574, i1 .174 higher -> 2
    assert ranks.t2i.tolist() == [1, 3, 2, 2]
    # no ties: both rules agree
    assert ranks.i2t_strict.tolist() == [1, 2, 4] and ranks.t2i_strict.tolist() == [1, 3, 2, 2]


def test_retrieval_recall_by_hand_and_k_clamps():
    got = retrieval_recall(IMAGES, CAPTIONS, CAPTION_IMAGE, ks=(1, 2, 3, 4, 10))
    # i2t ranks 1, 2, 4 of 3 images; t2i ranks 1, 3, 2, 2 of 4 captions
    expected = {
        "i2t_R@1": 1 / 3, "i2t_R@2": 2 / 3, "i2t_R@3": 2 / 3, "i2t_R@4": 1.0, "i2t_R@10": 1.0,
        "t2i_R@1": 1 / 4, "t2i_R@2": 3 / 4, "t2i_R@3": 1.0, "t2i_R@4": 1.0, "t2i_R@10": 1.0,
    }
    assert got == pytest.approx({**expected, **{f"{k}_strict": v for k, v in expected.items()}})  # no ties here
    assert all(type(v) is float for v in got.values())
    assert list(retrieval_recall(IMAGES, CAPTIONS, CAPTION_IMAGE)) == [
        "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10",
        "i2t_R@1_strict", "i2t_R@5_strict", "i2t_R@10_strict", "t2i_R@1_strict", "t2i_R@5_strict", "t2i_R@10_strict"]


def test_retrieval_ties_strict_against_and_by_index_order():
    # Every embedding equal: all scores tie. 2 images x 2 captions each (c0, c1 of i0; c2, c3 of i1).
    # Strict: 2 wrong captions tie with the best own caption -> i2t rank 3; 1 wrong image ties -> t2i rank 2.
    ones = np.ones((2, 4), dtype=np.float32)
    ranks = retrieval_ranks(ones, np.ones((4, 4), dtype=np.float32), [0, 0, 1, 1])
    assert ranks.i2t_strict.tolist() == [3, 3] and ranks.t2i_strict.tolist() == [2, 2, 2, 2]
    # Index order: i0's first caption c0 comes first -> 1; i1's first own caption c2 comes after c0, c1 -> 3.
    # c0, c1: their image i0 is first -> 1; c2, c3: i0 comes before i1 -> 2.
    assert ranks.i2t.tolist() == [1, 3] and ranks.t2i.tolist() == [1, 1, 2, 2]
    got = retrieval_recall(ones, np.ones((4, 4)), [0, 0, 1, 1], ks=(1, 2))
    assert (got["i2t_R@1_strict"], got["i2t_R@1"], got["t2i_R@1"]) == (0.0, 0.5, 0.5)  # the collapsed model
    # A tie at the boundary with a wrong caption: i0 = (1, 0) scores .707 with its own c0 = (1, 1) and with
    # c1 = (1, -1) of image 1 -> strict rank 2; by index order c0 comes first -> 1.
    # i1 = (0, -1): own c1 .707, c0 -.707 -> 1 either way. t2i: c1 (1, -1) scores .707 with i0 (wrong, before
    # its own i1) -> 2 both ways.
    ranks = retrieval_ranks([[1.0, 0.0], [0.0, -1.0]], [[1.0, 1.0], [1.0, -1.0]], [0, 1])
    assert ranks.i2t_strict.tolist() == [2, 1] and ranks.i2t.tolist() == [1, 1]
    assert ranks.t2i_strict.tolist() == [1, 2] and ranks.t2i.tolist() == [1, 2]
    # The same tie with the wrong caption first: index order puts it ahead too.
    ranks = retrieval_ranks([[1.0, 0.0], [0.0, -1.0]], [[1.0, -1.0], [1.0, 1.0]], [1, 0])
    assert ranks.i2t.tolist() == [2, 1] and ranks.i2t_strict.tolist() == [2, 1]


def test_retrieval_index_order_matches_a_stable_sort_on_tied_data():
    # Embeddings on a coarse grid: many exact ties. Index order = the position in a stable descending sort.
    rng = np.random.default_rng(1)
    img = rng.integers(-1, 2, size=(12, 3)).astype(np.float32) + np.array([[0, 0, 3]], dtype=np.float32)
    txt = rng.integers(-1, 2, size=(30, 3)).astype(np.float32) + np.array([[0, 0, 3]], dtype=np.float32)
    cap = np.concatenate([np.arange(12), rng.integers(0, 12, size=18)])
    ranks = retrieval_ranks(img, txt, cap)
    sim = (unit_rows(img, "img") @ unit_rows(txt, "txt").T).numpy()  # the exact scores the ranks compare
    assert (ranks.i2t_strict >= ranks.i2t).all() and (ranks.i2t_strict > ranks.i2t).any()  # the data has ties
    for i in range(12):
        order = np.argsort(-sim[i], kind="stable").tolist()
        assert ranks.i2t[i] == 1 + min(order.index(j) for j in np.flatnonzero(cap == i))
    for j in range(30):
        assert ranks.t2i[j] == 1 + np.argsort(-sim[:, j], kind="stable").tolist().index(cap[j])


def test_retrieval_ties_among_positives_do_not_count():
    # i0's two captions both score 1.0: they are positives, so i0 still ranks 1.
    ranks = retrieval_ranks([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], [0, 0, 1])
    assert ranks.i2t.tolist() == [1, 1] and ranks.t2i.tolist() == [1, 1, 1]


def test_retrieval_matches_a_sorting_loop_on_random_data():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(40, 8)), rng.normal(size=(120, 8))
    cap = rng.integers(0, 40, size=120)
    cap[:40] = np.arange(40)  # every image has a caption
    ranks = retrieval_ranks(img, txt, cap)
    sim = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    for i in range(40):  # continuous data: no ties, so position in a sort is the rank
        order = np.argsort(-sim[i])
        assert ranks.i2t[i] == 1 + min(int(np.flatnonzero(order == j)[0]) for j in np.flatnonzero(cap == i))
    for j in range(120):
        assert ranks.t2i[j] == 1 + int(np.flatnonzero(np.argsort(-sim[:, j]) == cap[j])[0])


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval_ranks(np.eye(2), np.eye(2), [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks(np.array([[np.nan, 0.0]]), np.eye(2)[:1], [0])
    with pytest.raises(ValueError, match="non-empty"):
        retrieval_ranks(np.zeros((0, 2)), np.eye(2), [0, 0])
    with pytest.raises(ValueError, match="dim"):
        retrieval_ranks(np.eye(2), np.ones((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="positive"):
        recall_at_k(retrieval_ranks(np.eye(2), np.eye(2), [0, 1]), ks=(0,))


def test_retrieval_upcasts_low_precision():
    # bf16 input is scored in float32 (the same ranks as float32 input).
    img, txt = torch.tensor(IMAGES), torch.tensor(CAPTIONS)
    assert retrieval_ranks(img.bfloat16(), txt.bfloat16(), CAPTION_IMAGE).i2t.tolist() == [1, 2, 4]


# Blockwise scoring: the ranks must not depend on the block shape.

RANK_FIELDS = ("i2t", "t2i", "i2t_strict", "t2i_strict")
BLOCK_SHAPES = [(1, 1), (3, 7), (7, 3), (2, 5), (5, 2), (4, 11), (1000, 1000)]


def exact_rows(rng: np.random.Generator, n: int, dim: int = 6) -> np.ndarray:
    """Rows with four entries of +-1, the rest 0: their unit rows (+-0.5) and every product of two are exact
    in float32 whatever the summation order, so each score is the same in any block shape and ties stay."""
    x = np.zeros((n, dim), dtype=np.float32)
    for row in x:
        row[rng.choice(dim, size=4, replace=False)] = rng.choice([-1.0, 1.0], size=4)
    return x


def retrieval_case(case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    cap = np.repeat(np.arange(9), [3, 1, 2, 4, 3, 1, 5, 2, 2])  # 9 images, 23 captions, in image order
    if case == "random":
        return rng.normal(size=(9, 8)), rng.normal(size=(23, 8)), cap
    if case == "collapsed":  # every embedding equal: every score ties
        return np.ones((9, 4), dtype=np.float32), np.ones((23, 4), dtype=np.float32), cap
    if case == "duplicates":  # few distinct rows: duplicate images and captions, many exact ties
        return exact_rows(rng, 3)[rng.integers(0, 3, size=9)], exact_rows(rng, 4)[rng.integers(0, 4, size=23)], cap
    rng.shuffle(cap)  # captions not in image order
    if case == "shuffled random":
        return rng.normal(size=(9, 8)), rng.normal(size=(23, 8)), cap
    return exact_rows(rng, 9), exact_rows(rng, 4)[rng.integers(0, 4, size=23)], cap  # "shuffled ties"


@pytest.mark.parametrize("case", ["random", "collapsed", "duplicates", "shuffled random", "shuffled ties"])
def test_retrieval_blockwise_equals_unblocked(case):
    img, txt, cap = retrieval_case(case)
    whole = retrieval_ranks(img, txt, cap)  # the default blocks hold everything: one product
    if case != "random" and case != "shuffled random":
        assert (whole.i2t_strict > whole.i2t).any() or (whole.t2i_strict > whole.t2i).any()  # the data has ties
    for rows, cols in BLOCK_SHAPES:
        got = retrieval_ranks(img, txt, cap, block_rows=rows, block_cols=cols)
        for field in RANK_FIELDS:
            assert getattr(got, field).tolist() == getattr(whole, field).tolist(), (rows, cols, field)


@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 7), (2, 5), (100, 100)])
def test_retrieval_collapsed_model_by_hand_in_any_blocks(rows, cols):
    # 9 images, 23 captions, all equal. Strict: the 23 - n_i wrong captions tie with image i's best -> rank
    # 24 - n_i; every other image ties with a caption's own -> rank 9. Index order: image i ranks after the
    # captions before its first one; caption j after the images before its own.
    img, txt, cap = retrieval_case("collapsed")
    ranks = retrieval_ranks(img, txt, cap, block_rows=rows, block_cols=cols)
    first = np.searchsorted(cap, np.arange(9))
    assert ranks.i2t_strict.tolist() == (24 - np.bincount(cap)).tolist() and ranks.t2i_strict.tolist() == [9] * 23
    assert ranks.i2t.tolist() == (1 + first).tolist() and ranks.t2i.tolist() == (1 + cap).tolist()
    got = retrieval_recall(img, txt, cap, ks=(1,), block_rows=rows, block_cols=cols)
    assert (got["i2t_R@1_strict"], got["t2i_R@1_strict"], got["i2t_R@1"], got["t2i_R@1"]) == (0.0, 0.0, 1 / 9, 3 / 23)


def ranks_from_scores(sim: np.ndarray, cap: np.ndarray) -> dict[str, list[int]]:
    """The module docstring's rank formulas, applied row by row to a given score matrix."""
    n_img, n_txt = sim.shape
    own = sim[cap, np.arange(n_txt)]
    out: dict[str, list[int]] = {field: [] for field in RANK_FIELDS}
    for i in range(n_img):
        positives, wrong = np.flatnonzero(cap == i), cap != i
        best = own[positives].max()
        first = positives[own[positives] == best].min()
        tied = sim[i, wrong] == best
        out["i2t"].append(1 + int((sim[i, wrong] > best).sum() + (tied & (np.flatnonzero(wrong) < first)).sum()))
        out["i2t_strict"].append(1 + int((sim[i, wrong] > best).sum() + tied.sum()))
    for j in range(n_txt):
        other = np.arange(n_img) != cap[j]
        tied = sim[other, j] == own[j]
        out["t2i"].append(1 + int((sim[other, j] > own[j]).sum() + (tied & (np.flatnonzero(other) < cap[j])).sum()))
        out["t2i_strict"].append(1 + int((sim[other, j] > own[j]).sum() + tied.sum()))
    return out


@pytest.mark.parametrize("rows, cols", [(1, 1), (3, 7), (4, 5), (100, 100)])
def test_retrieval_reads_own_and_best_from_the_scores_it_compares(monkeypatch, rows, cols):
    # Matrix kernels of other shapes (or devices) may round a dot product differently by an ulp. Simulate
    # it: every product call moves random scores of a collapsed model one ulp up or down, differently per
    # call. The ranks must be exactly those of the scores that were counted (each counted once), which holds
    # only if each own score and best positive is read from those very elements, never recomputed.
    from cafe_core.evaluate import retrieval as module

    rng = torch.Generator().manual_seed(rows * 100 + cols)
    real_mm = torch.mm

    def rounding_mm(a, b, *, out):
        real_mm(a, b, out=out)
        step = torch.randint(-1, 2, out.shape, generator=rng).to(out.dtype)  # -1, 0 or +1 ulp
        out.copy_(torch.where(step == 0, out, torch.nextafter(out, step * torch.inf)))
        return out

    img, txt, cap = retrieval_case("collapsed")
    counted, times = np.full((9, 23), np.nan, dtype=np.float32), np.zeros((9, 23), dtype=int)
    real_count = module._BlockCounter.count

    def recording_count(self, scores, r0, c0):
        block = (slice(r0, r0 + scores.shape[0]), slice(c0, c0 + scores.shape[1]))
        counted[block], times[block] = scores.cpu().numpy(), times[block] + 1
        return real_count(self, scores, r0, c0)

    real_ranks, own = module._BlockCounter.ranks, {}

    def recording_ranks(self):
        own["read"] = self.own.cpu().numpy()
        return real_ranks(self)

    monkeypatch.setattr(torch, "mm", rounding_mm)
    monkeypatch.setattr(module._BlockCounter, "count", recording_count)
    monkeypatch.setattr(module._BlockCounter, "ranks", recording_ranks)
    ranks = retrieval_ranks(img, txt, cap, block_rows=rows, block_cols=cols)
    assert (times == 1).all()  # every score counted exactly once
    own_pairs = (cap, np.arange(23))
    assert np.isneginf(counted[own_pairs]).all() and np.isfinite(counted).sum() == 9 * 23 - 23  # set aside
    counted[own_pairs] = own["read"]  # as read from the products before they were set aside
    assert len(np.unique(counted)) == 3  # the simulated rounding took effect: 1 - ulp, 1, 1 + ulp
    expected = ranks_from_scores(counted, cap)
    for field in RANK_FIELDS:
        assert getattr(ranks, field).tolist() == expected[field], field


class CountingRows:
    """A lazily loaded view of embeddings: only len() and row slices, counting the rows it serves."""

    def __init__(self, x: np.ndarray):
        self.x, self.served, self.largest = x, 0, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows: slice) -> np.ndarray:
        assert isinstance(rows, slice) and rows.step is None, rows
        out = self.x[rows]
        self.served += len(out)
        self.largest = max(self.largest, len(out))
        return out


def test_retrieval_reads_a_lazy_view_block_by_block():
    for case in ("random", "shuffled ties"):
        img, txt, cap = retrieval_case(case)
        whole = retrieval_ranks(img, txt, cap)
        images, texts = CountingRows(img), CountingRows(txt)
        got = retrieval_ranks(images, texts, cap, block_rows=4, block_cols=6)
        for field in RANK_FIELDS:
            assert getattr(got, field).tolist() == getattr(whole, field).tolist(), (case, field)
        assert images.largest <= 4 and texts.largest <= 6  # no request beyond one block
        assert images.served >= len(img) and texts.served >= len(txt)  # every row was read


def test_retrieval_blockwise_rejects_bad_blocks_and_late_bad_rows():
    img, txt, cap = retrieval_case("random")
    with pytest.raises(ValueError, match="block_rows"):
        retrieval_ranks(img, txt, cap, block_rows=0)
    bad = img.copy()
    bad[-1, 0] = np.nan  # in the last block only: found when that block is read
    with pytest.raises(ValueError, match="NaN"):
        retrieval_ranks(bad, txt, cap, block_rows=2, block_cols=5)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        retrieval_ranks(np.float32(1.0), txt, cap)


# --- MMEB --------------------------------------------------------------------------------------------


def test_precision_at_1_per_query_candidates():
    q = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    c = [
        [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]],  # scores 1, 0, -1: the positive wins -> hit
        [[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]],  # scores 0, 1, 1: a negative wins -> miss
        [[1.0, 1.0], [2.0, 2.0], [1.0, 0.0]],  # scores 1, 1, .707: a tie with the positive -> miss
    ]
    assert hits_at_1(q, np.array(c), ties="against").tolist() == [True, False, False]
    assert precision_at_1(q, np.array(c), ties="against") == pytest.approx(1 / 3)
    # By index order (VLM2Vec's argmax, the first maximum) the tie with the positive is a hit.
    assert hits_at_1(q, np.array(c)).tolist() == [True, False, True]
    assert precision_at_1(q, np.array(c)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="ties must be"):
        hits_at_1(q, np.array(c), ties="last")
    # One score matrix serves both rules.
    scores = candidate_scores(q, np.array(c))
    torch.testing.assert_close(scores, torch.tensor([[1, 0, -1], [0, 1, 1], [1, 1, 2 ** -0.5]]))
    assert wins(scores, "first").tolist() == [True, False, True] and wins(scores, "against").tolist() == [True, False, False]


def test_precision_at_1_shared_pool_with_padding():
    pool = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]
    q = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    index = [
        [0, 1, 2],  # q0: 1, 0, -1 -> hit
        [1, 3, -1],  # q1: 1, .707, padding -> hit
        [2, 3, -1],  # q2: -.707, 1 -> miss
    ]
    assert hits_at_1(q, pool, index).tolist() == [True, True, False]
    assert precision_at_1(q, pool, index) == pytest.approx(2 / 3)
    # a single candidate has nothing to beat
    assert precision_at_1([[1.0, 0.0]], [[0.0, 1.0]], [[0]]) == 1.0
    with pytest.raises(ValueError, match="never in column 0"):
        hits_at_1(q, pool, [[-1, 0], [0, 1], [0, 1]])


def test_mmeb_summary_groups_and_omits_empty_groups():
    datasets = [MmebDataset("A", "Classification", "IND", []), MmebDataset("B", "Classification", "OOD", []),
                MmebDataset("C", "Retrieval", "IND", []), MmebDataset("D", "VQA", "OOD", [])]
    got = mmeb_summary({"A": 0.5, "B": 1.0, "C": 0.0}, datasets)  # D not evaluated
    assert got == pytest.approx({
        "mmeb/dataset/A/p@1": 0.5, "mmeb/dataset/B/p@1": 1.0, "mmeb/dataset/C/p@1": 0.0,
        "mmeb/classification/p@1": 0.75,  # (0.5 + 1.0) / 2
        "mmeb/retrieval/p@1": 0.0,
        "mmeb/ind/p@1": 0.25,  # A and C
        "mmeb/ood/p@1": 1.0,  # B only
        "mmeb/overall/p@1": 0.5,  # (0.5 + 1.0 + 0.0) / 3
    })
    assert "mmeb/vqa/p@1" not in got and "mmeb/grounding/p@1" not in got
    assert mmeb_summary({"X": 1.0}, {"X": ("Grounding", "ood")})["mmeb/grounding/p@1"] == 1.0
    with pytest.raises(ValueError, match="'Z'"):
        mmeb_summary({"Z": 1.0}, datasets)


# --- POPE --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, parsed", [
    ("Yes", "yes"), ("No", "no"), ("yes.", "yes"), ("No, there is not.", "no"),
    ("NO", "no"), ("Not at all", "no"),  # case-insensitive, unlike the original
    ("There is a dog. No doubt.", "yes"),  # only the text before the first '.'
    ("yes, no", "no"),  # commas removed: the words are yes, no
    ("Nothing like it", "yes"),  # "nothing" is not the word "no"
    ("No!", "no"), ("no\nthe image", "no"), ("", "yes"),
])
def test_parse_yes_no(answer, parsed):
    assert parse_yes_no(answer) == parsed


def test_pope_metrics_by_hand():
    labels = ["yes", "yes", "no", "no", "yes"]
    preds = ["yes", "no", "yes", "no", "yes"]
    # TP 2 (0, 4), FN 1 (1), FP 1 (2), TN 1 (3)
    assert pope_metrics(labels, preds) == pytest.approx({
        "accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 5})


def test_pope_zero_division_gives_zero():
    # nothing answered "yes": precision 0/0 -> 0.0, recall 0/1, f1 0.0
    assert pope_metrics(["yes", "no"], ["no", "no"]) == {
        "accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    # no "yes" label: recall 0/0 -> 0.0
    assert pope_metrics(["no"], ["yes"])["recall"] == 0.0
    with pytest.raises(ValueError, match="no POPE questions"):
        pope_metrics([], [])
    with pytest.raises(ValueError, match="'maybe'"):
        pope_metrics(["yes"], ["maybe"])


def test_pope_summary_averages_splits():
    a = {"accuracy": 0.5, "precision": 1.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.25}
    b = {"accuracy": 1.0, "precision": 0.5, "recall": 1.0, "f1": 0.5, "yes_ratio": 0.75}
    got = pope_summary({"random": a, "popular": b})
    assert got["pope/random/accuracy"] == 0.5 and got["pope/popular/f1"] == 0.5
    assert got["pope/average/accuracy"] == 0.75 and got["pope/average/yes_ratio"] == 0.5
    assert len(got) == 15


# --- caption hallucination ---------------------------------------------------------------------------

VOCAB = {
    "dog": ["dog", "puppy"], "hot dog": ["hot dog"], "traffic light": ["stoplight"],
    "person": ["people", "man"], "box": [], "berry": [],
}


@pytest.mark.parametrize("text, found", [
    ("Two Dogs and a hot-dog near a traffic  light.", {"dog", "hot dog", "traffic light"}),
    ("A hot dog on a plate.", {"hot dog"}),  # the longest phrase wins at one position
    ("People with boxes and berries.", {"person", "box", "berry"}),  # listed irregular + regular plurals
    ("There is no dog, but a man.", {"person"}),  # the negation stops at the comma
    ("The image doesn't show a stoplight.", set()),
    ("A puppy without any boxes", {"dog"}),
    ("hotdogs and dogma", set()),  # word boundaries
    ("not only a dog", set()),  # the documented limitation
])
def test_objects_mentioned(text, found):
    assert objects_mentioned(text, VOCAB) == found


def test_objects_mentioned_reads_the_shapes_world_descriptions_exactly():
    # The synthetic sets' own detailed captions (with "no other objects" closings) name exactly the scene.
    rng = np.random.default_rng(0)
    vocab = {c["name"]: c["synonyms"] for c in vocabulary()["classes"]}
    for _ in range(200):
        scene = sample_scene(rng)
        assert objects_mentioned(detailed_caption(scene, rng), vocab) == set(scene.classes())


def test_plural():
    assert [plural(w) for w in ("circle", "box", "berry", "day", "bus", "dish")] == [
        "circles", "boxes", "berries", "days", "buses", "dishes"]


def test_caption_metrics_by_hand():
    classes = ["cat", "dog", "bird", "fish", "traffic light"]
    truth = [{"cat", "dog"}, {"dog"}, {"cat"}]
    said = [{"cat", "bird"}, {"dog"}, set()]
    got = caption_metrics(said, truth, classes)
    # overall: TP 2 (cat@0, dog@1), FP 1 (bird@0), FN 2 (dog@0, cat@2)
    # P 2/3, R 1/2, F1 = 2PR/(P+R) = (2/3)/(7/6) = 4/7, F0.5 = 1.25PR/(.25P+R) = (5/12)/(2/3) = 5/8
    assert got["caption/overall/precision"] == pytest.approx(2 / 3)
    assert got["caption/overall/recall"] == pytest.approx(1 / 2)
    assert got["caption/overall/f1"] == pytest.approx(4 / 7)
    assert got["caption/overall/f0.5"] == pytest.approx(5 / 8)
    # cat: TP 1 FN 1 -> P 1, R .5, F1 2/3, F0.5 .625/.75 = 5/6; dog the same; bird: FP 1 -> P 0, R 0/0 = 0
    # fish and traffic light: no decision, not scored. Class-wise = mean over cat, dog, bird.
    assert got["caption/class/cat/f0.5"] == pytest.approx(5 / 6)
    assert got["caption/class/bird/precision"] == 0.0 and got["caption/class/bird/recall"] == 0.0
    assert "caption/class/fish/precision" not in got and "caption/class/traffic_light/recall" not in got
    assert got["caption/classwise/precision"] == pytest.approx(2 / 3)  # (1 + 1 + 0) / 3
    assert got["caption/classwise/recall"] == pytest.approx(1 / 3)  # (.5 + .5 + 0) / 3
    assert got["caption/classwise/f1"] == pytest.approx(4 / 9)  # (2/3 + 2/3 + 0) / 3
    assert got["caption/classwise/f0.5"] == pytest.approx(5 / 9)  # (5/6 + 5/6 + 0) / 3
    assert all(type(v) is float for v in got.values())


def test_throne_averaging_by_hand():
    # cat: 2 correct mentions -> P = R = F = 1. dog: said once wrongly (image 1), missed once (image 3) -> P = R
    # = 0, F undefined. car: the same (said in image 3, missed in image 2).
    said = [{"cat", "dog"}, {"cat"}, {"car"}]
    truth = [{"cat"}, {"cat", "car"}, {"dog"}]
    got = caption_metrics(said, truth, ["cat", "dog", "car"])
    assert got["caption/classwise/f0.5"] == pytest.approx(1 / 3)  # ours: the undefined F counts 0
    assert got["caption/throne/classwise/f0.5"] == pytest.approx(1.0)  # THRONE: nanmean over the cat alone
    assert got["caption/throne/classwise/precision"] == pytest.approx(1 / 3)
    assert got["caption/throne/classwise/recall"] == pytest.approx(1 / 3)
    # Per image: (P, R) = (1/2, 1), (1, 1/2), (0, 0); F0.5 = .5556, .8333, undefined; F1 = 2/3, 2/3, undefined.
    assert got["caption/throne/per_image/precision"] == pytest.approx(0.5)
    assert got["caption/throne/per_image/recall"] == pytest.approx(0.5)
    assert got["caption/throne/per_image/f0.5"] == pytest.approx((0.625 / 1.125 + 0.625 / 0.75) / 2)
    assert got["caption/throne/per_image/f1"] == pytest.approx(2 / 3)
    # A class only in the vocabulary has no decision: it changes none of the means.
    assert caption_metrics(said, truth, ["cat", "dog", "car", "bus"])["caption/throne/classwise/f0.5"] == 1.0
    # Nothing right anywhere: every F undefined -> 0.0
    assert caption_metrics([{"dog"}], [{"cat"}], ["cat", "dog"])["caption/throne/classwise/f0.5"] == 0.0


def test_caption_metrics_edge_cases():
    # a class name with a space becomes one metric-name part
    got = caption_metrics([{"traffic light"}], [{"traffic light"}], ["traffic light"])
    assert got["caption/class/traffic_light/f0.5"] == 1.0
    # nothing mentioned and nothing present: every ratio 0/0 -> 0.0
    empty = caption_metrics([set()], [set()], ["cat"])
    assert empty["caption/overall/precision"] == 0.0 and empty["caption/classwise/f0.5"] == 0.0
    with pytest.raises(ValueError, match="no images"):
        caption_metrics([], [], ["cat"])


# --- multiple choice ---------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("[C]", "C"), ("b) blue", "B"), ("D: red", "D"),
    ("The answer is B", "B"), ("Answer: (C)", "C"), ("the correct option is D.", "D"),
    ("I think C fits best", "C"),
    ("A red circle", None),  # the article, not option A
    ("A or B", None),  # ambiguous
    ("the answer is a dog", None),  # lower-case "a" after a cue, then a word: the article
    ("the answer is b", "B"), ("The answer is (c).", "C"), ("answer: d", "D"),  # lower case, nothing after
    ("B is correct", "B"), ("(c) is the right answer.", "C"), ("A is correct because it is red", "A"),
    ("A is red", None),  # the article before a verb: not option A
    ("E", None), ("", None), ("blue", None),
])
def test_extract_letter(answer, letter):
    assert extract_letter(answer) == letter


def test_extract_letter_options():
    assert extract_letter("E", options="ABCDE") == "E"
    assert extract_letter("...", options="ABCD") is None  # punctuation only (an undertrained model's answer)
    assert extract_letter(" , ") is None
    assert extract_letter("(d)", options="ABC") is None


def test_choice_accuracy_and_summary():
    assert choice_accuracy(["A", None, "C"], ["A", "B", "D"]) == pytest.approx(1 / 3)
    got = choice_metrics("mmstar", ["A", None, "C", "D"], ["A", "B", "C", "A"],
                         ["math", "math", "science & technology", "science & technology"])
    assert got == pytest.approx({
        "mc/mmstar/accuracy": 0.5,  # A and C right
        "mc/mmstar/math/accuracy": 0.5,
        "mc/mmstar/science_technology/accuracy": 0.5,
    })
    with pytest.raises(ValueError, match="no questions"):
        choice_accuracy([], [])


def test_metric_part():
    assert metric_part("science & technology") == "science_technology"
    assert metric_part("ImageNet-1K") == "ImageNet-1K" and metric_part("_my.set-2") == "_my.set-2"
    with pytest.raises(ValueError):
        metric_part(" & ")


# --- modality gap ------------------------------------------------------------------------------------


def test_modality_gap_by_hand():
    # normalised images (1,0), (0,1): centroid (.5,.5); texts (1,0), (1,0): centroid (1,0)
    # distance sqrt(.25 + .25) = .7071; paired cosines 1 and 0 -> mean .5
    got = modality_gap([[2.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [5.0, 0.0]])
    assert got == pytest.approx({"gap/centroid_distance": math.sqrt(0.5), "gap/mean_cosine_pairs": 0.5})
    assert "gap/mean_cosine_pairs" not in modality_gap(np.eye(2), np.eye(3)[:, :2])


def test_gap_scatter_png():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 2.0
    png = gap_scatter_png(img, txt, max_pairs=10)
    assert png == gap_scatter_png(img, txt, max_pairs=10)  # deterministic
    assert Image.open(io.BytesIO(png)).format == "PNG"
    with pytest.raises(ValueError, match="paired"):
        gap_scatter_png(img, txt[:5])
