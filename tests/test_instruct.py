"""The instruction split the tiny base is pretrained on: every answer is true of its image, the answers are
balanced, questions are asked as the evaluation asks them, and `cafe data synth` writes it in the training
layout that `cafe convert` reads."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from cafe_core.config import load_config
from cafe_core.data.instruct import absent_object, bind, choice, grounding, instruct_rows, presence, question_turns
from cafe_core.data.shapes import CLASSES, LETTERS, Obj, Scene
from cafe_core.prompts import DESCRIBE, IMAGE_TOKEN, MC_SUFFIX, SHORT_ANSWER_SUFFIX
from cafe_core.storage import Storage
from tests.conftest import LOCAL_CONFIG

# A red circle in the upper left, a blue star at the bottom: the questions below are hand-checked on it.
SCENE = Scene([Obj("circle", "red", 0.2, 0.2, "small"), Obj("star", "blue", 0.5, 0.8, "medium")])


def test_presence_answers_are_true_and_asked_as_pope_asks():
    rng = np.random.default_rng(0)
    for _ in range(50):
        question, answer = presence(SCENE, True, rng)
        assert answer == "Yes" and question in (f"Is there a {c} in the image?{SHORT_ANSWER_SUFFIX}" for c in SCENE.classes())
        question, answer = presence(SCENE, False, rng)
        asked = question.removeprefix("Is there a ").removeprefix("Is there an ").split(" in the image?")[0]
        assert answer == "No" and asked in CLASSES and asked not in SCENE.classes()


def test_related_negatives_share_a_colour_or_a_shape():
    rng = np.random.default_rng(1)
    related = {absent_object(SCENE, "related", rng) for _ in range(200)}
    expected = {c for c in CLASSES if c not in SCENE.classes() and (c.startswith(("red ", "blue "))
                                                                   or c.endswith((" circle", " star")))}
    assert related == expected  # 5 + 5 other colours' circles and stars, 5 + 5 other red and blue shapes, minus overlaps
    assert len(expected) == 18
    with pytest.raises(ValueError, match="unknown negative kind"):
        absent_object(SCENE, "rare", rng)


def test_popular_negatives_follow_the_worlds_popularity():
    rng = np.random.default_rng(2)
    drawn = Counter(absent_object(SCENE, "popular", rng) for _ in range(3000))
    from cafe_core.data.shapes import CLASS_PRIOR

    top = CLASSES[int(np.argmax(CLASS_PRIOR))]
    assert drawn.most_common(1)[0][0] == top and drawn[top] > 3000 / 34 * 3  # far above uniform


def test_grounding_and_choice_answers():
    rng = np.random.default_rng(3)
    answers = {grounding(SCENE, rng) for _ in range(40)}
    assert answers == {(f"Where is the red circle?{SHORT_ANSWER_SUFFIX}", "In the upper left corner"),
                       (f"Where is the blue star?{SHORT_ANSWER_SUFFIX}", "At the bottom")}
    truth = {"How many objects are in the image?": "2", "What colour is the circle?": "red",
             "What colour is the star?": "blue", "Where is the circle?": "upper left", "Where is the star?": "bottom"}
    seen = set()
    for k in range(200):
        question, letter = choice(SCENE, rng, k % 4)
        assert letter == LETTERS[k % 4] and question.endswith(MC_SUFFIX)
        head, options = question.removesuffix(MC_SUFFIX).split("\nOptions: ")
        picked = dict(o.split(": ", 1) for o in options.split(", "))[letter]
        seen.add(head)
        if head == "Which of these shapes appears in the image?":
            assert picked in ("circle", "star")
        else:
            assert picked == truth[head], head
    assert len(seen) == 6  # count, shape, and colour and position of either object


def test_binding_questions_name_one_object_by_the_other_attribute():
    rng = np.random.default_rng(6)
    asked = {bind(SCENE, rng) for _ in range(60)}
    assert asked == {(f"What colour is the circle?{SHORT_ANSWER_SUFFIX}", "Red"),
                     (f"What colour is the star?{SHORT_ANSWER_SUFFIX}", "Blue"),
                     (f"What shape is the red object?{SHORT_ANSWER_SUFFIX}", "Circle"),
                     (f"What shape is the blue object?{SHORT_ANSWER_SUFFIX}", "Star")}
    twins = Scene([Obj("circle", "red", 0.2, 0.2, "small"), Obj("circle", "red", 0.8, 0.8, "small")])
    assert {bind(twins, rng)[0] for _ in range(20)} == {f"Where is the red circle?{SHORT_ANSWER_SUFFIX}"}
    # "the red object" only where red is unique: a red circle and a red star are asked about by shape
    mixed = Scene([Obj("circle", "red", 0.2, 0.2, "small"), Obj("star", "red", 0.8, 0.8, "small")])
    assert {bind(mixed, rng)[1] for _ in range(20)} == {"Red"}


def test_a_row_asks_different_questions_and_consumes_one_label_each():
    rng = np.random.default_rng(4)
    yes, letters = [True, False, True, False], [0, 1, 2, 3]
    turns = question_turns(SCENE, rng, 4, yes, letters)
    assert len({q for q, _ in turns}) == len(turns) == 4
    assert (yes, letters) == ([True, False], [0, 1, 2])  # two presence questions, one multiple choice
    assert sum(q.startswith(("What colour is the", "What shape is the")) and not q.endswith(MC_SUFFIX)
               for q, _ in turns) == 1  # and one binding question


def test_rows_are_balanced_and_shaped_as_evaluation_asks():
    rows = list(instruct_rows(1200, np.random.default_rng(5), 0.3, 6, lambda scene: b"png", IMAGE_TOKEN))  # base.yaml's 6
    describe = [r for r in rows if r["conversations"][0]["value"] == f"{IMAGE_TOKEN}\n{DESCRIBE}"]
    assert 0.26 < len(describe) / len(rows) < 0.34
    answers: Counter = Counter()
    for row in rows:
        turns = row["conversations"]
        humans = [t["value"] for t in turns[::2]]
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(humans)
        assert humans[0].startswith(f"{IMAGE_TOKEN}\n") and not any(IMAGE_TOKEN in h for h in humans[1:])
        assert len(set(humans)) == len(humans)
        if row in describe:
            assert len(turns) == 2  # never a description and questions in one row
        else:
            assert 4 <= len(humans) <= 6 and not any(DESCRIBE in h for h in humans)
            answers.update(t["value"] for t in turns[1::2] if t["value"] in ("Yes", "No", *LETTERS))
    yes_share = answers["Yes"] / (answers["Yes"] + answers["No"])
    assert 0.45 < yes_share <= 0.5  # balanced blocks; a repeated "yes" question on a one-object scene is dropped
    letters = [answers[letter] for letter in LETTERS]
    assert max(letters) - min(letters) <= 4  # shuffled blocks of every letter

    def kind(question: str) -> str:
        return ("presence" if "Is there" in question else "choice" if "Options:" in question
                else "where" if "Where is" in question else "bind" if "What " in question else question)

    # each kind is asked first too, as the evaluation asks it
    firsts = Counter(kind(r["conversations"][0]["value"]) for r in rows if r not in describe)
    assert set(firsts) == {"presence", "choice", "where", "bind"} and min(firsts.values()) > 80, firsts


def test_rows_are_a_pure_function_of_the_seed():
    def digest(seed: int) -> str:
        rows = instruct_rows(40, np.random.default_rng(seed), 0.3, 4, lambda scene: json.dumps(scene.classes()).encode(),
                             IMAGE_TOKEN)
        return hashlib.sha256(json.dumps([[r["id"], r["image"]["bytes"].decode(), r["conversations"]] for r in rows]).encode()).hexdigest()

    assert digest(0) == digest(0) != digest(1)
    assert digest(0)[:16] == GOLDEN_ROWS  # a silent change of the base's training data must fail here


GOLDEN_ROWS = "7b3903dc8a8e68c5"


def test_synth_writes_the_split_only_when_asked_and_convert_accepts_every_row(tmp_path):
    from cafe_core.data.convert import convert
    from cafe_core.data.synth import generate

    small = ["synth.train_size=4", "synth.bad_fraction=0", "synth.retrieval_images=2", "synth.pope_images=1",
             "synth.mmeb_rows_per_dataset=1", "synth.mc_questions=1", "synth.caption_images=1", "data.workers=0"]
    store = Storage()
    cfg = load_config(LOCAL_CONFIG, [f"root={tmp_path / 'a'}", "run_id=r", *small])
    assert not any("instruct" in name for name in generate(cfg.synth, store).names())
    cfg = load_config("configs/base.yaml", [f"root={tmp_path / 'b'}", "run_id=r", *small, "synth.instruct_size=25",
                                            "synth.train_shard_rows=10", "validate.min_rows=1"])
    manifest = generate(cfg.synth, store)
    assert sorted(n for n in manifest.names() if "instruct" in n) == [
        f"train/instruct/instruct-0000{i}-of-00003.parquet" for i in range(3)]
    assert manifest.meta["counts"]["instruct_rows"] == 25
    convert(cfg.data, store, cfg.to_yaml(), progress=False)
    stats = store.read_json(f"{cfg.data.output}/stats.json")
    assert (stats["input"], stats["accepted"], stats["rejected"]) == (25, 25, 0)
