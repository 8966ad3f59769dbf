"""Which way is better for every metric name the evaluation writes: one table, read by the gate.

A gate rule compares a candidate with the champion "for the worse"; which sign is worse comes from here,
so a rule on a lower-is-better metric (the modality gap) cannot silently be read as higher-is-better. A
rule on a name this table does not know must state its `direction`; a metric with no better side (POPE's
yes-ratio, a band around the set's balance) takes absolute bounds only.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

Direction = Literal["higher", "lower"]

# (glob over metric names, direction); the first match decides. "*" also matches "/".
DIRECTIONS: tuple[tuple[str, Direction | None], ...] = (
    ("retrieval/*/i2t_R@*", "higher"),
    ("retrieval/*/t2i_R@*", "higher"),
    ("mmeb/*/p@1", "higher"),
    ("mmeb/*/p@1_strict", "higher"),
    ("pope/*/yes_ratio", None),
    ("pope/*/accuracy", "higher"),
    ("pope/*/precision", "higher"),
    ("pope/*/recall", "higher"),
    ("pope/*/f1", "higher"),
    ("mc/*/accuracy", "higher"),
    ("caption/*/precision", "higher"),
    ("caption/*/recall", "higher"),
    ("caption/*/f1", "higher"),
    ("caption/*/f0.5", "higher"),
    ("gap/*centroid_distance", "lower"),  # CAFe closes the modality gap
    ("gap/*mean_cosine_pairs", "higher"),
)


class UnknownDirection(LookupError):
    pass


def direction_of(name: str) -> Direction | None:
    """The better side of a metric name, or of a rule's glob (matched as written, so "pope/*/f1" is
    known while "pope/*" is not: it would cover the yes-ratio too). None: no better side (a band).
    Raises UnknownDirection for a name the table does not cover."""
    for glob, direction in DIRECTIONS:
        if fnmatch.fnmatchcase(name, glob):
            return direction
    raise UnknownDirection(name)
