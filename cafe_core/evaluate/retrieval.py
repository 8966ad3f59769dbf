"""Zero-shot image-text retrieval (Flickr30K 1K, MSCOCO 5K): Recall@K both ways (SPEC section 5).

Scores are cosine similarities: both sides are L2-normalised here, then matrix products give every
image-caption score. image->text R@K: an image is a hit when any of its captions ranks in the top K among all
captions; text->image R@K: a caption is a hit when its image ranks in the top K among all images.

Ranks, ties included, are defined by counting, not sorting, so they are deterministic. Two tie rules, each
under its own metric names:

- published protocol (``i2t_R@K``, the headline): ties are broken by index order, as the public
  implementations do (CLIP_benchmark's and CAFe's ``topk``, VLM2Vec's ``argmax`` first maximum), so a wrong
  candidate that ties with the right one ranks ahead of it only when its index is lower. This is the number
  to set beside a paper's;
- strict (``i2t_R@K_strict``, what the gate bounds): a wrong candidate that ties with the right one counts
  against it, so a collapsed model (every embedding equal) scores R@K = 0 where candidates outnumber K, not
  about 1/K as index order gives it.

    i2t rank of image i   = 1 + #{wrong captions scoring > b_i} + #{wrong captions scoring = b_i} [strict]
                          = 1 + #{wrong captions scoring > b_i} + #{wrong captions scoring = b_i before p_i}
    t2i rank of caption j = 1 + #{other images scoring > s_j} + #{other images scoring = s_j} [strict]
                          = 1 + #{other images scoring > s_j} + #{other images scoring = s_j before its own}

where b_i is the best score among image i's captions, p_i the first of them (by index) to reach it, s_j the
score of caption j with its own image; the image's other captions never count against it. With continuous
embeddings ties have probability zero and both rules agree with every sort-based implementation.
R@K = mean(rank <= K); a K at or above the number of candidates gives 1.0 (K clamps to the candidates).

Counting gives every item's exact rank for the raw results at about the cost of one ``torch.topk`` pass,
which could give neither the ranks beyond K nor a defined tie order.

Scoring in blocks. The images x captions matrix is never formed: images are cut into row blocks of
``block_rows`` and captions into column blocks of ``block_cols``, one fixed partition, and each block's
product ``image_block @ caption_block.T`` is computed exactly once, in two passes:

- pass A computes the blocks that hold own pairs (caption j with its image: with captions in image order,
  as in real sets, the blocks along the diagonal) and reads from them every s_j, b_i and p_i. Each of
  these blocks is counted as soon as the thresholds of all its rows and columns are final (its rows' other
  own-pair blocks and its columns' are computed too), and dropped then;
- pass B computes every other block and counts it against the now final b_i (rows) and s_j (columns).

Why own scores come from the same elements: matrix kernels for different shapes (matrix-vector against
matrix-matrix, other block shapes, CPU against cuBLAS) can round the same dot product differently by an
ulp, which would make or break ties. s_j and b_i are therefore read from the product elements themselves,
never recomputed, and compared with the other elements of the same products: a wrong candidate that ties
with them in the computed scores ties in the count, so a collapsed model still gets strict R@1 = 0 and the
index-order ranks above, in any block shape (a test perturbs the rounding of every product call to check
it).

Counting a block. Once read, the own pairs are set to -inf in their block, so every block is counted alike
and against wrong candidates only: >= and > against b_i along rows and against s_j along columns, summed
as int32. Most rows and columns hold no wrong candidate at or above their threshold (with a good model
nearly every row and most columns), so each row's and column's maximum is taken first (two passes over
the block) and only those that reach their threshold are compared, gathered when they are few. The
index-order correction (wrong candidates tying with the threshold before p_i or before the own image) is
computed only in the rows and columns of a block where such a tie exists, vectorised over them (rare with
real embeddings; every row and column of a collapsed model).

Memory: the score blocks at hand (one in pass B; in pass A those waiting for a threshold: two or three
with captions in image order, more, up to the whole matrix, when each image's captions are scattered over
many column blocks), O(images + captions) counters, and one normalised block of rows of each side. The
embeddings are read block by block through ``len(x)`` and ``x[a:b]`` (an array, a tensor, or a lazily
loading view of embeddings stored in shards), so nothing of size items x dim is made beyond what the
input holds. Pass B re-reads (and re-normalises) one side for each block of the other: the side with
fewer rows to re-read in all (at the defaults and 5 captions per image, the images once per 4,096
captions); the other side is read once in each pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Default block: 1024 images x 4096 captions, 16 MiB of float32 scores: large enough that each product runs
# at the matrix-product peak and the re-reads of pass B stay small, small enough that memory stays a few
# blocks whatever the corpus.
BLOCK_ROWS = 1024
BLOCK_COLS = 4096
# Scores per comparison chunk (4 MiB of float32): the comparisons read a chunk while it is in cache, in few
# operations (each a parallel region that waits for every thread: long on a loaded machine).
_CHUNK_SCORES = 1 << 20


@dataclass
class RetrievalRanks:
    """1-based ranks, as defined in the module docstring: ``i2t`` per image, ``t2i`` per caption."""

    i2t: np.ndarray  # int64, one per image: ties broken by index order (the published protocol)
    t2i: np.ndarray  # int64, one per caption: the same
    i2t_strict: np.ndarray  # ties count against the model
    t2i_strict: np.ndarray


def unit_rows(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """The rows of a 2-D array as float32 unit vectors (bf16/fp16 exports are upcast: low precision would
    create ties; an all-zero row stays zero). Rejects NaN and infinity, which would otherwise compare false
    everywhere and so rank first."""
    t = torch.as_tensor(x)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (items x dim) array, got shape {tuple(t.shape)}")
    t = F.normalize(t.to(torch.float32), dim=-1)
    if not torch.isfinite(t.sum()):  # unit rows cannot overflow the sum, so only NaN/inf make it non-finite
        raise ValueError(f"{name} holds NaN or infinite values; the embeddings are broken")
    return t


def _row_steps(scores: torch.Tensor) -> tuple[range, int]:
    """Row chunks of about _CHUNK_SCORES scores: each is read by several operations while it is in cache
    (on a GPU, where each operation is a kernel launch, the whole block at once)."""
    step = scores.shape[0] if scores.is_cuda else max(1, _CHUNK_SCORES // scores.shape[1])
    return range(0, scores.shape[0], step), step


def _maxima(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's and each column's maximum: rows and columns whose maximum is below their threshold have
    nothing to count. Whole-block operations: few parallel regions (each one a wait for every thread, long
    on a loaded machine); the block, just written by the product, is read from cache."""
    return scores.amax(1), scores.amax(0)


def _counts(
    scores: torch.Tensor, thresholds: torch.Tensor, hits: torch.Tensor | None, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """#{scores >= threshold} and #{scores > threshold} per row (``dim=1``, one threshold a row) or per
    column (``dim=0``), counted in ``hits`` only (None: all; the others count 0). Few hits are gathered and
    counted alone; many are counted in place. int32 sums: about 3x faster than int64 sums of booleans."""
    n = scores.shape[1 - dim]
    if hits is not None and hits.numel() * 4 <= n:
        ge, gt = (torch.zeros(n, dtype=torch.int32, device=scores.device) for _ in range(2))
        if hits.numel():
            part = scores[hits] if dim == 1 else scores[:, hits]
            ge[hits], gt[hits] = _counts(part, thresholds[hits], None, dim)
        return ge, gt
    starts, step = _row_steps(scores)
    if dim == 1:
        ge, gt = (torch.empty(n, dtype=torch.int32, device=scores.device) for _ in range(2))
        for k in starts:
            chunk, t = scores[k : k + step], thresholds[k : k + step, None]
            torch.sum(chunk >= t, 1, dtype=torch.int32, out=ge[k : k + step])
            torch.sum(chunk > t, 1, dtype=torch.int32, out=gt[k : k + step])
    else:
        ge, gt = (torch.zeros(n, dtype=torch.int32, device=scores.device) for _ in range(2))
        for k in starts:
            chunk = scores[k : k + step]
            ge += (chunk >= thresholds).sum(0, dtype=torch.int32)
            gt += (chunk > thresholds).sum(0, dtype=torch.int32)
    return ge, gt


class _RowBlocks:
    """Unit rows of one side, block by block, read through ``len(x)`` and ``x[a:b]``; the last block read is
    kept for the next request."""

    def __init__(self, x: Any, name: str, size: int, device: torch.device | None = None):
        try:
            self.n = len(x)
        except TypeError:
            raise ValueError(f"{name} must be a non-empty 2-D (items x dim) array or a view with len() and row "
                             f"slicing, got {type(x).__name__}") from None
        self.x, self.name, self.size, self.device = x, name, size, device
        self.count = math.ceil(self.n / size)
        self.dim: int | None = None
        self._last: tuple[int, torch.Tensor] | None = None
        self._checked: set[int] = set()

    def start(self, k: int) -> int:
        return k * self.size

    def get(self, k: int) -> torch.Tensor:
        if self._last is not None and self._last[0] == k:
            return self._last[1]
        self._last = None  # dropped before the next is read: one block of each side in memory
        a, b = k * self.size, min(self.n, (k + 1) * self.size)
        t = torch.as_tensor(self.x[a:b])
        if self.device is not None:
            t = t.to(self.device)  # normalised where it is scored
        if k in self._checked:  # read before: checked then, only normalised now (the same values)
            t = F.normalize(t.to(torch.float32), dim=-1)
        else:
            t = unit_rows(t, self.name)  # an empty x fails here, on its first block
        if t.shape[0] != b - a:
            raise ValueError(f"{self.name}[{a}:{b}] gave {t.shape[0]} rows, not {b - a}")
        if self.dim is None:
            self.dim = t.shape[1]
        elif t.shape[1] != self.dim:
            raise ValueError(f"{self.name}[{a}:{b}] has dim {t.shape[1]}, its first rows {self.dim}")
        if self.device is None:
            self.device = t.device
        self._checked.add(k)
        self._last = (k, t)
        return t


class _BlockCounter:
    """Thresholds (own scores, best positives) and rank counters, filled block product by block product."""

    def __init__(self, n_img: int, n_txt: int, cap: torch.Tensor, device: torch.device):
        self.cap = cap
        long = dict(dtype=torch.long, device=device)
        self.own = torch.empty(n_txt, dtype=torch.float32, device=device)  # s_j
        self.best = torch.full((n_img,), -torch.inf, dtype=torch.float32, device=device)  # b_i
        self.first_best = torch.full((n_img,), n_txt, **long)  # p_i
        # per image, wrong captions scoring >= b_i, > b_i, = b_i before p_i; per caption the same for images
        self.i2t_ge, self.i2t_gt, self.i2t_before = (torch.zeros(n_img, **long) for _ in range(3))
        self.t2i_ge, self.t2i_gt, self.t2i_before = (torch.zeros(n_txt, **long) for _ in range(3))

    def take_thresholds(self, scores: torch.Tensor, r0: int, c0: int, positives: torch.Tensor) -> None:
        """Own scores and (running) best positives, read from a block's own pairs (``positives``: their
        captions), never recomputed; then the own pairs are set to -inf in the block, so that the counting
        sees wrong candidates only (a positive never counts against its image or caption)."""
        rows, cols = self.cap[positives] - r0, positives - c0
        self.own[positives] = scores[rows, cols]
        self.best.scatter_reduce_(0, rows + r0, self.own[positives], "amax")
        scores[rows, cols] = -torch.inf

    def finish_rows(self, positives: torch.Tensor) -> None:
        """All positives of these images are scored: their b_i is final, and so is p_i."""
        rows = self.cap[positives]
        at = self.own[positives] == self.best[rows]
        self.first_best.scatter_reduce_(0, rows[at], positives[at], "amin")

    def count(self, scores: torch.Tensor, r0: int, c0: int) -> None:
        """Count one block (own pairs at -inf) against final thresholds."""
        r, c = scores.shape
        dev = scores.device
        best, own = self.best[r0 : r0 + r], self.own[c0 : c0 + c]
        # Most rows and columns hold no wrong candidate at or above their threshold: only the others count.
        row_max, col_max = _maxima(scores)
        ge_r, gt_r = _counts(scores, best, torch.nonzero(row_max >= best).flatten(), dim=1)
        ge_c, gt_c = _counts(scores, own, torch.nonzero(col_max >= own).flatten(), dim=0)
        self.i2t_ge[r0 : r0 + r] += ge_r
        self.i2t_gt[r0 : r0 + r] += gt_r
        self.t2i_ge[c0 : c0 + c] += ge_c
        self.t2i_gt[c0 : c0 + c] += gt_c

        # Index order needs the ties' positions, and only where a wrong candidate ties with the threshold
        # (rare with real embeddings; every row and column of a collapsed model).
        rows = torch.nonzero((ge_r > gt_r) & (self.first_best[r0 : r0 + r] > c0)).flatten()
        if rows.numel():  # wrong captions tying with b_i before p_i
            columns = torch.arange(c0, c0 + c, device=dev)
            before = (scores[rows] == best[rows, None]) & (columns < self.first_best[r0 + rows, None])
            self.i2t_before[r0 + rows] += before.sum(1)
        cols = torch.nonzero((ge_c > gt_c) & (self.cap[c0 : c0 + c] > r0)).flatten()
        if cols.numel():  # other images tying with s_j before the own image
            images = torch.arange(r0, r0 + r, device=dev)
            before = (scores[:, cols] == own[cols]) & (images[:, None] < self.cap[c0 + cols])
            self.t2i_before[c0 + cols] += before.sum(0)

    def ranks(self) -> RetrievalRanks:
        return RetrievalRanks(
            i2t=(1 + self.i2t_gt + self.i2t_before).cpu().numpy(),
            t2i=(1 + self.t2i_gt + self.t2i_before).cpu().numpy(),
            i2t_strict=(1 + self.i2t_ge).cpu().numpy(), t2i_strict=(1 + self.t2i_ge).cpu().numpy(),
        )


def retrieval_ranks(
    image_emb: np.ndarray | torch.Tensor | Any,
    text_emb: np.ndarray | torch.Tensor | Any,
    caption_image: np.ndarray | Sequence[int],
    *,
    block_rows: int = BLOCK_ROWS,
    block_cols: int = BLOCK_COLS,
) -> RetrievalRanks:
    """Ranks of every image (i2t) and caption (t2i). ``caption_image[j]`` is the index of caption j's image;
    every image needs at least one caption.

    ``image_emb`` and ``text_emb``: arrays or tensors, or any object with ``len()`` whose slice ``x[a:b]``
    gives those rows as a 2-D array or tensor (read one block at a time). Scores are computed in blocks of
    ``block_rows`` images x ``block_cols`` captions (16 MiB of float32 at the defaults), on the device of
    the first image block; the ranks do not depend on the block sizes (the module docstring says why)."""
    if block_rows < 1 or block_cols < 1:
        raise ValueError(f"block_rows and block_cols must be positive, got {block_rows} x {block_cols}")
    images = _RowBlocks(image_emb, "image_emb", block_rows)
    img0 = images.get(0)  # the first blocks: shape, NaN and dim checks before any work
    texts = _RowBlocks(text_emb, "text_emb", block_cols, img0.device)
    txt0 = texts.get(0)
    if img0.shape[1] != txt0.shape[1]:
        raise ValueError(f"image_emb has dim {img0.shape[1]} but text_emb has dim {txt0.shape[1]}")
    device, n_img, n_txt = img0.device, images.n, texts.n
    cap_np = np.asarray(caption_image)
    if cap_np.shape != (n_txt,):
        raise ValueError(f"caption_image needs one image index per caption ({n_txt}), got shape {cap_np.shape}")
    cap_np = cap_np.astype(np.int64)
    if cap_np.min() < 0 or cap_np.max() >= n_img:
        raise ValueError(f"caption_image values must lie in [0, {n_img}), got {int(cap_np.min())}..{int(cap_np.max())}")
    captions_per_image = np.bincount(cap_np, minlength=n_img)
    if (captions_per_image == 0).any():
        first = int(np.flatnonzero(captions_per_image == 0)[0])
        raise ValueError(f"image {first} has no caption; every image needs at least one")

    # Pass B re-reads one side for every block of the other: the side with fewer rows to re-read in all.
    by_columns = texts.count * n_img <= images.count * n_txt
    order = (lambda rb, cb: (cb, rb)) if by_columns else (lambda rb, cb: (rb, cb))
    # The blocks holding own pairs, and the positives (captions) in each.
    block_of = (cap_np // block_rows) * texts.count + np.arange(n_txt) // block_cols
    sorting = np.argsort(block_of, kind="stable")
    keys, starts = np.unique(block_of[sorting], return_index=True)
    own_blocks = {divmod(int(key), texts.count): torch.as_tensor(js, device=device)
                  for key, js in zip(keys, np.split(sorting, starts[1:]))}
    rows_left = np.bincount([rb for rb, _ in own_blocks], minlength=images.count)
    cols_left = np.bincount([cb for _, cb in own_blocks], minlength=texts.count)
    row_positives: dict[int, list[torch.Tensor]] = {}
    counter = _BlockCounter(n_img, n_txt, torch.as_tensor(cap_np, device=device), device)
    pool: list[torch.Tensor] = []  # score buffers for reuse: no fresh allocation (and page faults) per block

    def product(rb: int, cb: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, txt = images.get(rb), texts.get(cb)
        buf = pool.pop() if pool else torch.empty(block_rows * block_cols, dtype=torch.float32, device=device)
        return torch.mm(img, txt.T, out=buf[: img.shape[0] * txt.shape[0]].view(img.shape[0], txt.shape[0])), buf

    def count(rb: int, cb: int, scores: torch.Tensor, buf: torch.Tensor) -> None:
        counter.count(scores, images.start(rb), texts.start(cb))
        pool.append(buf)

    # Pass A: own scores and best positives from the blocks holding own pairs; each block is counted once
    # the thresholds of all its rows and columns are known, and kept until then.
    waiting: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for rb, cb in sorted(own_blocks, key=lambda k: order(*k)):
        scores, buf = product(rb, cb)
        counter.take_thresholds(scores, images.start(rb), texts.start(cb), own_blocks[rb, cb])
        waiting[rb, cb] = scores, buf
        row_positives.setdefault(rb, []).append(own_blocks[rb, cb])
        rows_left[rb] -= 1
        cols_left[cb] -= 1
        if rows_left[rb] == 0:
            counter.finish_rows(torch.cat(row_positives.pop(rb)))
        if rows_left[rb] == 0 or cols_left[cb] == 0:
            for key in [k for k in waiting if rows_left[k[0]] == 0 and cols_left[k[1]] == 0]:
                count(*key, *waiting.pop(key))
    # Pass B: every other block, against the now final thresholds.
    for outer in range(texts.count if by_columns else images.count):
        for inner in range(images.count if by_columns else texts.count):
            rb, cb = (inner, outer) if by_columns else (outer, inner)
            if (rb, cb) not in own_blocks:
                count(rb, cb, *product(rb, cb))
    return counter.ranks()


def recall_at_k(ranks: RetrievalRanks, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"i2t_R@K": ..., "t2i_R@K": ...}`` for each K (ties by index order), then the same with ``_strict``
    (ties against); the evaluation prefixes ``retrieval/<set>/``."""
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    out = {}
    for suffix, i2t, t2i in (("", ranks.i2t, ranks.t2i), ("_strict", ranks.i2t_strict, ranks.t2i_strict)):
        out.update({f"i2t_R@{k}{suffix}": float(np.mean(i2t <= k)) for k in ks})
        out.update({f"t2i_R@{k}{suffix}": float(np.mean(t2i <= k)) for k in ks})
    return out


def retrieval_recall(
    image_emb: np.ndarray | torch.Tensor | Any,
    text_emb: np.ndarray | torch.Tensor | Any,
    caption_image: np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    *,
    block_rows: int = BLOCK_ROWS,
    block_cols: int = BLOCK_COLS,
) -> dict[str, float]:
    """R@K both ways; ``retrieval_ranks`` gives the per-item ranks behind them."""
    ranks = retrieval_ranks(image_emb, text_emb, caption_image, block_rows=block_rows, block_cols=block_cols)
    return recall_at_k(ranks, ks)
