"""The shapes-world generator: determinism, layouts, and that every label is true of its image."""

from __future__ import annotations

import io
import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from cafe_core.commit import Manifest, read_manifest, verify_output
from cafe_core.config import SynthConfig
from cafe_core.data import shapes as W
from cafe_core.data.synth import BAD_KINDS, MMEB_DATASETS, generate, is_current, vocabulary
from cafe_core.storage import Storage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# POPE's question; in the training conversations followed by the short-answer instruction
PRESENCE = re.compile(r"^Is there an? (.+) in the image\?(\nAnswer the question using a single word or phrase\.)?$")
MC = re.compile(r"^(?P<q>.*)\nOptions: A: (?P<A>.*), B: (?P<B>.*), C: (?P<C>.*), D: (?P<D>.*)$")
VOCAB = vocabulary()


def small_config(output: Path, **changes: Any) -> SynthConfig:
    sizes = dict(
        train_size=160,
        train_shard_rows=50,
        bad_fraction=0.1,
        retrieval_images=12,
        pope_images=20,
        mmeb_rows_per_dataset=6,
        mc_questions=40,
        caption_images=10,
    )
    return SynthConfig(output=str(output), **{**sizes, **changes})


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[SynthConfig, Manifest]:
    cfg = small_config(tmp_path_factory.mktemp("synth") / "shapes")
    return cfg, generate(cfg, Storage())


@pytest.fixture(scope="module")
def root(built) -> Path:
    return Path(built[0].output)


def digests(manifest: Manifest) -> dict[str, str]:
    return {e.name: e.sha256 for e in manifest.entries}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def mentioned(text: str) -> set[str]:
    """Classes a text names, by the vocabulary's synonym phrases (as a CHAIR-style scorer would)."""
    lowered = text.lower()
    return {
        c["name"]
        for c in VOCAB["classes"]
        if any(re.search(rf"\b{re.escape(s)}\b", lowered) for s in c["synonyms"])
    }


def asked_class(text: str) -> str:
    match = PRESENCE.match(text)
    assert match, text
    return match.group(1)


def options_of(question: str) -> tuple[str, dict[str, str]]:
    match = MC.match(question)
    assert match, question
    return match.group("q"), {letter: match.group(letter) for letter in W.LETTERS}


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def colour_pixels(image: Image.Image, colour: str) -> int:
    return int(np.all(np.asarray(image.convert("RGB")) == W.COLOUR_RGB[colour], axis=-1).sum())


def train_rows(root: Path) -> list[dict[str, Any]]:
    return [r for p in sorted((root / "train/shapes").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


def is_balanced(counts: Counter, keys: str | tuple[str, ...], total: int, slack: float) -> bool:
    return all(abs(counts[k] - total / len(keys)) <= slack * total for k in keys)


# --- determinism and streams -------------------------------------------------------------------------


def test_same_config_gives_byte_identical_files(built, tmp_path):
    cfg, first = built
    again = generate(cfg, Storage())  # same config, same output: rewritten in place
    assert digests(again) == digests(first)
    verify_output(Storage(), cfg.output)
    # The output location is only recorded in config.yaml; the data does not depend on it.
    elsewhere = generate(cfg.model_copy(update={"output": str(tmp_path / "other")}), Storage())
    differing = {n for n in digests(first) if digests(first)[n] != digests(elsewhere).get(n)}
    assert differing == {"config.yaml"}


def test_another_seed_gives_other_data(built, tmp_path):
    cfg, first = built
    other = generate(cfg.model_copy(update={"output": str(tmp_path / "s1"), "seed": 1}), Storage())
    for name in ("train/shapes/train-00000-of-00004.parquet", "eval/pope/shapes_pope_random.json",
                 "eval/mmstar/test.parquet", "eval/retrieval/test-00000-of-00001.parquet"):
        assert digests(other)[name] != digests(first)[name], name


def test_eval_sizes_and_bad_fraction_leave_clean_training_rows_unchanged(built, tmp_path):
    cfg, first = built
    changed = cfg.model_copy(update={
        "output": str(tmp_path / "resized"), "pope_images": 7, "retrieval_images": 5, "mc_questions": 9,
        "mmeb_rows_per_dataset": 3, "caption_images": 4, "bad_fraction": 0.0,
    })
    manifest = generate(changed, Storage())
    assert manifest.meta["bad_rows"] == dict.fromkeys(BAD_KINDS, 0)
    assert manifest.meta["counts"]["bad_rows"] == 0
    before, after = train_rows(Path(cfg.output)), train_rows(Path(changed.output))
    assert len(after) == len(before) == cfg.train_size
    unchanged = sum(a == b for a, b in zip(before, after))
    assert unchanged == cfg.train_size - first.meta["counts"]["bad_rows"]


def test_is_current_tracks_config_and_files(built, tmp_path):
    cfg, _ = built
    store = Storage()
    assert is_current(cfg, store)
    assert not is_current(cfg.model_copy(update={"seed": 5}), store)
    assert not is_current(cfg.model_copy(update={"output": str(tmp_path / "never")}), store)
    tiny = small_config(tmp_path / "tiny", train_size=4, retrieval_images=2, pope_images=2, mc_questions=2,
                        caption_images=2, mmeb_rows_per_dataset=2)
    generate(tiny, store)
    assert is_current(tiny, store)
    (Path(tiny.output) / "eval/mmstar/test.parquet").unlink()
    assert not is_current(tiny, store)


def test_negative_seed_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="seed"):
        small_config(tmp_path / "x", seed=-1)


# --- training split ----------------------------------------------------------------------------------


def test_train_shards_have_the_onevision_layout(built, root):
    cfg, manifest = built
    names = sorted(n for n in manifest.names() if n.startswith("train/"))
    assert names == [f"train/shapes/train-{i:05d}-of-00004.parquet" for i in range(4)]
    expected = pa.schema([
        ("id", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("data_source", pa.string()),
    ])
    rows_per_shard = []
    for name in names:
        table = pq.read_table(root / name)
        assert table.schema.equals(expected), table.schema
        rows_per_shard.append(table.num_rows)
    assert rows_per_shard == [50, 50, 50, 10]
    rows = train_rows(root)
    assert all(r["data_source"] == "shapes" and re.fullmatch(r"shapes-\d{6}", r["id"]) for r in rows)
    assert all(r["image"] is None or r["image"]["path"] == f"{r['id']}.png" for r in rows)


def classify(row: dict[str, Any], previous: dict[str, Any] | None) -> str | None:
    """The bad kind a row shows, found from its content alone (None: a clean row)."""
    image, turns = row["image"], row["conversations"]
    if image is None:
        return "missing_image"
    if image["bytes"] == b"":
        return "empty_image"
    try:
        decode(image["bytes"])
    except Exception:  # noqa: BLE001 - any decoding failure proves the image bad
        return "truncated_image" if image["bytes"].startswith(PNG_SIGNATURE) else "corrupt_image"
    gpt = [t["value"] for t in turns if t["from"] == "gpt"]
    if not gpt:
        return "no_gpt_turn"
    if not gpt[-1].strip():  # the description, the caption (data.caption_rule: last)
        return "empty_caption"
    if previous and row["id"] == previous["id"]:
        return "duplicate_id"
    if previous and previous["image"] and image["bytes"] == previous["image"]["bytes"]:
        assert turns == previous["conversations"]
        return "duplicate_content"
    return None


def test_bad_rows_are_really_bad_and_counted(built, root):
    cfg, manifest = built
    rows = train_rows(root)
    found = Counter(kind for prev, row in zip([None, *rows], rows) if (kind := classify(row, prev)))
    assert sum(found.values()) == round(cfg.bad_fraction * cfg.train_size) == manifest.meta["counts"]["bad_rows"]
    assert dict(found) == {k: v for k, v in manifest.meta["bad_rows"].items() if v}
    assert set(found) == set(BAD_KINDS)  # 16 bad rows cycle through all 8 kinds twice
    ids = Counter(r["id"] for r in rows)
    assert sum(n - 1 for n in ids.values()) == found["duplicate_id"]


def test_clean_rows_ask_true_and_balanced_questions(built, root):
    cfg, _ = built
    rows = [r for prev, r in zip([None, *train_rows(root)], train_rows(root)) if classify(r, prev) is None]
    yes_no, letters = Counter(), Counter()
    for row in rows:
        turns = row["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 3
        assert decode(row["image"]["bytes"]).size == (cfg.image_size, cfg.image_size)
        # The questions come first, answered from the image alone; the description, the caption, last.
        assert turns[0]["value"].endswith("\nAnswer the question using a single word or phrase.")  # as POPE asks
        assert turns[4]["value"] == "Describe the image in detail."
        present = mentioned(turns[5]["value"])  # the caption names every object (tested below)
        asked = asked_class(turns[0]["value"].removeprefix("<image>\n"))
        assert turns[1]["value"] == ("Yes" if asked in present else "No")
        yes_no[turns[1]["value"]] += 1
        question, options = options_of(turns[2]["value"].removesuffix(
            "\nAnswer with the option's letter from the given choices directly."))
        answer = options[turns[3]["value"]]
        letters[turns[3]["value"]] += 1
        assert len(set(options.values())) == 4
        if question == "How many objects are in the image?":
            assert answer == str(len(present))
        else:
            shape = re.fullmatch(r"What colour is the (\w+)\?", question).group(1)
            assert [c for c in present if c.endswith(f" {shape}")] == [f"{answer} {shape}"]
    assert is_balanced(yes_no, ("Yes", "No"), len(rows), 0.05)
    assert is_balanced(letters, W.LETTERS, len(rows), 0.05)


# --- world model and captions ------------------------------------------------------------------------


def test_scenes_have_distinct_classes_apart_in_separate_cells():
    rng = np.random.default_rng(3)
    for _ in range(300):
        scene = W.sample_scene(rng)
        assert 1 <= len(scene.objects) <= 3
        assert len(set(scene.classes())) == len(scene.objects)
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        assert all(o.radius <= o.x <= 1 - o.radius and o.radius <= o.y <= 1 - o.radius for o in scene.objects)
    assert all(len(W.sample_scene(rng, 3).objects) == 3 for _ in range(20))


def test_world_prior_is_skewed_and_themes_make_colours_co_occur():
    rng = np.random.default_rng(0)
    scenes = [W.sample_scene(rng) for _ in range(3000)]
    freq = Counter(c for s in scenes for c in s.classes())
    ranked = [n for _, n in freq.most_common()]
    assert ranked[0] > 5 * ranked[len(ranked) // 2]
    warm = set(W.THEMES["warm"])
    pairs = Counter()
    for s in scenes:
        for a, b in itertools.combinations(s.objects, 2):
            pairs["same" if (a.colour in warm) == (b.colour in warm) else "mixed"] += 1
    assert pairs["same"] > 2 * pairs["mixed"]


def test_detailed_captions_describe_every_object_and_nothing_else():
    rng = np.random.default_rng(1)
    used_nouns = set()
    for _ in range(300):
        scene = W.sample_scene(rng)
        caption = W.detailed_caption(scene, rng)
        assert mentioned(caption) == set(scene.classes()), caption
        assert caption.count(".") >= 3
        n = len(scene.objects)
        assert re.search(r"\ba single (shape|object)\b" if n == 1 else rf"\b{W.NUMBER_WORDS[n]} (shapes|objects)\b",
                         caption), caption
        assert all(W.POSITION_PHRASES[o.position] in caption.lower() for o in scene.objects), caption
        if n > 1:
            assert re.search(r"to the (left|right) of|above|below", caption), caption
        used_nouns |= set(re.findall(r"\b(disc|disk|box|rhombus)\b", caption))
    assert used_nouns == {"disc", "disk", "box", "rhombus"}  # synonyms do occur


def test_short_captions_are_distinct_and_complete():
    rng = np.random.default_rng(2)
    for _ in range(100):
        scene = W.sample_scene(rng)
        captions = W.short_captions(scene, rng, 5)
        assert len(set(captions)) == 5
        assert all(mentioned(c) == set(scene.classes()) for c in captions), captions


def test_presence_question_uses_the_right_article():
    assert W.presence_question("orange star") == "Is there an orange star in the image?"
    assert W.presence_question("red circle") == "Is there a red circle in the image?"


# --- evaluation sets ---------------------------------------------------------------------------------


def test_retrieval_set_has_distinct_true_captions(built, root):
    cfg, _ = built
    table = pq.read_table(root / "eval/retrieval/test-00000-of-00001.parquet")
    assert table.column_names == ["image", "caption", "sentids", "img_id", "filename"]
    rows = table.to_pylist()
    objects = {o["img_id"]: o["objects"] for o in read_jsonl(root / "eval/retrieval/objects.jsonl")}
    assert len(rows) == len(objects) == cfg.retrieval_images
    sentids = [s for r in rows for s in r["sentids"]]
    assert len(set(sentids)) == len(sentids) == 5 * len(rows)
    assert len({frozenset(o) for o in objects.values()}) == len(rows)
    for row in rows:
        assert len(set(row["caption"])) == 5
        assert all(mentioned(c) == set(objects[row["img_id"]]) for c in row["caption"])
        assert row["image"]["path"] == row["filename"]
        decode(row["image"]["bytes"])


def pope_questions(root: Path, strategy: str) -> list[dict[str, Any]]:
    return read_jsonl(root / f"eval/pope/shapes_pope_{strategy}.json")


def negatives_by_image(questions: list[dict[str, Any]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for q in questions:
        if q["label"] == "no":
            found.setdefault(q["image"], []).append(asked_class(q["text"]))
    return found


def test_pope_questions_follow_the_format_and_are_true(built, root):
    cfg, manifest = built
    objects = {a["image"]: a["objects"] for a in read_jsonl(root / "eval/pope/annotations.jsonl")}
    assert len(objects) == cfg.pope_images and all(len(o) == 3 for o in objects.values())
    assert all(f"eval/pope/images/{name}" in manifest.names() for name in objects)
    q = cfg.pope_questions_per_image
    yes_by_split = []
    for strategy in ("random", "popular", "adversarial"):
        questions = pope_questions(root, strategy)
        assert manifest.meta["counts"]["pope_questions"][strategy] == len(questions) == 2 * q * cfg.pope_images
        assert [x["question_id"] for x in questions] == list(range(1, len(questions) + 1))
        for image, group in itertools.groupby(questions, key=lambda x: x["image"]):
            group = list(group)
            assert [x["label"] for x in group] == ["yes", "no"] * q
            for x in group:
                assert (asked_class(x["text"]) in objects[image]) == (x["label"] == "yes")
        yes_by_split.append([x["text"] for x in questions if x["label"] == "yes"])
    assert yes_by_split[0] == yes_by_split[1] == yes_by_split[2]


def test_pope_popular_and_adversarial_negatives_follow_the_rules(built, root):
    cfg, _ = built
    objects = {a["image"]: a["objects"] for a in read_jsonl(root / "eval/pope/annotations.jsonl")}
    freq = Counter(c for objs in objects.values() for c in objs)
    cooc = Counter((a, b) for objs in objects.values() for a, b in itertools.permutations(objs, 2))
    q = cfg.pope_questions_per_image
    popular = negatives_by_image(pope_questions(root, "popular"))
    adversarial = negatives_by_image(pope_questions(root, "adversarial"))
    random = negatives_by_image(pope_questions(root, "random"))
    for image, objs in objects.items():
        absent = [c for c in W.CLASSES if c not in objs]
        by_freq = sorted(absent, key=lambda c: (-freq[c], W.CLASSES.index(c)))
        by_cooc = sorted(absent, key=lambda c: (-sum(cooc[o, c] for o in objs), W.CLASSES.index(c)))
        assert popular[image] == by_freq[:q]
        assert adversarial[image] == by_cooc[:q]
        assert len(set(random[image])) == q and not set(random[image]) & set(objs)
    assert popular != adversarial and random != popular and random != adversarial


def mmeb_rows(root: Path, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return (pq.read_table(root / f"eval/mmeb/{name}/test.parquet").to_pylist(),
            read_jsonl(root / f"eval/mmeb/{name}/annotations.jsonl"))


def test_mmeb_layout(built, root):
    cfg, manifest = built
    listing = json.loads((root / "eval/mmeb/datasets.json").read_text())["datasets"]
    assert [(d["name"], d["meta_task"], d["split"]) for d in listing] == [
        ("ShapesClassification", "Classification", "ind"), ("ColourVQA", "VQA", "ind"),
        ("ShapesT2I", "Retrieval", "ind"), ("ShapesI2T", "Retrieval", "ood"),
        ("ShapesGrounding", "Grounding", "ood"), ("CountVQA", "VQA", "ood"),
    ]
    assert [d.name for d in MMEB_DATASETS] == [d["name"] for d in listing]
    columns = ["qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path"]
    for d in listing:
        rows, annotations = mmeb_rows(root, d["name"])
        assert manifest.meta["counts"]["mmeb_rows"][d["name"]] == len(rows) == len(annotations) == 6
        assert pq.read_table(root / f"eval/mmeb/{d['name']}/test.parquet").column_names == columns
        for row in rows:
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) >= 2
            assert len(set(zip(row["tgt_text"], row["tgt_img_path"]))) == len(row["tgt_text"])
            assert ("<|image_1|>" in row["qry_text"]) == (row["qry_img_path"] != "")
            for path in [row["qry_img_path"], *row["tgt_img_path"]]:
                assert path == "" or (re.fullmatch(rf"images/{d['name']}/\w+\.png", path)
                                      and f"eval/mmeb/{path}" in manifest.names())


def test_mmeb_text_candidates_put_the_true_answer_first(built, root):
    cfg, _ = built
    for row, ann in zip(*mmeb_rows(root, "ShapesClassification")):
        assert ann["objects"] == [row["tgt_text"][0]] and set(row["tgt_text"]) <= set(W.CLASSES)
        assert len(row["tgt_text"]) == cfg.mmeb_candidates
        query = decode((root / "eval/mmeb" / row["qry_img_path"]).read_bytes())
        shown = max(W.COLOURS, key=lambda c: colour_pixels(query, c))
        assert row["tgt_text"][0].startswith(f"{shown} ")
    for row, ann in zip(*mmeb_rows(root, "ColourVQA")):
        shape = re.search(r"What colour is the (\w+)\?$", row["qry_text"]).group(1)
        assert [c for c in ann["objects"] if c.endswith(f" {shape}")] == [f"{row['tgt_text'][0]} {shape}"]
        assert sorted(row["tgt_text"]) == sorted(W.COLOURS)  # only six colours exist
    for row, ann in zip(*mmeb_rows(root, "CountVQA")):
        assert row["tgt_text"][0] == W.NUMBER_WORDS[len(ann["objects"])]
        assert len(row["tgt_text"]) == cfg.mmeb_candidates and set(row["tgt_text"]) <= set(W.NUMBER_WORDS[1:])


def test_mmeb_retrieval_positive_is_the_only_match(built, root):
    for name in ("ShapesT2I", "ShapesI2T"):
        for row, ann in zip(*mmeb_rows(root, name)):
            mine = set(ann["objects"])
            assert set(ann["candidate_objects"][0]) == mine
            for other in ann["candidate_objects"][1:]:
                assert not (mine <= set(other) or set(other) <= mine)
            if name == "ShapesT2I":
                assert row["qry_img_path"] == "" and mentioned(row["qry_text"]) == mine
            else:
                assert [mentioned(t) for t in row["tgt_text"]] == [set(o) for o in ann["candidate_objects"]]


def test_mmeb_grounding_positive_crop_shows_the_target(built, root):
    for row, ann in zip(*mmeb_rows(root, "ShapesGrounding")):
        target = ann["target"]
        assert row["qry_text"].endswith(f"isolates the {target}.") and target in ann["objects"]
        assert ann["candidate_objects"][0] == [target]
        assert all(c != [target] for c in ann["candidate_objects"][1:])
        crop = decode((root / "eval/mmeb" / row["tgt_img_path"][0]).read_bytes()).convert("RGB")
        assert crop.width == crop.height and crop.width % 2 == 1
        centre = crop.getpixel((crop.width // 2, crop.height // 2))
        assert centre == W.COLOUR_RGB[target.split(" ")[0]]


def test_mmstar_questions_are_parseable_balanced_and_true(built, root):
    cfg, manifest = built
    table = pq.read_table(root / "eval/mmstar/test.parquet")
    assert table.schema.equals(pa.schema([
        ("index", pa.int64()), ("question", pa.string()), ("image", pa.binary()), ("answer", pa.string()),
        ("category", pa.string()), ("l2_category", pa.string()),
    ]))
    rows = table.to_pylist()
    assert [r["index"] for r in rows] == list(range(cfg.mc_questions))
    assert manifest.meta["counts"]["mc_questions"] == cfg.mc_questions
    letters = Counter(r["answer"] for r in rows)
    assert max(letters.values()) - min(letters.values()) <= 1 and set(letters) == set(W.LETTERS)
    kinds = Counter()
    for row in rows:
        question, options = options_of(row["question"])
        answer = options[row["answer"]]
        assert len(set(options.values())) == 4
        image = decode(row["image"])
        if question == "How many objects are in the image?":
            assert answer in "123" and row["l2_category"] == "object counting"
        elif question.startswith("What colour is the"):
            assert answer in W.COLOURS and colour_pixels(image, answer) > 0
        else:
            assert question == "Which of these shapes appears in the image?" and set(options.values()) <= set(W.SHAPES)
        kinds[question.split(" ")[0]] += 1
    assert len(kinds) == 3


def test_caption_hallucination_set_and_vocabulary(built, root):
    cfg, manifest = built
    vocab = json.loads((root / "eval/caption_hallucination/vocabulary.json").read_text())
    assert [c["name"] for c in vocab["classes"]] == list(W.CLASSES) and len(W.CLASSES) == 36
    assert vocab["colours"] == list(W.COLOURS)
    assert vocab["shape_synonyms"]["circle"] == ["circle", "circles", "disc", "discs", "disk", "disks", "round"]
    assert vocab["shape_synonyms"]["diamond"] == ["diamond", "diamonds", "rhombus"]
    for c in vocab["classes"]:
        assert c["name"] == f"{c['colour']} {c['shape']}" and c["name"] in c["synonyms"]
        assert c["synonyms"] == [f"{c['colour']} {w}" for w in vocab["shape_synonyms"][c["shape"]]]
    annotations = read_jsonl(root / "eval/caption_hallucination/annotations.jsonl")
    assert len(annotations) == cfg.caption_images == manifest.meta["counts"]["caption_images"]
    for a in annotations:
        assert 1 <= len(a["objects"]) <= 3 and set(a["objects"]) <= set(W.CLASSES)
        decode((root / "eval/caption_hallucination/images" / a["image"]).read_bytes())


def test_config_and_readme_are_written(built, root):
    cfg, manifest = built
    assert yaml.safe_load((root / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    assert "train/shapes" in (root / "README.md").read_text()
    assert read_manifest(Storage(), cfg.output).meta["seed"] == cfg.seed == manifest.meta["seed"]
