"""MMEB (VLM2Vec, Jiang et al. 2024): Precision@1 per dataset, averaged per meta-task, IND, OOD and overall.

Each query is scored against its own candidate list by cosine similarity (both sides L2-normalised here);
candidate 0 is the positive. Two tie rules, each under its own names:

- published protocol (``p@1``, the headline): a hit when no candidate scores higher than candidate 0, as
  VLM2Vec's ``np.argmax`` (the first maximum) decides; a tie with candidate 0 is a hit, so a collapsed model
  (all embeddings equal) scores 1.0;
- strict (``p@1_strict``, what the gate bounds): a hit only when candidate 0 scores strictly higher than every
  other candidate; the collapsed model scores 0.

Averages are unweighted means over datasets, as in the paper's tables.

At MMEB's size (1,000 queries with up to 1,000 candidates each) rows refer to distinct, content-addressed
items; ``hits_in_blocks`` scores a block of queries at a time against the distinct candidates of that block
only, so memory is bounded by the block, never by the dataset.
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch

from cafe_core.evaluate.choice import metric_part
from cafe_core.evaluate.retrieval import unit_rows
from cafe_core.evaluate.sets import MMEB_META_TASKS, MmebDataset


def hits_at_1(
    query_emb: np.ndarray | torch.Tensor,
    candidate_embs: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    candidate_index: np.ndarray | torch.Tensor | None = None,
    ties: Literal["first", "against"] = "first",
) -> torch.Tensor:
    """Per query, whether candidate 0 wins (a CPU bool tensor): ``ties="first"`` when nothing scores higher
    (index order, the published protocol), ``"against"`` when it scores strictly highest. Arguments as
    ``candidate_scores``."""
    return wins(candidate_scores(query_emb, candidate_embs, candidate_index), ties)


def candidate_scores(
    query_emb: np.ndarray | torch.Tensor,
    candidate_embs: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    candidate_index: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """(queries, candidates) cosine scores, candidate 0 first.

    Either ``candidate_embs`` is (queries, candidates, dim), each query with its own candidates; or it is
    (unique candidates, dim) and ``candidate_index`` (queries, candidates) picks each query's candidates
    from it, -1 padding lists shorter than the longest (MMEB shares candidates between queries, so each is
    embedded once; padding scores -inf and never beats the positive)."""
    q = unit_rows(query_emb, "query_emb")
    if candidate_index is None:
        cand = torch.as_tensor(np.stack(candidate_embs) if isinstance(candidate_embs, list) else candidate_embs)
        if cand.ndim != 3 or cand.shape[0] != q.shape[0] or cand.shape[1] == 0:
            raise ValueError(f"candidate_embs must be (queries={q.shape[0]}, candidates>=1, dim), got {tuple(cand.shape)}")
        flat = unit_rows(cand.reshape(-1, cand.shape[-1]), "candidate_embs")
        _same_dim(q, flat)
        cand = flat.reshape(cand.shape).to(q.device)
        return torch.einsum("nd,ncd->nc", q, cand)
    pool = unit_rows(candidate_embs, "candidate_embs").to(q.device)
    _same_dim(q, pool)
    index = torch.as_tensor(np.asarray(candidate_index), dtype=torch.long, device=q.device)
    if index.ndim != 2 or index.shape[0] != q.shape[0] or index.shape[1] == 0:
        raise ValueError(f"candidate_index must be (queries={q.shape[0]}, candidates>=1), got {tuple(index.shape)}")
    if (index[:, 0] < 0).any() or index.max() >= pool.shape[0] or index.min() < -1:
        raise ValueError(f"candidate_index values must lie in [0, {pool.shape[0]}) (-1 pads, never in column 0)")
    scores = (q @ pool.T).gather(1, index.clamp(min=0))
    return scores.masked_fill(index < 0, -torch.inf)


def wins(scores: torch.Tensor, ties: Literal["first", "against"] = "first") -> torch.Tensor:
    """Per row of ``candidate_scores``, whether candidate 0 wins under the tie rule (see ``hits_at_1``)."""
    if ties not in ("first", "against"):
        raise ValueError(f"ties must be 'first' or 'against', got {ties!r}")
    beaten = scores[:, 1:] >= scores[:, :1] if ties == "against" else scores[:, 1:] > scores[:, :1]
    return (~beaten).all(dim=1).cpu()


def hits_in_blocks(
    queries: Sequence[str], candidates: Sequence[Sequence[str]], fetch: Callable[[list[str]], torch.Tensor],
    block_slots: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits by index order, strict hits), a CPU bool tensor each, of queries given as item keys: row i's query
    ``queries[i]`` against ``candidates[i]`` (the positive first; lists may differ in length). ``fetch(keys)``
    returns those items' embeddings. Each block takes as many queries as fit ``block_slots`` candidate slots
    (at least one) and fetches its distinct candidates once; each query's scores come from one product."""
    if len(queries) != len(candidates):
        raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
    if block_slots < 1:
        raise ValueError(f"block_slots must be >= 1, got {block_slots}")
    empty = [i for i, c in enumerate(candidates) if not c]
    if empty:
        raise ValueError(f"query {empty[0]} has no candidates")
    hits, strict = torch.zeros(len(queries), dtype=torch.bool), torch.zeros(len(queries), dtype=torch.bool)
    start = 0
    while start < len(queries):
        stop, slots = start + 1, len(candidates[start])
        while stop < len(queries) and slots + len(candidates[stop]) <= block_slots:
            slots += len(candidates[stop])
            stop += 1
        local: dict[str, int] = {}
        width = max(len(c) for c in candidates[start:stop])
        index = np.full((stop - start, width), -1, dtype=np.int64)
        for r, row in enumerate(candidates[start:stop]):
            index[r, : len(row)] = [local.setdefault(key, len(local)) for key in row]
        scores = candidate_scores(fetch(list(queries[start:stop])), fetch(list(local)), index)
        hits[start:stop], strict[start:stop] = wins(scores, "first"), wins(scores, "against")
        start = stop
    return hits, strict


def _same_dim(q: torch.Tensor, c: torch.Tensor) -> None:
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"query_emb has dim {q.shape[1]} but candidate_embs has dim {c.shape[1]}")


def precision_at_1(
    query_emb: np.ndarray | torch.Tensor,
    candidate_embs: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    candidate_index: np.ndarray | torch.Tensor | None = None,
    ties: Literal["first", "against"] = "first",
) -> float:
    """Share of queries whose positive (candidate 0) wins; arguments as ``hits_at_1``."""
    return float(hits_at_1(query_emb, candidate_embs, candidate_index, ties).float().mean())


def mmeb_summary(
    per_dataset: Mapping[str, float], datasets: Iterable[MmebDataset] | Mapping[str, tuple[str, str]],
    metric: str = "p@1",
) -> dict[str, float]:
    """Stable names: ``mmeb/dataset/<Name>/p@1``, ``mmeb/<meta_task>/p@1`` (lower case), ``mmeb/ind/p@1``,
    ``mmeb/ood/p@1``, ``mmeb/overall/p@1`` (``metric`` names the last part: ``p@1_strict`` for the strict
    rule). ``datasets`` gives each name's meta-task and split (the loaded ``MmebDataset`` list, or name ->
    (meta_task, split)). A group without datasets is left out, not 0."""
    info = dict(datasets) if isinstance(datasets, Mapping) else {d.name: (d.meta_task, d.split) for d in datasets}
    unknown = [name for name in per_dataset if name not in info]
    if unknown:
        raise ValueError(f"no meta-task/split for MMEB dataset(s) {unknown}; pass their MmebDataset entries")
    out = {f"mmeb/dataset/{metric_part(name)}/{metric}": float(v) for name, v in per_dataset.items()}
    groups: dict[str, list[float]] = {}
    for name, value in per_dataset.items():
        meta_task, split = info[name]
        if meta_task not in MMEB_META_TASKS or split.upper() not in ("IND", "OOD"):
            raise ValueError(f"MMEB dataset {name}: meta_task {meta_task!r} / split {split!r} not recognised")
        for group in (meta_task.lower(), split.lower(), "overall"):
            groups.setdefault(group, []).append(float(value))
    for group in (*(m.lower() for m in MMEB_META_TASKS), "ind", "ood", "overall"):
        if group in groups:
            out[f"mmeb/{group}/{metric}"] = sum(groups[group]) / len(groups[group])
    return out
