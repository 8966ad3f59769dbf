"""Evaluation-set loaders: small files in each real benchmark's format, the synthetic sets, and bad input
that must fail naming the file, record and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cafe_core.config import SynthConfig
from cafe_core.data.synth import generate, vocabulary
from cafe_core.evaluate.caption import objects_mentioned
from cafe_core.evaluate.sets import (
    EvalSetError,
    load_caption_set,
    load_choice,
    load_mmeb,
    load_pope,
    load_retrieval,
    question_options,
)
from cafe_core.storage import Storage
from tests.conftest import png_bytes

PNG = png_bytes()
PNG2 = png_bytes(color=(10, 200, 10))


def write_parquet(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def write_jsonl(path: Path, records: list[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# --- synthetic sets, as `cafe data synth` writes them ------------------------------------------------


@pytest.fixture(scope="module")
def synth_eval(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(output=str(out), train_size=4, retrieval_images=3, pope_images=2, mmeb_rows_per_dataset=2,
                      mc_questions=3, caption_images=2)
    generate(cfg, Storage())
    return out / "eval"


def test_synth_sets_load(synth_eval, store):
    ret = load_retrieval(store, str(synth_eval / "retrieval"), "shapes")
    assert ret.image_ids == ["0", "1", "2"] and len(ret.captions) == 15
    assert ret.caption_image.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    # every caption names exactly its image's objects, as the built-in caption judge reads them
    objects = [json.loads(line)["objects"] for line in (synth_eval / "retrieval/objects.jsonl").read_text().splitlines()]
    vocab = {c["name"]: c["synonyms"] for c in vocabulary()["classes"]}
    assert all(objects_mentioned(c, vocab) == set(objects[i]) for c, i in zip(ret.captions, ret.caption_image))

    mmeb = load_mmeb(store, str(synth_eval / "mmeb"))
    listed = json.loads((synth_eval / "mmeb/datasets.json").read_text())["datasets"]
    assert [(d.name, d.meta_task, d.split) for d in mmeb] == [(e["name"], e["meta_task"], e["split"].upper()) for e in listed]
    assert all(len(d.rows) == 2 for d in mmeb)
    for d in mmeb:
        for row in d.rows:
            assert "<|image_1|>" not in row.qry_text and ("<image>" in row.qry_text) == (row.qry_image is not None)
            assert all(("<image>" in t) == (img is not None) for t, img in row.candidates)
    t2i = next(d for d in mmeb if d.name == "ShapesT2I")
    assert t2i.rows[0].qry_text.startswith("Find me an image that matches the given caption: ")

    pope = load_pope(store, str(synth_eval / "pope"))
    assert list(pope) == ["random", "popular", "adversarial"]
    assert all(len(qs) == 2 * 6 for qs in pope.values())  # 3 present + 3 absent objects per image
    assert {q.label for q in pope["random"]} == {"yes", "no"}
    assert pope["random"][0].image is pope["popular"][0].image  # one read per image

    cap = load_caption_set(store, str(synth_eval / "caption_hallucination"))
    assert len(cap.images) == 2 and len(cap.classes) == 36 and all(o <= set(cap.classes) for o in cap.objects)
    assert cap.vocabulary["red circle"][0] == "red circle" and "red discs" in cap.vocabulary["red circle"]

    mc = load_choice(store, str(synth_eval / "mmstar"), "mmstar")
    assert [q.index for q in mc] == ["0", "1", "2"] and all(q.options == "ABCD" and q.answer in "ABCD" for q in mc)


def test_max_items_keeps_a_prefix(synth_eval, store):
    full = load_retrieval(store, str(synth_eval / "retrieval"), "shapes")
    two = load_retrieval(store, str(synth_eval / "retrieval"), "shapes", max_items=2)
    assert two.image_ids == full.image_ids[:2] and two.captions == full.captions[:10]
    assert [len(d.rows) for d in load_mmeb(store, str(synth_eval / "mmeb"), max_items=1)] == [1] * 6
    pope = load_pope(store, str(synth_eval / "pope"), max_items=5)
    assert all(len(qs) == 5 for qs in pope.values())
    assert len(load_caption_set(store, str(synth_eval / "caption_hallucination"), max_items=1).images) == 1
    assert len(load_choice(store, str(synth_eval / "mmstar"), "mmstar", max_items=2)) == 2
    with pytest.raises(ValueError, match="max_items"):
        load_choice(store, str(synth_eval / "mmstar"), "mmstar", max_items=0)


# --- retrieval (HF nlphuji Flickr30K / MSCOCO test layout) -------------------------------------------

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FLICKR_SCHEMA = pa.schema([("image", IMAGE_STRUCT), ("caption", pa.list_(pa.string())),
                           ("sentids", pa.list_(pa.string())), ("split", pa.string()),
                           ("img_id", pa.string()), ("filename", pa.string())])


def flickr_row(i: int, n_captions: int = 5, image: dict | None = None) -> dict[str, Any]:
    return {"image": image or {"bytes": PNG, "path": f"{1000 + i}.jpg"},
            "caption": [f"caption {k} of image {i}" for k in range(n_captions)],
            "sentids": [str(10 * i + k) for k in range(n_captions)], "split": "test", "img_id": str(i),
            "filename": f"{1000 + i}.jpg"}


def test_retrieval_shards_varied_captions_and_image_paths(tmp_path, store):
    folder = tmp_path / "flickr"
    write_parquet(folder / "data/test-00000-of-00002.parquet", [flickr_row(0), flickr_row(1, 6)], FLICKR_SCHEMA)
    # the second shard keeps only a path: the image is read from the folder's images/
    (folder / "images").mkdir()
    (folder / "images/1002.jpg").write_bytes(PNG2)
    write_parquet(folder / "data/test-00001-of-00002.parquet",
                  [flickr_row(2, 5, {"bytes": None, "path": "1002.jpg"})], FLICKR_SCHEMA)
    got = load_retrieval(store, str(folder), "flickr30k")
    assert got.name == "flickr30k" and got.image_ids == ["0", "1", "2"]
    assert got.caption_image.tolist() == [0] * 5 + [1] * 6 + [2] * 5 and got.caption_image.dtype == np.int64
    assert got.images[2] == PNG2 and got.caption_ids[5] == "10"
    # max_items crosses shards in order
    assert load_retrieval(store, str(folder), "f", max_items=3).image_ids == ["0", "1", "2"]
    assert load_retrieval(store, str(folder), "f", max_items=1).image_ids == ["0"]


def test_retrieval_without_ids_uses_row_positions(tmp_path, store):
    rows = [{"image": {"bytes": PNG, "path": None}, "caption": ["a", "b"]}]
    write_parquet(tmp_path / "coco/test.parquet", rows)
    got = load_retrieval(store, str(tmp_path / "coco"), "coco")
    assert got.image_ids == ["test.parquet:0"] and got.caption_ids == ["test.parquet:0#0", "test.parquet:0#1"]


@pytest.mark.parametrize("row, match", [
    ({"image": {"bytes": PNG, "path": None}, "caption": [], "img_id": "7"}, r"row 0 \(image 7\): field 'caption'"),
    ({"image": {"bytes": PNG, "path": None}, "caption": ["ok", " "], "img_id": "7"}, r"field 'caption'"),
    ({"image": {"bytes": None, "path": "gone.jpg"}, "caption": ["ok"], "img_id": "7"}, r"field 'image.path'.*gone.jpg"),
    ({"image": {"bytes": b"<html>404</html>", "path": None}, "caption": ["ok"], "img_id": "7"}, r"field 'image': not a readable image"),
])
def test_retrieval_bad_rows(tmp_path, store, row, match):
    write_parquet(tmp_path / "r/test.parquet", [row])
    with pytest.raises(EvalSetError, match=match):
        load_retrieval(store, str(tmp_path / "r"), "r")


def test_retrieval_bad_files(tmp_path, store):
    write_parquet(tmp_path / "a/test.parquet", [{"image": {"bytes": PNG, "path": None}, "captions": ["x"]}])
    with pytest.raises(EvalSetError, match=r"test.parquet: missing column 'caption'"):
        load_retrieval(store, str(tmp_path / "a"), "a")
    with pytest.raises(EvalSetError, match="no .parquet files"):
        load_retrieval(store, str(tmp_path / "empty"), "e")
    write_parquet(tmp_path / "d/test.parquet", [flickr_row(0), flickr_row(0)], FLICKR_SCHEMA)
    with pytest.raises(EvalSetError, match=r"row 1 \(image 0\): field 'img_id': duplicate"):
        load_retrieval(store, str(tmp_path / "d"), "d")


# --- MMEB (TIGER-Lab/MMEB-eval layout) ---------------------------------------------------------------


def mmeb_row(query_image: str, candidates: list[str]) -> dict[str, Any]:
    return {"qry_inst": "<|image_1|> Represent the given image for classification",
            "qry_text": "<|image_1|> Represent the given image for classification",
            "qry_img_path": query_image, "tgt_inst": "", "tgt_text": candidates,
            "tgt_img_path": [""] * len(candidates)}


def write_real_mmeb(folder: Path) -> None:
    """Two real dataset names, images where MMEB-eval's images.zip unpacks (paths relative to images/)."""
    (folder / "images/ImageNet-1K/Test").mkdir(parents=True)
    (folder / "images/ImageNet-1K/Test/a.JPEG").write_bytes(PNG)
    (folder / "images/MSCOCO_t2i/Test").mkdir(parents=True)
    (folder / "images/MSCOCO_t2i/Test/b.jpg").write_bytes(PNG2)
    write_parquet(folder / "ImageNet-1K/test-00000-of-00001.parquet",
                  [mmeb_row("ImageNet-1K/Test/a.JPEG", ["dugong", "tench", "goldfish"])] * 3)
    write_parquet(folder / "MSCOCO_t2i/test-00000-of-00001.parquet", [{
        "qry_inst": "Find me an everyday image that matches the given caption",
        "qry_text": "Find me an everyday image that matches the given caption: A man on a horse.",
        "qry_img_path": "", "tgt_inst": "<|image_1|> Represent the given image.",
        "tgt_text": ["<|image_1|>\nRepresent the given image."] * 2,
        "tgt_img_path": ["MSCOCO_t2i/Test/b.jpg", "ImageNet-1K/Test/a.JPEG"]}])


def test_mmeb_real_layout_without_datasets_json(tmp_path, store):
    write_real_mmeb(tmp_path / "mmeb")
    got = load_mmeb(store, str(tmp_path / "mmeb"), max_items=2)
    assert [(d.name, d.meta_task, d.split, len(d.rows)) for d in got] == [
        ("ImageNet-1K", "Classification", "IND", 2), ("MSCOCO_t2i", "Retrieval", "IND", 1)]
    row = got[0].rows[0]
    assert row.qry_text == "<image> Represent the given image for classification" and row.qry_image == PNG
    assert row.candidates == [("dugong", None), ("tench", None), ("goldfish", None)]
    t2i = got[1].rows[0]
    assert t2i.qry_image is None and t2i.candidates[0] == ("<image>\nRepresent the given image.", PNG2)
    # Datasets are read one at a time (MMEB's 36 never sit in memory together): an image file they share is
    # read once per dataset, and within one dataset every row refers to the same bytes.
    assert t2i.candidates[1][1] == row.qry_image and t2i.candidates[1][1] is not row.qry_image


def test_mmeb_unknown_dataset_needs_datasets_json(tmp_path, store):
    folder = tmp_path / "mmeb"
    write_real_mmeb(folder)
    write_parquet(folder / "MyTask/test.parquet", [mmeb_row("ImageNet-1K/Test/a.JPEG", ["x", "y"])])
    with pytest.raises(EvalSetError, match=r"unknown MMEB dataset 'MyTask'.*datasets.json"):
        load_mmeb(store, str(folder))
    (folder / "datasets.json").write_text(json.dumps({"datasets": [{"name": "MyTask", "meta_task": "vqa", "split": "ood"},
                                                                  {"name": "ImageNet-1K"}]}))
    got = load_mmeb(store, str(folder))  # the listing is authoritative; known names need no meta-task
    assert [(d.name, d.meta_task, d.split) for d in got] == [("MyTask", "VQA", "OOD"), ("ImageNet-1K", "Classification", "IND")]
    (folder / "datasets.json").write_text(json.dumps({"datasets": [{"name": "MyTask", "meta_task": "Ranking", "split": "ood"}]}))
    with pytest.raises(EvalSetError, match=r"entry 0 \(MyTask\): field 'meta_task'"):
        load_mmeb(store, str(folder))


def test_mmeb_missing_image_names_dataset_row_and_field(tmp_path, store):
    folder = tmp_path / "mmeb"
    write_real_mmeb(folder)
    (folder / "images/MSCOCO_t2i/Test/b.jpg").unlink()
    with pytest.raises(EvalSetError, match=r"dataset MSCOCO_t2i\) row 0: field 'tgt_img_path\[0\]'.*b.jpg.*images.zip"):
        load_mmeb(store, str(folder))


def test_mmeb_bad_rows(tmp_path, store):
    row = mmeb_row("ImageNet-1K/Test/a.JPEG", ["x", "y"])
    write_real_mmeb(tmp_path / "m")
    write_parquet(tmp_path / "m/ImageNet-1K/test-00000-of-00001.parquet", [row, {**row, "tgt_img_path": [""]}])
    with pytest.raises(EvalSetError, match=r"row 1: field 'tgt_img_path': 1 paths for 2 candidate texts"):
        load_mmeb(store, str(tmp_path / "m"))
    write_parquet(tmp_path / "m/ImageNet-1K/test-00000-of-00001.parquet", [{k: v for k, v in row.items() if k != "tgt_text"}])
    with pytest.raises(EvalSetError, match=r"missing column 'tgt_text'"):
        load_mmeb(store, str(tmp_path / "m"))


# --- POPE --------------------------------------------------------------------------------------------


def write_pope(folder: Path, label: str = "no") -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "images/COCO_val2014_000000310196.jpg").write_bytes(PNG)
    for split in ("random", "popular", "adversarial"):
        write_jsonl(folder / f"coco_pope_{split}.json", [
            {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog in the image?", "label": label},
        ])


def test_pope_real_layout(tmp_path, store):
    write_pope(tmp_path / "pope", label="No")  # labels are read case-insensitively
    got = load_pope(store, str(tmp_path / "pope"))
    q = got["adversarial"][1]
    assert (q.question_id, q.image_name, q.question, q.label, q.image) == (
        2, "COCO_val2014_000000310196.jpg", "Is there a dog in the image?", "no", PNG)
    # images may live elsewhere (the COCO val2014 folder)
    (tmp_path / "pope/images").rename(tmp_path / "val2014")
    got = load_pope(store, str(tmp_path / "pope"), image_folder=str(tmp_path / "val2014"))
    assert got["random"][0].image == PNG


@pytest.mark.parametrize("record, match", [
    ({"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog?", "label": "maybe"},
     r"coco_pope_random.json line 2 \(question_id 2\): field 'label': 'maybe'"),
    ({"question_id": 2, "image": "missing.jpg", "text": "Is there a dog?", "label": "no"},
     r"line 2 \(question_id 2\): field 'image': image .*missing.jpg does not exist.*image_folder"),
    ({"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "label": "no"}, r"line 2 \(question_id 2\): field 'text'"),
])
def test_pope_bad_records(tmp_path, store, record, match):
    write_pope(tmp_path / "pope")
    lines = (tmp_path / "pope/coco_pope_random.json").read_text().splitlines()
    (tmp_path / "pope/coco_pope_random.json").write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    with pytest.raises(EvalSetError, match=match):
        load_pope(store, str(tmp_path / "pope"))


def test_pope_needs_every_split(tmp_path, store):
    write_pope(tmp_path / "pope")
    (tmp_path / "pope/coco_pope_popular.json").unlink()
    with pytest.raises(EvalSetError, match=r"exactly one <name>_pope_popular.json, found none"):
        load_pope(store, str(tmp_path / "pope"))
    write_pope(tmp_path / "p2")
    (tmp_path / "p2/coco_pope_random.json").write_text("{not json\n")
    with pytest.raises(EvalSetError, match=r"coco_pope_random.json line 1: not valid JSON"):
        load_pope(store, str(tmp_path / "p2"))


# --- caption hallucination ---------------------------------------------------------------------------


def write_caption_set(folder: Path, objects: list[str]) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "images/a.png").write_bytes(PNG)
    write_jsonl(folder / "annotations.jsonl", [{"image": "a.png", "objects": objects}])
    (folder / "vocabulary.json").write_text(json.dumps(
        {"classes": [{"name": "dog", "synonyms": ["puppy"]}, {"name": "traffic light", "synonyms": []}]}))


def test_caption_set(tmp_path, store):
    write_caption_set(tmp_path / "c", ["dog"])
    got = load_caption_set(store, str(tmp_path / "c"))
    assert got.image_names == ["a.png"] and got.objects == [frozenset({"dog"})] and got.images == [PNG]
    assert got.vocabulary == {"dog": ("dog", "puppy"), "traffic light": ("traffic light",)}
    # a plain {class: [synonyms]} vocabulary is accepted too
    (tmp_path / "c/vocabulary.json").write_text(json.dumps({"dog": ["hound"]}))
    assert load_caption_set(store, str(tmp_path / "c")).vocabulary == {"dog": ("dog", "hound")}


def test_caption_set_bad_input(tmp_path, store):
    write_caption_set(tmp_path / "c", ["cat"])
    with pytest.raises(EvalSetError, match=r"annotations.jsonl line 1 \(image a.png\): field 'objects': 'cat' is not a vocabulary class"):
        load_caption_set(store, str(tmp_path / "c"))
    write_caption_set(tmp_path / "d", ["dog"])
    (tmp_path / "d/images/a.png").unlink()
    with pytest.raises(EvalSetError, match=r"line 1 \(image a.png\): field 'image'"):
        load_caption_set(store, str(tmp_path / "d"))


# --- multiple choice (MMStar layout) -----------------------------------------------------------------


def mmstar_row(index: int, answer: str = "B") -> dict[str, Any]:
    return {"index": index, "question": "Which shape is red?\nOptions: A: circle, B: square, C: star, D: hexagon",
            "image": PNG, "answer": answer, "category": "coarse perception", "l2_category": "object recognition",
            "meta_info": None}


def test_choice(tmp_path, store):
    write_parquet(tmp_path / "mmstar/mmstar.parquet", [mmstar_row(0), mmstar_row(1, "d")])
    got = load_choice(store, str(tmp_path / "mmstar"), "mmstar")
    assert [(q.index, q.answer, q.category, q.options) for q in got] == [
        ("0", "B", "coarse perception", "ABCD"), ("1", "D", "coarse perception", "ABCD")]
    # the HF Image struct is accepted as well as plain bytes
    write_parquet(tmp_path / "hf/test.parquet", [{**mmstar_row(5), "image": {"bytes": PNG, "path": "5.jpg"}}])
    assert load_choice(store, str(tmp_path / "hf"), "hf")[0].image == PNG


def test_question_options():
    assert question_options("Q?\nOptions: A: x, B: y") == "AB"
    assert question_options("Q?\nA. x\nB. y\nC. z\nD. w\nE. v") == "ABCDE"
    assert question_options("no options listed") == "ABCD"


def test_choice_bad_input(tmp_path, store):
    write_parquet(tmp_path / "m/test.parquet", [mmstar_row(0), mmstar_row(7, "F")])
    with pytest.raises(EvalSetError, match=r"row 1 \(index 7\): field 'answer': 'F' is not one of the option letters"):
        load_choice(store, str(tmp_path / "m"), "mmstar")
    write_parquet(tmp_path / "n/test.parquet", [{k: v for k, v in mmstar_row(0).items() if k != "image"}])
    with pytest.raises(EvalSetError, match=r"missing column 'image'"):
        load_choice(store, str(tmp_path / "n"), "mmstar")


def test_sets_load_from_s3(s3_store, bucket):
    # The same loaders read s3:// prefixes: the synthetic sets written straight to the embedded S3 server.
    cfg = SynthConfig(output=f"{bucket}/synth", train_size=4, retrieval_images=3, pope_images=2,
                      mmeb_rows_per_dataset=2, mc_questions=3, caption_images=2)
    generate(cfg, s3_store)
    base = f"{bucket}/synth/eval"
    assert len(load_retrieval(s3_store, f"{base}/retrieval/", "shapes").captions) == 15
    assert [len(d.rows) for d in load_mmeb(s3_store, f"{base}/mmeb")] == [2] * 6
    assert len(load_pope(s3_store, f"{base}/pope", max_items=4)["adversarial"]) == 4
    assert len(load_caption_set(s3_store, f"{base}/caption_hallucination").images) == 2
    assert len(load_choice(s3_store, f"{base}/mmstar", "mmstar")) == 3
