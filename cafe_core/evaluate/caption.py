"""Caption hallucination (THRONE, Kaul et al. 2024): which vocabulary objects a free-form description
mentions, scored against the image's ground-truth objects (SPEC section 5).

The judge is a deterministic vocabulary/synonym matcher, the built-in judge SPEC allows in place of THRONE's
FLAN-T5 (CHAIR-style). A class is mentioned when one of its phrases occurs in the text:

- case-insensitive, on word boundaries ("star" does not match "start"), multi-word phrases match across
  spaces or hyphens ("red circle", "red-circle");
- plurals: each phrase also matches with its last word in the regular plural ("circles", "boxes",
  "berries"); irregular plurals ("people", "mice") must be listed as synonyms;
- overlapping phrases: at one position the longest phrase wins, so "hot dog" is the hot-dog class, not "dog";
- negation: a mention is dropped when one of the three words before it, within the same clause (not
  crossing . , ; : ! ? or a line break), is a negation cue: no, not, without, nor, never, none, neither or
  a word ending in n't ("no red circles", "there isn't a red circle", "without a blue star").
  Limitations: "not only a red circle" drops the circle; in "no red circle or green star" the star, four
  words after "no", counts as mentioned; any negation further away is not seen.

Metrics: precision = correct mentions / mentions, recall = correct mentions / ground-truth objects, and
F-beta = (1 + b^2) P R / (b^2 P + R) with b = 1 and 0.5. "overall" pools every (image, class) decision
(micro); "classwise" is the mean over classes of the per-class values, over the classes that occur in the
ground truth or are mentioned at least once (a class with neither has no decision to score). Class-wise
F0.5 is THRONE's principal metric. A zero denominator gives 0.0.

THRONE's own code averages differently, and its numbers are reported beside these under their own names
(``caption/throne/...``), so a result can be set beside the paper's: ``classwise`` takes each class's P, R
and F over all images and the NaN-ignoring mean over classes, where P is undefined without a mention, R
without a ground-truth object, and F unless the class has a correct mention (so a class only ever
hallucinated or only ever missed drops out of the F mean instead of counting 0); ``per_image`` (its "micro"
strategy) scores each image's class sets (P = R = 0 when either set is empty) and takes the NaN-ignoring
mean over images, F over the images with P + R > 0. Where every value is undefined the mean is 0.0.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

import numpy as np

from cafe_core.evaluate.choice import metric_part

_NEGATION_CUES = frozenset({"no", "not", "without", "nor", "never", "none", "neither"})
_CLAUSE_BREAK = re.compile(r"[.,;:!?\n]")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_NEGATION_WINDOW = 3


def plural(word: str) -> str:
    """Regular English plural of one word."""
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


@lru_cache(maxsize=16)
def _compile(vocabulary: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[re.Pattern[str], dict[str, frozenset[str]]]:
    """One alternation of every phrase form, longest first; and the classes each form names."""
    forms: dict[str, set[str]] = {}
    for cls, phrases in vocabulary:
        for phrase in (cls, *phrases):
            words = phrase.lower().split()
            if not words:
                continue
            for form in (words, [*words[:-1], plural(words[-1])]):
                forms.setdefault(" ".join(form), set()).add(cls)
    ordered = sorted(forms, key=lambda f: (-len(f), f))
    alternation = "|".join(r"[\s-]+".join(re.escape(w) for w in form.split()) for form in ordered)
    pattern = re.compile(rf"(?<![\w])(?:{alternation})(?![\w])")
    return pattern, {form: frozenset(classes) for form, classes in forms.items()}


def _vocabulary_key(vocabulary: Mapping[str, Iterable[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((cls, tuple(phrases)) for cls, phrases in vocabulary.items())


def _negated(text: str, start: int) -> bool:
    clause = _CLAUSE_BREAK.split(text[:start])[-1]
    words = _WORD.findall(clause)[-_NEGATION_WINDOW:]
    return any(w in _NEGATION_CUES or w.endswith("n't") for w in words)


def objects_mentioned(text: str, vocabulary: Mapping[str, Iterable[str]]) -> set[str]:
    """Classes of ``vocabulary`` (class -> phrases naming it; the class name itself always counts) that the
    text mentions, by the rules in the module docstring."""
    pattern, classes_of = _compile(_vocabulary_key(vocabulary))
    lowered = text.lower().replace("\u2019", "'")
    found: set[str] = set()
    for match in pattern.finditer(lowered):
        if not _negated(lowered, match.start()):
            found |= classes_of[" ".join(re.split(r"[\s-]+", match.group(0)))]
    return found


def _f_beta(p: np.ndarray | float, r: np.ndarray | float, beta: float) -> np.ndarray:
    p, r = np.asarray(p, dtype=np.float64), np.asarray(r, dtype=np.float64)
    den = beta**2 * p + r
    return np.divide((1 + beta**2) * p * r, den, out=np.zeros_like(den), where=den > 0)


def _div(num: np.ndarray | int, den: np.ndarray | int) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(den), where=den > 0)


def caption_metrics(
    mentioned: Sequence[set[str] | frozenset[str]], truth: Sequence[set[str] | frozenset[str]], classes: Sequence[str]
) -> dict[str, float]:
    """``caption/overall/{precision,recall,f1,f0.5}``, ``caption/classwise/{...}`` and
    ``caption/class/<class>/{precision,recall,f0.5}`` (class names through ``metric_part``: spaces become
    '_'). Only classes in ``classes`` are scored."""
    if len(mentioned) != len(truth):
        raise ValueError(f"{len(mentioned)} descriptions for {len(truth)} images")
    if not truth:
        raise ValueError("no images to score")
    index = {c: k for k, c in enumerate(classes)}
    said = np.zeros((len(truth), len(classes)), dtype=bool)
    real = np.zeros_like(said)
    for i, (m, t) in enumerate(zip(mentioned, truth)):
        said[i, [index[c] for c in m if c in index]] = True
        real[i, [index[c] for c in t if c in index]] = True
    tp, fp, fn = (said & real).sum(0), (said & ~real).sum(0), (~said & real).sum(0)

    out: dict[str, float] = {}
    p, r = _div(tp.sum(), tp.sum() + fp.sum()), _div(tp.sum(), tp.sum() + fn.sum())
    out.update({"caption/overall/precision": float(p), "caption/overall/recall": float(r),
                "caption/overall/f1": float(_f_beta(p, r, 1.0)), "caption/overall/f0.5": float(_f_beta(p, r, 0.5))})
    pc, rc = _div(tp, tp + fp), _div(tp, tp + fn)
    f1c, f05c = _f_beta(pc, rc, 1.0), _f_beta(pc, rc, 0.5)
    scored = (tp + fp + fn) > 0
    for name, values in (("precision", pc), ("recall", rc), ("f1", f1c), ("f0.5", f05c)):
        out[f"caption/classwise/{name}"] = float(values[scored].mean()) if scored.any() else 0.0
    out.update(throne_metrics(said, real))
    for k in np.flatnonzero(scored):
        part = metric_part(classes[k])
        out.update({f"caption/class/{part}/precision": float(pc[k]), f"caption/class/{part}/recall": float(rc[k]),
                    f"caption/class/{part}/f0.5": float(f05c[k])})
    return out


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else 0.0


def _f_or_nan(p: np.ndarray, r: np.ndarray, beta: float) -> np.ndarray:
    """F-beta as THRONE computes it: NaN where P or R is undefined or both are 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (1 + beta**2) * p * r / (beta**2 * p + r)


def throne_metrics(said: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """``caption/throne/{classwise,per_image}/{precision,recall,f1,f0.5}`` from (images x classes) boolean
    matrices of mentioned and present classes, averaged as THRONE's code averages (module docstring)."""
    out: dict[str, float] = {}
    tp, predicted, present = (said & real).sum(0), said.sum(0), real.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(predicted > 0, tp / np.maximum(predicted, 1), np.nan)
        r = np.where(present > 0, tp / np.maximum(present, 1), np.nan)
    hits, n_said, n_real = (said & real).sum(1), said.sum(1), real.sum(1)
    both = (n_said > 0) & (n_real > 0)
    pi = np.where(both, hits / np.maximum(n_said, 1), 0.0)
    ri = np.where(both, hits / np.maximum(n_real, 1), 0.0)
    for level, (pv, rv) in (("classwise", (p, r)), ("per_image", (pi, ri))):
        out[f"caption/throne/{level}/precision"] = _nanmean(pv)
        out[f"caption/throne/{level}/recall"] = _nanmean(rv)
        out[f"caption/throne/{level}/f1"] = _nanmean(_f_or_nan(pv, rv, 1.0))
        out[f"caption/throne/{level}/f0.5"] = _nanmean(_f_or_nan(pv, rv, 0.5))
    return out
