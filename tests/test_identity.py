"""Evaluation-set identity: the content digest that says which items a number was computed on."""

from __future__ import annotations

import numpy as np
import pytest

from cafe_core.evaluate.identity import content_digest, differences, set_identity
from cafe_core.evaluate.sets import PopeQuestion


def question(qid: int = 1, image: bytes = b"\x89PNG", label: str = "yes") -> PopeQuestion:
    return PopeQuestion(qid, "a.png", image, "Is there a cat?", label)


def test_digest_is_golden():
    # Champions' recorded digests are compared with new ones: a silent change of the encoding must fail here.
    value = [question(), {"k": (1, 2.5, None)}, frozenset({"b", "a"}), np.arange(3)]
    assert content_digest(value) == "44c4a0c44866df02601906403140872c83d43dc0de2c67d0beeb56c952dbbf35"


@pytest.mark.parametrize("other", [
    [question(label="no")],  # a label
    [question(image=b"\x89PNG\x00")],  # an image's bytes
    [question(qid=2)],  # an id
    [question(), question()],  # one more item
    [],  # none
])
def test_any_change_of_the_items_changes_the_digest(other):
    assert content_digest(other) != content_digest([question()])


def test_encoding_is_unambiguous():
    assert content_digest(["ab", "c"]) != content_digest(["a", "bc"])  # lengths are part of it
    assert content_digest([1]) != content_digest(["1"]) != content_digest([b"1"])  # so are types
    assert content_digest({"a": 1, "b": 2}) == content_digest({"b": 2, "a": 1})  # mappings: by key
    assert content_digest(frozenset({"x", "y"})) == content_digest(frozenset({"y", "x"}))
    with pytest.raises(TypeError, match="cannot digest"):
        content_digest(object())


def test_differences_name_the_set_and_both_sides():
    a = {"pope/random": set_identity([question()], 1, "s3://b/pope", None)}
    b = {"pope/random": set_identity([question(), question(2)], 2, "s3://b/pope", 2)}
    assert differences(a, a) == []
    (line,) = differences(a, b)
    assert line.startswith("pope/random: 1 items (digest ") and "max_items None) vs 2 items" in line
    assert differences(a, {}) == ["pope/random: not recorded there"]
    assert differences({}, a, ["pope/random"]) == ["pope/random: not scored here"]
