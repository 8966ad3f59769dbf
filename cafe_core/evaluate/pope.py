"""POPE (Li et al. 2023): yes/no object-presence questions, "yes" the positive class (SPEC section 5).

Metrics per split (random, popular, adversarial) as POPE's ``evaluate.py`` computes them, and their mean
over the splits. A ratio whose denominator is zero is 0.0, never NaN: precision when nothing was answered
"yes", recall when no label is "yes", F1 when precision and recall are both 0.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

POPE_METRICS: tuple[str, ...] = ("accuracy", "precision", "recall", "f1", "yes_ratio")
_NEGATIVE_WORDS = frozenset({"no", "not"})


def parse_yes_no(answer: str) -> str:
    """POPE's answer parsing: keep the text before the first '.', remove commas, split into words; "no" if
    a word is "no" or "not", otherwise "yes" (so an answer that says neither counts as "yes", as in POPE).

    Two deliberate differences from the original: words are compared case-insensitively (the original
    matches "No", "no" and "not" but misses "NO" and "Not"), and words are split on any whitespace with
    surrounding punctuation stripped, so "No!" and "no\\n" are "no" (the original splits on single spaces).
    """
    head = answer.split(".", 1)[0].replace(",", "")
    words = {re.sub(r"^\W+|\W+$", "", word).lower() for word in head.split()}
    return "no" if words & _NEGATIVE_WORDS else "yes"


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """accuracy, precision, recall, f1 and yes_ratio (share of "yes" predictions) of parsed answers."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no POPE questions to score")
    for what, values in (("label", labels), ("prediction", predictions)):
        bad = next((v for v in values if v not in ("yes", "no")), None)
        if bad is not None:
            raise ValueError(f"{what} {bad!r} is not 'yes' or 'no' (parse answers with parse_yes_no)")
    tp = sum(lab == "yes" and pred == "yes" for lab, pred in zip(labels, predictions))
    tn = sum(lab == "no" and pred == "no" for lab, pred in zip(labels, predictions))
    fp = sum(lab == "no" and pred == "yes" for lab, pred in zip(labels, predictions))
    fn = len(labels) - tp - tn - fp
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / len(labels),
    }


def pope_summary(per_split: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """``pope/<split>/<metric>`` for each split and ``pope/average/<metric>``, the unweighted mean over the
    splits (POPE's splits have equal sizes)."""
    if not per_split:
        raise ValueError("no POPE splits to summarise")
    out: dict[str, float] = {}
    for split, metrics in per_split.items():
        out.update({f"pope/{split}/{m}": float(metrics[m]) for m in POPE_METRICS})
    for m in POPE_METRICS:
        out[f"pope/average/{m}"] = sum(float(metrics[m]) for metrics in per_split.values()) / len(per_split)
    return out
