"""Zero-shot image-text retrieval (Flickr30K 1K, MSCOCO 5K): Recall@K both ways (SPEC section 5).

Scores are cosine similarities: both sides are L2-normalised here, then one matrix product gives every
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

Counting over the whole matrix (in row blocks, one comparison per score and direction) gives every item's
exact rank for the raw results at about the cost of one ``torch.topk`` pass, which could give neither the
ranks beyond K nor a defined tie order. Memory: the float32 matrix, images x captions x 4 bytes (500 MB for
MSCOCO 5K), plus one block of booleans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Rows per comparison block: bounds the boolean temporaries (block x captions bytes) and keeps them in cache.
_BLOCK_ROWS = 256


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


def retrieval_ranks(
    image_emb: np.ndarray | torch.Tensor, text_emb: np.ndarray | torch.Tensor, caption_image: np.ndarray | Sequence[int]
) -> RetrievalRanks:
    """Ranks of every image (i2t) and caption (t2i). ``caption_image[j]`` is the index of caption j's image;
    every image needs at least one caption. Works on whatever device the embeddings are on."""
    img = unit_rows(image_emb, "image_emb")
    txt = unit_rows(text_emb, "text_emb").to(img.device)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_emb has dim {img.shape[1]} but text_emb has dim {txt.shape[1]}")
    cap = torch.as_tensor(np.asarray(caption_image), dtype=torch.long, device=img.device)
    if cap.shape != (n_txt,):
        raise ValueError(f"caption_image needs one image index per caption ({n_txt}), got shape {tuple(cap.shape)}")
    if cap.min() < 0 or cap.max() >= n_img:
        raise ValueError(f"caption_image values must lie in [0, {n_img}), got {int(cap.min())}..{int(cap.max())}")
    captions_per_image = torch.bincount(cap, minlength=n_img)
    if (captions_per_image == 0).any():
        first = int((captions_per_image == 0).nonzero()[0])
        raise ValueError(f"image {first} has no caption; every image needs at least one")

    sim = img @ txt.T  # the one similarity matrix; every comparison below reads these exact values
    columns = torch.arange(n_txt, device=sim.device)
    own = sim[cap, columns]  # each caption's score with its own image
    best = torch.full((n_img,), -torch.inf, device=sim.device).scatter_reduce(0, cap, own, "amax")
    # Positives scoring >= the best positive (i.e. tying with it) are counted by the comparison but are not
    # wrong captions: take them off again. The first of them is where index order puts the image's hit.
    at_best = own >= best[cap]
    ties_at_best = torch.bincount(cap[at_best], minlength=n_img)
    first_best = torch.full((n_img,), n_txt, device=sim.device).scatter_reduce(0, cap[at_best], columns[at_best], "amin")
    i2t_ge, i2t_gt = (torch.empty(n_img, dtype=torch.long, device=sim.device) for _ in range(2))
    t2i_ge, t2i_gt = (torch.zeros(n_txt, dtype=torch.long, device=sim.device) for _ in range(2))
    for start in range(0, n_img, _BLOCK_ROWS):
        rows = slice(start, start + _BLOCK_ROWS)
        block = sim[rows]
        # int32 sums: about 3x faster than the default int64 accumulation of booleans
        i2t_ge[rows] = (block >= best[rows, None]).sum(1, dtype=torch.int32)
        i2t_gt[rows] = (block > best[rows, None]).sum(1, dtype=torch.int32)
        t2i_ge += (block >= own[None, :]).sum(0, dtype=torch.int32)
        t2i_gt += (block > own[None, :]).sum(0, dtype=torch.int32)
    # Index order needs the ties' positions, and only where a wrong candidate ties (rare with real embeddings).
    i2t_before = torch.zeros(n_img, dtype=torch.long, device=sim.device)
    for i in torch.nonzero(i2t_ge - i2t_gt > ties_at_best).flatten().tolist():
        # Captions before the first best positive that tie with it are wrong ones (earlier positives score less).
        i2t_before[i] = int((sim[i, : int(first_best[i])] == best[i]).sum())
    t2i_before = torch.zeros(n_txt, dtype=torch.long, device=sim.device)
    for j in torch.nonzero(t2i_ge - t2i_gt > 1).flatten().tolist():
        t2i_before[j] = int((sim[: int(cap[j]), j] == own[j]).sum())
    # t2i_ge counts the caption's own image once (its score equals `own`): that is the strict rank's "1 +".
    return RetrievalRanks(
        i2t=(1 + i2t_gt + i2t_before).cpu().numpy(), t2i=(1 + t2i_gt + t2i_before).cpu().numpy(),
        i2t_strict=(1 + i2t_ge - ties_at_best).cpu().numpy(), t2i_strict=t2i_ge.cpu().numpy(),
    )


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
    image_emb: np.ndarray | torch.Tensor,
    text_emb: np.ndarray | torch.Tensor,
    caption_image: np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """R@K both ways; ``retrieval_ranks`` gives the per-item ranks behind them."""
    return recall_at_k(retrieval_ranks(image_emb, text_emb, caption_image), ks)
