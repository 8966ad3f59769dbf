"""The shapes world: classes and their statistics, scene sampling, rendering, captions and questions.

Everything here is a pure function of its arguments and a ``numpy.random.Generator``; nothing does I/O,
so a dataset built from it is reproducible from a seed. Object positions are fractions of the image side
(0..1, y downwards), so a scene renders at any resolution.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "diamond")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
CLASSES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
SIZES: tuple[str, ...] = ("small", "medium", "large")
MAX_OBJECTS = 3
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
LETTERS = "ABCD"

# Every word that names a shape in free text; model captions are matched against these.
SHAPE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "circles", "disc", "discs", "disk", "disks", "round"),
    "square": ("square", "squares", "box", "boxes"),
    "triangle": ("triangle", "triangles"),
    "star": ("star", "stars"),
    "hexagon": ("hexagon", "hexagons"),
    "diamond": ("diamond", "diamonds", "rhombus"),
}
# The singular nouns our own captions use (a subset of the synonyms), canonical word first.
SHAPE_NOUNS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "hexagon": ("hexagon",),
    "diamond": ("diamond", "rhombus"),
}
_SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little"),
    "medium": ("medium-sized", "mid-sized"),
    "large": ("large", "big"),
}

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 40),
    "green": (30, 150, 60),
    "blue": (30, 80, 210),
    "yellow": (225, 185, 0),
    "purple": (130, 50, 170),
    "orange": (240, 120, 20),
}

# --- world statistics: fixed by the world, independent of any seed -----------------------------------

# Zipf-like popularity. A class's rank is a fixed shuffle of the class order (7 is coprime with 36), so
# popularity is tied neither to one colour nor to one shape, and POPE's "popular" negatives are not random.
_POPULARITY_RANK = np.array([(7 * i + 5) % len(CLASSES) for i in range(len(CLASSES))])
CLASS_PRIOR: np.ndarray = 1.0 / (_POPULARITY_RANK + 1.0) ** 0.9
CLASS_PRIOR /= CLASS_PRIOR.sum()

# Each image draws a palette theme that boosts its colours, so classes co-occur with structure (warm with
# warm) and POPE's "adversarial" negatives differ from its "popular" ones.
THEMES: dict[str, tuple[str, ...]] = {
    "warm": ("red", "orange", "yellow"),
    "cool": ("blue", "green", "purple"),
    "mixed": COLOURS,
}
_THEME_P = np.array([0.4, 0.4, 0.2])
_THEME_BOOST = 8.0


def _theme_weights(colours: tuple[str, ...]) -> np.ndarray:
    boost = np.array([_THEME_BOOST if name.split(" ")[0] in colours else 1.0 for name in CLASSES])
    weights = CLASS_PRIOR * boost
    return weights / weights.sum()


_THEME_WEIGHTS = np.stack([_theme_weights(colours) for colours in THEMES.values()])
_COUNT_P = np.array([0.3, 0.4, 0.3])  # 1, 2 or 3 objects
_SIZE_P = np.array([0.35, 0.4, 0.25])
_RADIUS = {"small": 0.10, "medium": 0.135, "large": 0.17}  # circumradius, as a fraction of the side
# Centres keep this fraction of the sum of two circumradii apart: shapes may touch but never cover a centre.
_MIN_GAP = 0.9
_PLACE_TRIES = 200

# A 3x3 grid names positions; no two objects share a cell, so "the star in the upper left" is unambiguous.
_POSITION_WORDS = (
    ("upper left", "top", "upper right"),
    ("left", "center", "right"),
    ("lower left", "bottom", "lower right"),
)
POSITION_PHRASES = {
    "upper left": "in the upper left corner",
    "top": "at the top",
    "upper right": "in the upper right corner",
    "left": "on the left side",
    "center": "in the center",
    "right": "on the right side",
    "lower left": "in the lower left corner",
    "bottom": "at the bottom",
    "lower right": "in the lower right corner",
}


# --- scenes ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    x: float  # centre, fraction of the width
    y: float  # centre, fraction of the height (downwards)
    size: str  # one of SIZES

    @property
    def name(self) -> str:
        """The object's class, e.g. "red circle"."""
        return f"{self.colour} {self.shape}"

    @property
    def radius(self) -> float:
        return _RADIUS[self.size]

    @property
    def cell(self) -> tuple[int, int]:
        """(row, column) in the 3x3 position grid."""
        return min(int(self.y * 3), 2), min(int(self.x * 3), 2)

    @property
    def position(self) -> str:
        """Position word, e.g. "upper left", "center", "bottom"."""
        row, col = self.cell
        return _POSITION_WORDS[row][col]


@dataclass
class Scene:
    objects: list[Obj]
    background: tuple[int, int, int] = (235, 235, 235)

    def classes(self) -> list[str]:
        return [o.name for o in self.objects]

    def absent_classes(self) -> list[str]:
        present = set(self.classes())
        return [c for c in CLASSES if c not in present]


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A scene of 1-3 objects of distinct classes (``n_objects`` fixes the count)."""
    n = int(rng.choice(np.arange(1, MAX_OBJECTS + 1), p=_COUNT_P)) if n_objects is None else n_objects
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, not {n}")
    theme = int(rng.choice(len(THEMES), p=_THEME_P))
    class_ids = rng.choice(len(CLASSES), size=n, replace=False, p=_THEME_WEIGHTS[theme])
    objects: list[Obj] = []
    for class_id in class_ids:
        colour, shape = CLASSES[int(class_id)].split(" ")
        size = SIZES[int(rng.choice(len(SIZES), p=_SIZE_P))]
        objects.append(_place(rng, shape, colour, size, objects))
    return Scene(objects, _background(rng))


def distinct_scenes(rng: np.random.Generator, n: int, n_objects: tuple[int, ...] | None = None) -> list[Scene]:
    """``n`` scenes with pairwise different class sets, so a caption that names every object matches one
    image only. ``n_objects`` restricts the object counts to draw from."""
    scenes: list[Scene] = []
    seen: set[frozenset[str]] = set()
    for _ in range(100 * n):
        count = None if n_objects is None else int(rng.choice(n_objects))
        scene = sample_scene(rng, count)
        key = frozenset(scene.classes())
        if key not in seen:
            seen.add(key)
            scenes.append(scene)
            if len(scenes) == n:
                return scenes
    raise ValueError(f"could not draw {n} scenes with distinct object sets; ask for fewer")


def _place(rng: np.random.Generator, shape: str, colour: str, size: str, placed: list[Obj]) -> Obj:
    # Rejection sampling; a crowded scene falls back to a small object, which always fits among three.
    for fitted_size in (size, "small"):
        r = _RADIUS[fitted_size]
        for _ in range(_PLACE_TRIES):
            x, y = rng.uniform(r, 1.0 - r, size=2)
            obj = Obj(shape, colour, float(x), float(y), fitted_size)
            if all(_apart(obj, other) for other in placed):
                return obj
    raise RuntimeError(f"could not place a {colour} {shape} among {len(placed)} objects")


def _apart(a: Obj, b: Obj) -> bool:
    return a.cell != b.cell and math.hypot(a.x - b.x, a.y - b.y) >= _MIN_GAP * (a.radius + b.radius)


def _background(rng: np.random.Generator) -> tuple[int, int, int]:
    # A light gray (tint 0) to beige (tint 12) tone.
    level, tint = int(rng.integers(222, 249)), int(rng.integers(0, 13))
    return level, level - tint // 2, level - tint


def background_word(scene: Scene) -> str:
    r, _, b = scene.background
    return "beige" if r - b >= 8 else "light gray"


def unique_shape_objects(scene: Scene) -> list[Obj]:
    """Objects whose shape occurs once in the scene ("the star" names exactly one object)."""
    shapes = [o.shape for o in scene.objects]
    return [o for o in scene.objects if shapes.count(o.shape) == 1]


# --- rendering ---------------------------------------------------------------------------------------

# Drawn at 3x and box-averaged down: smooth edges, while shape interiors keep their exact colour.
_SUPERSAMPLE = 3


def render(scene: Scene, size: int) -> Image.Image:
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, big)
    return image.reduce(_SUPERSAMPLE)


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, side: int) -> None:
    cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
    fill = COLOUR_RGB[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        h = r * 0.8
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)], fill=fill)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "star":  # five points, alternating outer and inner radius
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
    else:
        radii = [r] * {"triangle": 3, "hexagon": 6}[shape]
    step = 2 * math.pi / len(radii)
    return [(cx + rk * math.cos(-math.pi / 2 + k * step), cy + rk * math.sin(-math.pi / 2 + k * step))
            for k, rk in enumerate(radii)]


def crop_around(image: Image.Image, obj: Obj) -> Image.Image:
    """A square crop centred on the object's centre pixel (odd side, so that pixel is the crop's centre),
    as large as the object allows without leaving the image."""
    side = image.width
    px, py = min(int(obj.x * side), side - 1), min(int(obj.y * side), side - 1)
    half = min(int(1.35 * obj.radius * side), px, py, side - 1 - px, side - 1 - py)
    return image.crop((px - half, py - half, px + half + 1, py + half + 1))


def png_bytes(image: Image.Image) -> bytes:
    """PNG without metadata: the same pixels always give the same bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --- language ----------------------------------------------------------------------------------------


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def count_phrase(n: int, noun: str) -> str:
    """"one shape", "three shapes"."""
    return f"{NUMBER_WORDS[n]} {noun}{'' if n == 1 else 's'}"


def join_list(items: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def presence_question(name: str) -> str:
    return f"Is there {with_article(name)} in the image?"


def relation(a: Obj, b: Obj) -> str:
    """Where ``a`` is relative to ``b``, along the axis on which they are further apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "to the right of" if dx > 0 else "to the left of"
    return "below" if dy > 0 else "above"


def _pick(rng: np.random.Generator, options: tuple[str, ...], p_first: float = 0.7) -> str:
    """The first option with probability ``p_first``, otherwise a uniform pick among the rest."""
    if len(options) == 1 or rng.random() < p_first:
        return options[0]
    return options[int(rng.integers(1, len(options)))]


def _nouns(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    """One noun per object for a whole caption, so each object keeps its name within the text."""
    return {o.name: f"{o.colour} {_pick(rng, SHAPE_NOUNS[o.shape])}" for o in scene.objects}


def _reading_order(scene: Scene) -> list[Obj]:
    return sorted(scene.objects, key=lambda o: o.cell)


def detailed_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A long, model-answer style description: count, background, every object with its size and position,
    relations between neighbours and a closing remark that nothing else is there."""
    nouns = _nouns(scene, rng)
    ordered = _reading_order(scene)
    sentences = [_opening(scene, rng)]
    sentences += [_object_sentence(o, nouns[o.name], rng) for o in ordered]
    sentences += [_relation_sentence(b, a, nouns, rng) for a, b in zip(ordered, ordered[1:])]
    sentences.append(_closing(len(ordered), rng))
    return " ".join(sentences)


def _opening(scene: Scene, rng: np.random.Generator) -> str:
    noun = ("shape", "object")[int(rng.integers(2))]
    n = len(scene.objects)
    count = f"a single {noun}" if n == 1 else count_phrase(n, noun)
    bg = background_word(scene)
    templates = (
        f"The image shows {count} on a plain {bg} background.",
        f"This is a simple synthetic picture with {count} drawn on a {bg} background.",
        f"There {'is' if n == 1 else 'are'} {count} in this image, set against a {bg} background.",
    )
    return templates[int(rng.integers(len(templates)))]


def _object_sentence(obj: Obj, noun: str, rng: np.random.Generator) -> str:
    thing = f"{_pick(rng, _SIZE_WORDS[obj.size], 0.6)} {noun}"
    where = POSITION_PHRASES[obj.position]
    templates = (
        f"{capitalise(where)}, there is {with_article(thing)}.",
        f"{capitalise(with_article(thing))} is {where}.",
        f"{capitalise(where)} sits {with_article(thing)}.",
    )
    return templates[int(rng.integers(len(templates)))]


def _relation_sentence(a: Obj, b: Obj, nouns: dict[str, str], rng: np.random.Generator) -> str:
    verb = ("is", "appears", "lies")[int(rng.integers(3))]
    return f"The {nouns[a.name]} {verb} {relation(a, b)} the {nouns[b.name]}."


def _closing(n: int, rng: np.random.Generator) -> str:
    others = "other" if n > 1 else "further"
    templates = (
        f"There are no {others} objects in the scene.",
        "Nothing else appears in the image.",
        "Apart from this, the background is empty." if n == 1 else "Apart from these, the background is empty.",
    )
    return templates[int(rng.integers(len(templates)))]


def short_captions(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct one-sentence captions (like Flickr30K's five), each naming every object."""
    found: dict[str, None] = {}  # insertion-ordered set
    for _ in range(50 * n):
        found.setdefault(_short_caption(scene, rng))
        if len(found) == n:
            return list(found)
    raise ValueError(f"could not write {n} distinct captions for a scene of {scene.classes()}; ask for fewer")


def _short_caption(scene: Scene, rng: np.random.Generator) -> str:
    nouns = _nouns(scene, rng)
    objects = [scene.objects[int(i)] for i in rng.permutation(len(scene.objects))]
    sized, placed = rng.random() < 0.5, rng.random() < 0.3
    phrases = [_short_phrase(o, nouns[o.name], rng, sized, placed) for o in objects]
    listed = join_list(phrases)
    bg = background_word(scene)
    templates = [
        f"{listed} on a {bg} background.",
        f"{count_phrase(len(objects), 'shape')}: {listed}.",
        f"A simple drawing of {listed}.",
        f"An image showing {listed}.",
        f"{bg} background with {listed}.",
    ]
    if len(objects) > 1:  # a spatial relation between the first two, the rest listed
        rest = f", plus {join_list(phrases[2:])}" if len(objects) > 2 else ""
        templates.append(f"{phrases[0]} {relation(objects[0], objects[1])} {phrases[1]}{rest}.")
    return capitalise(templates[int(rng.integers(len(templates)))])


def _short_phrase(obj: Obj, noun: str, rng: np.random.Generator, sized: bool, placed: bool) -> str:
    thing = f"{_pick(rng, _SIZE_WORDS[obj.size], 0.6)} {noun}" if sized else noun
    where = f" {POSITION_PHRASES[obj.position]}" if placed else ""
    return f"{with_article(thing)}{where}"


# --- questions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultipleChoice:
    question: str
    options: tuple[str, ...]  # one per letter of LETTERS
    answer: str  # the correct option's letter
    category: str
    l2_category: str

    def text(self) -> str:
        """MMStar style: the question, then "Options: A: ..., B: ..., C: ..., D: ..."."""
        listed = ", ".join(f"{letter}: {option}" for letter, option in zip(LETTERS, self.options))
        return f"{self.question}\nOptions: {listed}"


def _options(correct: str, pool: list[str], answer_index: int, rng: np.random.Generator) -> tuple[str, ...]:
    picked = rng.choice(len(pool), size=len(LETTERS) - 1, replace=False)
    options = [pool[int(i)] for i in picked]
    options.insert(answer_index, correct)
    return tuple(options)


def count_choice(scene: Scene, rng: np.random.Generator, answer_index: int) -> MultipleChoice:
    n = len(scene.objects)
    pool = [str(k) for k in range(1, 7) if k != n]
    return MultipleChoice(
        "How many objects are in the image?",
        _options(str(n), pool, answer_index, rng),
        LETTERS[answer_index],
        "fine-grained perception",
        "object counting",
    )


def _attribute_choice(scene: Scene, rng: np.random.Generator, answer_index: int, attribute: str, values: list[str],
                      question: str, l2_category: str) -> MultipleChoice:
    """A question about one attribute of an object named by its shape, unique in the scene (see
    ``unique_shape_objects``); the wrong options are other values of that attribute."""
    candidates = unique_shape_objects(scene)
    obj = candidates[int(rng.integers(len(candidates)))]
    correct = getattr(obj, attribute)
    return MultipleChoice(
        question.format(shape=obj.shape),
        _options(correct, [v for v in values if v != correct], answer_index, rng),
        LETTERS[answer_index],
        "fine-grained perception",
        l2_category,
    )


def colour_choice(scene: Scene, rng: np.random.Generator, answer_index: int) -> MultipleChoice:
    return _attribute_choice(scene, rng, answer_index, "colour", list(COLOURS), "What colour is the {shape}?",
                             "attribute recognition")


def shape_choice(scene: Scene, rng: np.random.Generator, answer_index: int) -> MultipleChoice:
    present = sorted({o.shape for o in scene.objects}, key=SHAPES.index)
    correct = present[int(rng.integers(len(present)))]
    pool = [s for s in SHAPES if s not in present]  # at least three: a scene has at most three shapes
    return MultipleChoice(
        "Which of these shapes appears in the image?",
        _options(correct, pool, answer_index, rng),
        LETTERS[answer_index],
        "coarse perception",
        "object recognition",
    )


def position_choice(scene: Scene, rng: np.random.Generator, answer_index: int) -> MultipleChoice:
    return _attribute_choice(scene, rng, answer_index, "position", [p for row in _POSITION_WORDS for p in row],
                             "Where is the {shape}?", "spatial relation")
