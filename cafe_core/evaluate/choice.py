"""Multiple-choice understanding (MMStar, MMMU): the option letter in a generated answer, and accuracy.

Letter extraction, first rule that applies (letters are those of ``options``; None when nothing applies):

1. The answer starts with a letter closed by ``)``, ``]``, ``.``, ``:`` or the end of the answer, optionally
   opened by ``(`` or ``[``: "B", "B.", "(B)", "[B]", "B: blue", "b) blue". Lower case is accepted here
   only, where the punctuation makes it a label ("a dog" is not option A).
2. A cue then a letter standing alone: "The answer is B", "Answer: (C)", "option D", "the correct choice
   is A." (the first such cue). Lower case only where nothing but punctuation follows it: "the answer is b"
   and "the answer is (c)." are letters, "the answer is a dog" is a word.
3. A letter that opens the answer and is called correct: "B is correct", "(c) is the right answer".
4. Exactly one distinct option letter standing alone (upper case, after brackets and punctuation become
   spaces) anywhere in the answer, as VLMEvalKit's ``can_infer_option`` does: "I think C fits best".
   Two different letters ("A or B") are ambiguous: None. An "A" that opens the answer before a lower-case
   word is the article ("A red circle"), not option A.

A None answer is scored wrong.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

_PUNCT = re.compile(r"[.()\[\],:;!?*#{}\"'`]")


def metric_part(text: str) -> str:
    """A label as one metric-name component: runs of characters other than letters, digits, '.', '_' and '-'
    become one '_' ("science & technology" -> "science_technology", "red circle" -> "red_circle")."""
    if not re.search(r"[A-Za-z0-9]", text):
        raise ValueError(f"{text!r} has no letters or digits to name a metric with")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip())  # names already safe (config set names) stay as they are


def extract_letter(answer: str, options: str = "ABCD") -> str | None:
    """The option letter the answer gives (rules in the module docstring), upper case, or None."""
    letters = options.upper()
    text = answer.strip()
    if not text or not letters:
        return None
    lead = re.match(r"^[(\[]?\s*([A-Za-z])\s*(?:[)\].:]|$)", text)
    if lead and lead[1].upper() in letters:
        return lead[1].upper()
    cue = re.search(rf"\b(?:answer|option|choice)\b(?:\s+is)?\s*:?\s*[(\[]?([{letters}])(?![A-Za-z])(.*)", text,
                    flags=re.IGNORECASE | re.DOTALL)
    # An upper-case letter whatever follows; a lower-case one only at the end ("the answer is a dog").
    if cue and (cue[1].isupper() or not re.search(r"[A-Za-z0-9]", cue[2])):
        return cue[1].upper()
    called = re.match(rf"^[(\[]?([{letters}])[)\]]?\s+is\s+(?:the\s+)?(?:correct|right)\b", text, flags=re.IGNORECASE)
    if called:
        return called[1].upper()
    words = _PUNCT.sub(" ", text).split()
    standalone = {w for w in words if len(w) == 1 and w in letters}
    if len(words) > 1 and words[0] == "A" and words[1][:1].islower() and words[1] not in ("or", "and"):
        standalone.discard("A")  # the article opening a sentence ("A red circle"), unless A recurs alone
        standalone |= {"A"} & set(words[1:])
    return standalone.pop() if len(standalone) == 1 else None


def choice_accuracy(preds: Sequence[str | None], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to the answer letter (None is wrong)."""
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("no questions to score")
    return sum(p is not None and p == a for p, a in zip(preds, answers)) / len(answers)


def choice_metrics(
    name: str, preds: Sequence[str | None], answers: Sequence[str], categories: Sequence[str]
) -> dict[str, float]:
    """``mc/<name>/accuracy`` and ``mc/<name>/<category>/accuracy`` (categories in first-seen order)."""
    if len(categories) != len(answers):
        raise ValueError(f"{len(categories)} categories for {len(answers)} answers")
    out = {f"mc/{metric_part(name)}/accuracy": choice_accuracy(preds, answers)}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, category in enumerate(categories):
        groups[metric_part(category)].append(i)
    for category, rows in groups.items():
        out[f"mc/{metric_part(name)}/{category}/accuracy"] = choice_accuracy(
            [preds[i] for i in rows], [answers[i] for i in rows])
    return out
