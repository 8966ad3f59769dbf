"""Modality gap (Liang et al. 2022): how far apart the image and text embeddings sit on the unit sphere.

``gap/centroid_distance`` is the L2 distance between the centroid of the L2-normalised image embeddings
and that of the L2-normalised text embeddings (0 = the two clouds share a centre; at most 2).
``gap/mean_cosine_pairs`` is the mean cosine of paired rows (row i of each side), when both sides have the
same number of rows. The scatter plot stands in for the paper's UMAP figure (CAFe, Figure 3): a 2-D PCA of
up to 250 sampled pairs, images and texts in two colours, each pair joined by a line.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from cafe_core.evaluate.retrieval import unit_rows


def modality_gap(image_emb, text_emb, block_rows: int = 65536) -> dict[str, float]:
    """The gap of two embedding sets: arrays, or any rows source with ``len()`` and slices (an export's lazy
    view), read ``block_rows`` rows at a time, so a million-image corpus needs one block in memory."""
    n_img, n_txt = len(image_emb), len(text_emb)
    sums, paired = [], torch.zeros((), dtype=torch.float64)
    for rows, n, name in ((image_emb, n_img, "image_emb"), (text_emb, n_txt, "text_emb")):
        total = None
        for start in range(0, max(n, 1), block_rows):
            block = unit_rows(rows[start:start + block_rows], name).double()
            total = block.sum(0) if total is None else total + block.sum(0)
        sums.append(total)
    if sums[0].shape != sums[1].shape:
        raise ValueError(f"image_emb has dim {sums[0].shape[0]} but text_emb has dim {sums[1].shape[0]}")
    out = {"gap/centroid_distance": float(torch.linalg.vector_norm(sums[0] / n_img - sums[1].to(sums[0]) / n_txt))}
    if n_img == n_txt:
        for start in range(0, n_img, block_rows):
            img = unit_rows(image_emb[start:start + block_rows], "image_emb").double()
            txt = unit_rows(text_emb[start:start + block_rows], "text_emb").double().to(img.device)
            paired = paired.to(img.device) + (img * txt).sum()
        out["gap/mean_cosine_pairs"] = float(paired / n_img)
    return out


def project_2d(points: torch.Tensor) -> np.ndarray:
    """PCA to two dimensions (SVD of the centred points), each axis signed so that its largest-magnitude
    coordinate is positive: the same points always give the same picture."""
    centred = points - points.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    xy = centred @ vh[:2].T
    if xy.shape[1] < 2:  # one point, or a 1-D input: pad the missing axis
        xy = torch.cat([xy, torch.zeros(xy.shape[0], 2 - xy.shape[1])], dim=1)
    signs = torch.sign(xy.gather(0, xy.abs().argmax(0, keepdim=True)))
    return (xy * torch.where(signs == 0, 1.0, signs)).numpy()


def sample_pairs(n: int, max_pairs: int, seed: int = 0) -> np.ndarray:
    """The rows the scatter shows: up to ``max_pairs`` of ``n``, sampled with ``seed``, in order."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(max_pairs, n), replace=False))


def gap_scatter_png(
    image_emb: np.ndarray | torch.Tensor,
    text_emb: np.ndarray | torch.Tensor,
    max_pairs: int = 250,
    seed: int = 0,
    title: str | None = None,
) -> bytes:
    """PNG scatter of up to ``max_pairs`` pairs (row i of each side), sampled with ``seed``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg only: no display, no pyplot state
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    img = unit_rows(image_emb, "image_emb").cpu()
    txt = unit_rows(text_emb, "text_emb").cpu()
    if img.shape != txt.shape:
        raise ValueError(f"the scatter needs paired rows: image_emb {tuple(img.shape)} vs text_emb {tuple(txt.shape)}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    rows = sample_pairs(img.shape[0], max_pairs, seed)
    xy = project_2d(torch.cat([img[rows], txt[rows]]))
    k = len(rows)
    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.add_collection(LineCollection(np.stack([xy[:k], xy[k:]], axis=1), colors="0.75", linewidths=0.5, zorder=1))
    ax.scatter(xy[:k, 0], xy[:k, 1], s=10, c="tab:blue", label="image", zorder=2)
    ax.scatter(xy[k:, 0], xy[k:, 1], s=10, c="tab:orange", label="text", zorder=2)
    gap = modality_gap(img, txt)["gap/centroid_distance"]
    ax.set_title(title or f"{k} image-text pairs (PCA), centroid distance {gap:.3f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
