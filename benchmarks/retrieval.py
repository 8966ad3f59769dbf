"""Seconds for Recall@1/5/10 both ways at MSCOCO 5K size: `retrieval_recall` against per-row Python loops, one run.

    .venv/bin/python benchmarks/retrieval.py                      # 5,000 images x 25,000 captions, dim 896, 2 threads
    .venv/bin/python benchmarks/retrieval.py --loop-images 200 --loop-captions 1000

Embeddings: random unit vectors, float32 on the CPU; each caption is its image's vector plus noise, so the
recalls are neither 0 nor 1 (chance would be 0.001 at R@5). Ours: one similarity matrix and the counting
ranks of `cafe_core.evaluate.retrieval` (median of 5 runs after a warm-up; the matrix product alone is timed
too, as the floor any exact method pays). Two straightforward loops, each ranking one query at a time
with `torch.argsort` as the common evaluation scripts do:

- per-row loop: every query scores itself against all candidates (a matrix-vector product) and sorts them;
- loop on the matrix: one matrix product first (and its transpose for text->image), then a sort per row
  (the BLIP/ALBEF ``itm_eval`` structure).

To keep the run short the loops rank only the first ``--loop-images`` images and ``--loop-captions``
captions and their time is extrapolated linearly to all rows (the output says so); their ranks must equal
ours on those rows, so both give the same metrics there. Targets: ours < 1 s, ratio >= 50x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cafe_core.evaluate.retrieval import RetrievalRanks, recall_at_k, retrieval_ranks, retrieval_recall  # noqa: E402

KS = (1, 5, 10)


def make_embeddings(n_images: int, per_image: int, dim: int, noise: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_images, dim, generator=gen), dim=1)
    caption_image = torch.arange(n_images).repeat_interleave(per_image)
    # noise of norm ~`noise` around the image vector: cosine to the own image ~ 1/sqrt(1 + noise^2)
    texts = F.normalize(images[caption_image] + noise * torch.randn(len(caption_image), dim, generator=gen) / dim**0.5, dim=1)
    return images, texts, caption_image


def sorted_ranks(i2t, t2i) -> RetrievalRanks:
    """Ranks found by sorting: on continuous embeddings (no ties) both of our tie rules give them."""
    i2t, t2i = np.asarray(i2t, dtype=np.int64), np.asarray(t2i, dtype=np.int64)
    return RetrievalRanks(i2t, t2i, i2t, t2i)


def loop_per_row(images, texts, caption_image, image_rows, caption_rows) -> RetrievalRanks:
    i2t, t2i = [], []
    for i in image_rows:
        order = torch.argsort(texts @ images[i], descending=True)
        own = torch.isin(order, torch.nonzero(caption_image == i).flatten())
        i2t.append(int(torch.nonzero(own)[0]) + 1)
    for j in caption_rows:
        order = torch.argsort(images @ texts[j], descending=True)
        t2i.append(int(torch.nonzero(order == caption_image[j])[0]) + 1)
    return sorted_ranks(i2t, t2i)


def loop_on_matrix(sim_i2t, sim_t2i, caption_image, image_rows, caption_rows) -> RetrievalRanks:
    i2t, t2i = [], []
    for i in image_rows:
        order = torch.argsort(sim_i2t[i], descending=True)
        own = torch.isin(order, torch.nonzero(caption_image == i).flatten())
        i2t.append(int(torch.nonzero(own)[0]) + 1)
    for j in caption_rows:
        order = torch.argsort(sim_t2i[j], descending=True)
        t2i.append(int(torch.nonzero(order == caption_image[j])[0]) + 1)
    return sorted_ranks(i2t, t2i)


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=896)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--noise", type=float, default=7.0)
    parser.add_argument("--loop-images", type=int, default=100, help="image rows the loops rank (then extrapolated)")
    parser.add_argument("--loop-captions", type=int, default=500, help="caption rows the loops rank (then extrapolated)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, texts, caption_image = make_embeddings(args.images, args.per_image, args.dim, args.noise, args.seed)
    n_img, n_txt = len(images), len(texts)
    print(f"{n_img} images x {n_txt} captions, dim {args.dim}, float32, CPU, {args.threads} threads")

    retrieval_recall(images, texts, caption_image)  # warm-up
    runs = [seconds(lambda: retrieval_recall(images, texts, caption_image, KS)) for _ in range(5)]
    ours, metrics = statistics.median(t for t, _ in runs), runs[0][1]
    matmul = statistics.median(seconds(lambda: images @ texts.T)[0] for _ in range(3))
    ranks = retrieval_ranks(images, texts, caption_image)

    image_rows, caption_rows = range(min(args.loop_images, n_img)), range(min(args.loop_captions, n_txt))
    scale_i, scale_t = n_img / len(image_rows), n_txt / len(caption_rows)
    t_rows_i, rows_i = seconds(lambda: loop_per_row(images, texts, caption_image, image_rows, []))
    t_rows_t, rows_t = seconds(lambda: loop_per_row(images, texts, caption_image, [], caption_rows))
    t_mm, (sim_i2t, sim_t2i) = seconds(lambda: (images @ texts.T, texts @ images.T))
    t_sort_i, matrix_i = seconds(lambda: loop_on_matrix(sim_i2t, sim_t2i, caption_image, image_rows, []))
    t_sort_t, matrix_t = seconds(lambda: loop_on_matrix(sim_i2t, sim_t2i, caption_image, [], caption_rows))
    t_rows_full = t_rows_i * scale_i + t_rows_t * scale_t
    t_matrix_full = t_mm + t_sort_i * scale_i + t_sort_t * scale_t

    rows_img, rows_cap = list(image_rows), list(caption_rows)
    subset = RetrievalRanks(ranks.i2t[rows_img], ranks.t2i[rows_cap], ranks.i2t_strict[rows_img], ranks.t2i_strict[rows_cap])
    for name, loop in (("per-row loop", sorted_ranks(rows_i.i2t, rows_t.t2i)),
                       ("loop on the matrix", sorted_ranks(matrix_i.i2t, matrix_t.t2i))):
        for field in ("i2t", "t2i", "i2t_strict", "t2i_strict"):
            assert np.array_equal(getattr(loop, field), getattr(subset, field)), f"{name}: {field} ranks differ"
        assert recall_at_k(loop, KS) == recall_at_k(subset, KS)
    print(f"loops ranked the first {len(image_rows)} images and {len(caption_rows)} captions: ranks and R@K "
          "identical to ours; their times below are extrapolated linearly to all rows")
    print("metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"{'method':<34} {'seconds':>9} {'ours is':>9}")
    print(f"{'retrieval_recall (ours)':<34} {ours:>9.2f}")
    print(f"{'  of which the matrix product':<34} {matmul:>9.2f}")
    print(f"{'per-row loop (extrapolated)':<34} {t_rows_full:>9.1f} {t_rows_full / ours:>8.0f}x")
    print(f"{'loop on the matrix (extrapolated)':<34} {t_matrix_full:>9.1f} {t_matrix_full / ours:>8.0f}x")
    print(f"targets: ours < 1 s: {'met' if ours < 1 else 'NOT met'}; ratio >= 50x against the per-row loop: "
          f"{'met' if t_rows_full / ours >= 50 else 'NOT met'}, against the loop on the matrix: "
          f"{'met' if t_matrix_full / ours >= 50 else 'NOT met'}")


if __name__ == "__main__":
    main()
