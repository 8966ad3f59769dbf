"""The instruction split of the shapes world: what the tiny base model is pretrained on (LM loss only)
before CAFe fine-tunes it, so that the embedded default starts, as the paper does, from a model that already
describes images and answers questions about them.

A row is one image and either a detailed description or several independent questions, each asked the way
the evaluation asks it: presence questions with POPE's short-answer instruction (yes and no balanced, the
absent objects drawn as POPE draws them: at random, by popularity, and sharing a colour or a shape with an
object in the image), MMStar-style multiple choice on count, colour, shape and position (letters balanced),
grounding ("Where is the red star?") and binding ("What colour is the star?"). Questions are shuffled within
a row, so each kind is also asked first, as evaluation asks it. No row holds a description and questions
together: a description in the context would answer the questions without looking at the image.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from cafe_core.data.shapes import (
    CLASS_PRIOR,
    CLASSES,
    LETTERS,
    POSITION_PHRASES,
    MultipleChoice,
    Scene,
    colour_choice,
    count_choice,
    detailed_caption,
    position_choice,
    presence_question,
    sample_scene,
    shape_choice,
    unique_shape_objects,
)
from cafe_core.prompts import DESCRIBE, MC_SUFFIX, SHORT_ANSWER_SUFFIX

NEGATIVE_KINDS = ("random", "popular", "related")
_DRAWS = 4  # tries for a question not yet asked about the image (a one-object scene has few)


def absent_object(scene: Scene, kind: str, rng: np.random.Generator) -> str:
    """An object class not in the scene: uniform ("random"), by the world's popularity ("popular"), or
    sharing a colour or a shape with an object in the scene ("related", POPE's adversarial negatives are of
    this kind: what co-occurs with what is there)."""
    absent = scene.absent_classes()
    if kind == "related":
        colours = {o.colour for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        related = [c for c in absent if c.split(" ")[0] in colours or c.split(" ")[1] in shapes]
        absent = related or absent
    if kind == "popular":
        weights = np.array([CLASS_PRIOR[CLASSES.index(c)] for c in absent])
        return absent[int(rng.choice(len(absent), p=weights / weights.sum()))]
    if kind not in NEGATIVE_KINDS:
        raise ValueError(f"unknown negative kind {kind!r}; expected one of {NEGATIVE_KINDS}")
    return absent[int(rng.integers(len(absent)))]


def presence(scene: Scene, yes: bool, rng: np.random.Generator) -> tuple[str, str]:
    if yes:
        names = scene.classes()
        asked = names[int(rng.integers(len(names)))]
    else:
        asked = absent_object(scene, NEGATIVE_KINDS[int(rng.integers(len(NEGATIVE_KINDS)))], rng)
    return presence_question(asked) + SHORT_ANSWER_SUFFIX, "Yes" if yes else "No"


def choice(scene: Scene, rng: np.random.Generator, answer_index: int) -> tuple[str, str]:
    unique = bool(unique_shape_objects(scene))
    builders: list[Callable[..., MultipleChoice]] = [count_choice, shape_choice]
    builders += [colour_choice, position_choice] if unique else []
    picked = builders[int(rng.integers(len(builders)))](scene, rng, answer_index)
    return picked.text() + MC_SUFFIX, picked.answer


def grounding(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    return f"Where is the {obj.name}?" + SHORT_ANSWER_SUFFIX, POSITION_PHRASES[obj.position].capitalize()


def bind(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """An attribute of the object named by the other one: "What colour is the star?" or "What shape is the
    red object?" where that names one object. Presence and multiple choice need this binding of colour to
    shape, and a small model learns it only when asked for it directly (docs/base-model.md); a scene
    without such an object gets a grounding question."""
    colours = [o.colour for o in scene.objects]
    by_colour = [o for o in scene.objects if colours.count(o.colour) == 1]
    by_shape = unique_shape_objects(scene)
    asks = [("colour", o) for o in by_shape] + [("shape", o) for o in by_colour]
    if not asks:
        return grounding(scene, rng)
    what, obj = asks[int(rng.integers(len(asks)))]
    if what == "colour":
        return f"What colour is the {obj.shape}?" + SHORT_ANSWER_SUFFIX, obj.colour.capitalize()
    return f"What shape is the {obj.colour} object?" + SHORT_ANSWER_SUFFIX, obj.shape.capitalize()


_OTHER_KINDS = ("bind", "choice", "grounding")  # the non-presence half of a row's questions, in this order


def question_turns(scene: Scene, rng: np.random.Generator, n: int, yes: list[bool],
                   letters: list[int]) -> list[tuple[str, str]]:
    """Up to ``n`` different questions about ``scene`` in random order: half presence (``yes`` gives their
    answers), the other half binding, multiple choice (``letters`` their correct letters) and grounding in
    turn (four questions: two presence, one binding, one multiple choice; grounding from six on, or where no
    object is named by one attribute)."""
    kinds = ["presence"] * (n - n // 2) + [_OTHER_KINDS[i % len(_OTHER_KINDS)] for i in range(n // 2)]
    turns: dict[str, str] = {}  # question -> answer; a question asked twice in a row is drawn again
    for kind in kinds:
        label = yes.pop() if kind == "presence" else letters.pop() if kind == "choice" else None
        ask = {"presence": lambda: presence(scene, label, rng), "choice": lambda: choice(scene, rng, label),
               "bind": lambda: bind(scene, rng), "grounding": lambda: grounding(scene, rng)}[kind]
        for _ in range(_DRAWS):
            question, answer = ask()
            if question not in turns:
                turns[question] = answer
                break
    pairs = list(turns.items())
    return [pairs[int(i)] for i in rng.permutation(len(pairs))]


def instruct_conversation(scene: Scene, rng: np.random.Generator, describe: bool, questions: int,
                          yes: list[bool], letters: list[int], image_token: str) -> list[dict[str, str]]:
    """One row's turns: the description, or ``questions`` questions; the image token opens the first."""
    pairs = [(DESCRIBE, detailed_caption(scene, rng))] if describe else question_turns(scene, rng, questions, yes, letters)
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": f"{image_token}\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def instruct_scenes(rng: np.random.Generator) -> Iterator[Scene]:
    """Scenes as training and evaluation draw them, with three-object scenes (POPE's) twice as likely."""
    while True:
        yield sample_scene(rng, 3 if rng.random() < 0.25 else None)


def instruct_rows(n: int, rng: np.random.Generator, describe_fraction: float, questions: int,
                  render_png: Callable[[Scene], bytes], image_token: str) -> Iterator[dict[str, Any]]:
    """``n`` rows in the LLaVA-OneVision-Data layout. Answers are balanced over the whole split: presence
    yes/no and multiple-choice letters come from shuffled blocks."""
    scenes = instruct_scenes(rng)
    yes: list[bool] = []
    letters: list[int] = []
    for i in range(n):
        if len(yes) < questions:  # refill in shuffled blocks: every prefix balanced to within a block
            yes = [bool(v) for v in rng.permutation(np.arange(2 * questions) % 2)] + yes
        if len(letters) < questions:
            letters = [int(v) for v in rng.permutation(np.arange(4 * questions) % len(LETTERS))] + letters
        scene = next(scenes)
        describe = bool(rng.random() < describe_fraction)
        row_id = f"instruct-{i:07d}"
        yield {"id": row_id, "image": {"bytes": render_png(scene), "path": f"{row_id}.png"},
               "conversations": instruct_conversation(scene, rng, describe, questions, yes, letters, image_token),
               "data_source": "shapes-instruct"}
