"""MMEB-train (VLM2Vec's layout) -> interleaved pairs: every row accepted or rejected with its reason and
counted, the converted sides as the model reads them, and interleaved training on the result.

The sample is written by the tests in the real layout: `<root>/<Subset>/original-00000-of-00001.parquet`
with the columns qry, qry_image_path, pos_text, pos_image_path, neg_text, neg_image_path (strings, "" = none)
and the images under `<root>/images/<Subset>/`, as the rows' paths name them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cafe_core.commit import OutputWriter, read_manifest
from cafe_core.config import DataConfig, SourceConfig, TrainConfig, ValidateConfig
from cafe_core.data import records as R
from cafe_core.data.convert import PAIR_SCHEMA, convert
from cafe_core.data.sources import SourceError
from cafe_core.storage import Storage
from cafe_core.train.data import PairShards
from cafe_core.train.preflight import check_pairs_fit
from tests.conftest import LOCAL_CONFIG, png_bytes

COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
SUBSET = "Sample"
SHARD = f"{SUBSET}/original-00000-of-00001.parquet"
CLS = "<|image_1|>\nRepresent the given image for classification"
T2I = "Find me an everyday image that matches the given caption: "
IMG = "<|image_1|>\nRepresent the given image."
COLOURS = {
    "red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250),
    "yellow": (230, 230, 10), "purple": (140, 20, 160), "cyan": (10, 220, 220), "black": (0, 0, 0),
    "orange": (250, 140, 0),
}


def path(name: str) -> str:
    return f"images/{SUBSET}/{name}.png"


def mmeb(qry="", qry_image="", pos="", pos_image="", neg="", neg_image="") -> dict:
    return dict(zip(COLUMNS, (qry, qry_image, pos, pos_image, neg, neg_image)))


GOOD = [
    mmeb(CLS, path("red"), "a red square"),  # image -> text
    mmeb(CLS, path("green"), "a green square"),
    mmeb(T2I + "a blue square", "", IMG, path("blue")),  # text -> image
    mmeb(T2I + "a white square", "", IMG, path("white")),
    mmeb("<|image_1|>\nRepresent the given image with the following question: What colour is it?", path("yellow"),
         "yellow"),  # image + text -> text
    mmeb(CLS, path("purple"), "a purple square", neg="a red square"),  # a hard negative (text)
    mmeb("Represent the given image", path("cyan"), "", path("black")),  # no placeholders: <image> put first
    mmeb("Find an image of an orange square", "", IMG, path("orange"), IMG, path("red")),  # an image negative
]
BAD = [
    (mmeb(CLS, path("missing"), "x"), R.IMAGE_FILE_MISSING, "qry_image_path"),
    (mmeb("", "", "a red square"), R.EMPTY_TEXT, "qry"),
    (mmeb(T2I + "a red square", "", IMG, ""), R.IMAGE_TOKEN_WITHOUT_IMAGE, "pos_text"),
    (mmeb(CLS, path("broken"), "x"), R.CORRUPT_IMAGE, "qry_image_path"),
    (mmeb(CLS, "../secret.png", "x"), R.IMAGE_PATH_OUTSIDE_FOLDER, "qry_image_path"),
    (mmeb("<|image_1|> then <|image_2|>", path("red"), "x"), R.MULTI_IMAGE, "qry"),
    (mmeb("<|im_end|>" + CLS, path("red"), "x"), R.CHAT_CONTROL_TOKEN, "qry"),
    (mmeb(CLS, path("green"), "green", neg=IMG), R.IMAGE_TOKEN_WITHOUT_IMAGE, "neg_text"),
]
DUPLICATE = GOOD[0]  # the same query, target and image bytes: deduped, not rejected


def write_table(file: Path, rows: list[dict], columns=COLUMNS) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(c, pa.string()) for c in columns])
    pq.write_table(pa.Table.from_pylist([{c: r[c] for c in columns} for r in rows], schema=schema), file)


def write_sample(root: Path, rows: list[dict] | None = None) -> Path:
    images = root / "images" / SUBSET
    images.mkdir(parents=True, exist_ok=True)
    for name, colour in COLOURS.items():
        (images / f"{name}.png").write_bytes(png_bytes(color=colour))
    (images / "broken.png").write_bytes(b"these bytes are no image")
    (root / "secret.png").write_bytes(png_bytes())
    write_table(root / "data" / SHARD, GOOD + [r for r, _, _ in BAD] + [DUPLICATE] if rows is None else rows)
    return root


def source(root: Path, **kw) -> dict:
    return {"name": "mmeb", "format": "mmeb_train", "uri": str(root / "data"), "image_folder": str(root), **kw}


def run(tmp_path: Path, sources: list[dict], **kw):
    cfg = DataConfig(sources=sources, output=str(tmp_path / "out"), workers=0, max_reject_rate=1.0, **kw)
    return convert(cfg, Storage(), "resolved: config\n", progress=False)


def converted(out: Path) -> list[dict]:
    names = read_manifest(Storage(), str(out)).names()
    return pa.concat_tables([pq.read_table(out / n) for n in names if n.startswith("pairs/")]).to_pylist()


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, Path]:
    """(sample root, converted output) of the whole sample, converted once."""
    tmp = tmp_path_factory.mktemp("mmeb")
    root = write_sample(tmp / "mmeb")
    run(tmp, [source(root)])
    return root, tmp / "out"


def test_every_row_is_accepted_or_rejected_with_its_reason(sample):
    root, out = sample
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["input"], stats["accepted"], stats["rejected"], stats["deduped"]) == (17, 8, 8, 1)
    assert stats["by_source"]["mmeb"]["input"] == 17 and stats[R.INTERLEAVED_ROWS] == 8 and stats[R.NEGATIVE_ROWS] == 2
    got = rejects(out)
    assert [(r["id"], r["reason"]) for r in got] == [(f"{SUBSET}/{8 + i}", why) for i, (_, why, _) in enumerate(BAD)]
    for i, (line, (_, _, field)) in enumerate(zip(got, BAD)):
        # the record (file and row), the field and the fix
        assert line["detail"].startswith(f"{SHARD} row {8 + i}: ") and field in line["detail"], line
        assert "fix: " in line["detail"], line
    assert all(reason in R.REJECT_REASONS for reason in stats["rejected_by_reason"])
    meta = read_manifest(Storage(), str(out)).meta
    assert (meta[R.INTERLEAVED_ROWS], meta[R.NEGATIVE_ROWS], meta[R.PAIR_SCHEMA]) == (8, 2, R.PAIR_SCHEMA_VERSION)


def test_converted_sides_are_what_the_model_reads(sample):
    root, out = sample
    rows = {r["id"]: r for r in converted(out)}
    assert list(rows) == [f"mmeb/{SUBSET}/{i}" for i in range(8)]
    image = lambda name: (root / path(name)).read_bytes()  # noqa: E731 - original bytes, never re-encoded
    side = lambda r, s: (r[f"{s}_text"], r[f"{s}_image"])  # noqa: E731
    i2t, t2i, it2t, neg_text, no_token, neg_image = (rows[f"mmeb/{SUBSET}/{i}"] for i in (0, 2, 4, 5, 6, 7))
    assert side(i2t, "query") == ("<image>\nRepresent the given image for classification", image("red"))
    assert side(i2t, "target") == ("a red square", None) and side(i2t, "negative") == (None, None)
    assert side(t2i, "query") == (T2I + "a blue square", None)
    assert side(t2i, "target") == ("<image>\nRepresent the given image.", image("blue"))
    assert side(it2t, "query")[0].endswith("What colour is it?") and side(it2t, "query")[1] == image("yellow")
    assert side(neg_text, "negative") == ("a red square", None)
    assert side(no_token, "query") == ("<image>\nRepresent the given image", image("cyan"))
    assert side(no_token, "target") == ("<image>\n", image("black"))
    assert side(neg_image, "negative") == ("<image>\nRepresent the given image.", image("red"))
    # image-caption columns are null on interleaved pairs; the schema is the converter's
    assert all(r[c] is None for r in rows.values() for c in ("image", "caption", "conversations", "image_sha256"))
    assert pq.read_schema(out / "pairs" / "part-00000.parquet").names == PAIR_SCHEMA.names


def test_validation_reads_interleaved_pairs(sample, tmp_path):
    from cafe_core.data.validate import validate_dataset

    _, out = sample
    cfg = ValidateConfig(input=str(out), output=str(tmp_path / "validate"), min_rows=1, max_reject_rate=1.0,
                         max_duplicate_rate=1.0)
    report = validate_dataset(cfg, Storage(), "resolved: config\n")
    assert report.success, report.summary_text()
    checks = {c.check: c for c in report.checks}
    assert checks["images_decode"].success and checks["caption_length"].success and checks["image_size"].success


def test_jsonl_tables_splits_and_subsets(tmp_path):
    root = write_sample(tmp_path / "mmeb", rows=GOOD[:2])
    data = root / "data"
    (data / "Texts").mkdir()
    lines = [json.dumps(mmeb("a query", "", "a target")), "", "{not json", json.dumps([1]),
             json.dumps({"qry": "q"}), json.dumps(mmeb(CLS, path("red"), 7))]
    (data / "Texts" / "original-00000-of-00001.jsonl").write_text("\n".join(lines) + "\n")
    (data / "Flat.jsonl").write_text(json.dumps(mmeb("flat query", "", "flat target")) + "\n")
    result = run(tmp_path, [source(root)])
    assert (result.stats["input"], result.stats["accepted"]) == (8, 4)
    got = {(r["id"], r["reason"]) for r in rejects(tmp_path / "out")}
    assert got == {("Texts/1", R.MALFORMED_RECORD), ("Texts/2", R.MALFORMED_RECORD),
                   ("Texts/3", R.MALFORMED_RECORD), ("Texts/4", R.MALFORMED_RECORD)}
    assert "line 3" in next(r["detail"] for r in rejects(tmp_path / "out") if r["id"] == "Texts/1")
    ids = ["mmeb/Flat/0", "mmeb/Sample/0", "mmeb/Sample/1", "mmeb/Texts/0"]  # subsets by name
    assert [r["id"] for r in converted(tmp_path / "out")] == ids
    # subsets: only those, in the order given
    run(tmp_path, [source(root, subsets=["Texts", "Flat"])])
    assert [r["id"] for r in converted(tmp_path / "out")] == ["mmeb/Texts/0", "mmeb/Flat/0"]
    with pytest.raises(SourceError, match=r"subset\(s\) \['Nope'\] not found"):
        run(tmp_path, [source(root, subsets=["Nope"])])
    # a subset folder with two of the hub's splits must be told which one
    write_table(data / SUBSET / "diverse_instruction-00000-of-00001.parquet", GOOD[2:4])
    with pytest.raises(SourceError, match="split"):
        run(tmp_path, [source(root, subsets=[SUBSET])])
    run(tmp_path, [source(root, subsets=[SUBSET], split="diverse_instruction")])
    assert [r["target_text"] for r in converted(tmp_path / "out")] == ["<image>\nRepresent the given image."] * 2


def test_one_file_and_its_default_image_root(tmp_path):
    """`uri` may name one table; the image root defaults to the dataset root above `<Subset>/`."""
    root = write_sample(tmp_path / "mmeb", rows=GOOD[:3])
    shutil.copytree(root / "images", root / "data" / "images")  # (a link out of the root would be refused)
    result = run(tmp_path, [{"name": "one", "format": "mmeb_train", "uri": str(root / "data" / SHARD)}])
    assert (result.stats["input"], result.stats["accepted"]) == (3, 3)


def test_unreadable_tables_are_reported_and_the_rest_read(tmp_path):
    root = write_sample(tmp_path / "mmeb", rows=GOOD[:2])
    write_table(root / "data" / "NoPositive" / "original-00000-of-00001.parquet", GOOD[:1], COLUMNS[:2])
    (root / "data" / "Garbage.parquet").write_bytes(b"not parquet")
    result = run(tmp_path, [source(root)])
    assert result.stats["accepted"] == 2
    unreadable = {Path(p["uri"]).name: p["error"] for p in result.stats["files"]["unreadable"]}
    assert set(unreadable) == {"Garbage.parquet", "original-00000-of-00001.parquet"}
    assert "missing column(s) ['pos_text', 'pos_image_path']" in unreadable["original-00000-of-00001.parquet"]


def test_source_config_fields_belong_to_their_format():
    with pytest.raises(ValueError, match="subsets is only used with format 'mmeb_train'"):
        SourceConfig(name="x", format="llava_next", uri="a.json", subsets=["A"])
    with pytest.raises(ValueError, match="image_folder"):
        SourceConfig(name="x", format="onevision_parquet", uri="d", image_folder="i")
    with pytest.raises(ValueError, match="extra"):
        SourceConfig(name="x", format="mmeb_train", uri="d", image_root="i")


# --- training on the converted pairs ----------------------------------------------------------------------


def test_preflight_needs_interleaved_mode_and_no_lm_loss():
    meta = {R.INTERLEAVED_ROWS: 8, R.PAIR_SCHEMA: 2}
    check_pairs_fit(TrainConfig(loss={"mode": "interleaved", "a_lm": 0}), meta)
    with pytest.raises(ValueError, match="train.loss.mode=interleaved"):
        check_pairs_fit(TrainConfig(loss={"a_lm": 0}), meta)
    with pytest.raises(ValueError, match="train.loss.a_lm=0"):
        check_pairs_fit(TrainConfig(loss={"mode": "interleaved"}), meta)
    with pytest.raises(ValueError, match="newer"):
        check_pairs_fit(TrainConfig(), {R.PAIR_SCHEMA: R.PAIR_SCHEMA_VERSION + 1})
    check_pairs_fit(TrainConfig(), {})  # a dataset from before pair schema 2


def test_version_1_shards_read_with_null_sides(tmp_path):
    """Shards written before the interleaved columns (pair schema 1, no pair_schema meta) still train."""
    old = pa.schema([f for f in PAIR_SCHEMA if not f.name.startswith(("query_", "target_", "negative_"))])
    shard = tmp_path / "part-00000.parquet"
    row = {"id": "s/1", "source": "s", "image": png_bytes(), "caption": "a red square",
           "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red square"}]}
    pq.write_table(pa.Table.from_pylist([row], schema=old), shard)
    out = OutputWriter(Storage(), str(tmp_path / "v1"), kind="pairs")
    out.put_file("pairs/part-00000.parquet", shard)
    out.commit(meta={R.SHARD_ROWS: {"pairs/part-00000.parquet": 1}, R.SOURCE_RUNS: [["s", 1]]})
    shards = PairShards(Storage(), str(tmp_path / "v1"), tmp_path / "cache")
    (got,) = shards.rows([0])
    assert got["caption"] == "a red square" and got["query_text"] is None and got["negative_image"] is None
    assert (shards.interleaved_rows, shards.negative_rows) == (0, 0)


def train_args(data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--config", LOCAL_CONFIG, f"root={output.parent}", "run_id=mmeb", f"train.data={data}",
        f"train.output={output}", "model.preset=tiny", "model.checkpoint=null", "train.nproc_per_node=1",
        "train.loss.mode=interleaved", "train.loss.a_lm=0", "train.global_batch_size=4", "train.max_steps=2",
        "train.heldout_size=2", "train.eval_every=2", "train.log_every=1", "train.checkpoint_every=100",
        "train.max_length=256", *extra,
    ]


@pytest.mark.slow
def test_interleaved_training_runs_on_converted_mmeb_pairs(sample, tmp_path, cafe_main, capsys):
    """Two steps on the 8 converted pairs (2 held out): query and target sides of every kind, hard negatives
    among the candidates; held-out query->target top-1 is scored. Gradient caching over 2 micro-steps gives
    the same step losses (negatives included), and the negatives count (without them the loss differs)."""
    _, out = sample

    def losses(name: str, *extra: str) -> list[float]:
        rc = cafe_main("train", *train_args(out, tmp_path / name, *extra))
        assert rc == 0, capsys.readouterr().err[-3000:]
        lines = (tmp_path / name / "final" / "metrics.jsonl").read_text().splitlines()
        metrics = [json.loads(line) for line in lines]
        assert [m["step"] for m in metrics] == [1, 2] and all("loss_lm" not in m for m in metrics)
        assert metrics[-1]["heldout/chance"] == pytest.approx(0.5) and 0 <= metrics[-1]["heldout/i2t_top1"] <= 1
        return [m["loss_con"] for m in metrics]

    plain = losses("plain")
    assert all(math.isfinite(x) and x > 0 for x in plain)
    assert losses("cached", "train.grad_accum=2") == pytest.approx(plain, rel=1e-4)
    assert abs(losses("no-negatives", "train.loss.hard_negatives=false")[0] - plain[0]) > 1e-4


def test_training_refuses_mmeb_pairs_in_pairs_mode(sample, tmp_path, cafe_main, capsys):
    _, out = sample
    rc = cafe_main("train", *train_args(out, tmp_path / "train", "train.loss.mode=pairs"))
    assert rc != 0 and "train.loss.mode=interleaved" in capsys.readouterr().err


def test_hard_negatives_ride_in_the_targets_group(sample):
    """The batch the trainer builds: queries, then targets and negatives in one row group (one LLM pass
    whatever the data), `negative_of` naming each negative's pair, each image once."""
    from cafe_core.config import ModelConfig, PromptConfig
    from cafe_core.model.build import build
    from cafe_core.model.inputs import InputBuilder, InterleavedPair, Side, interleaved_pair

    _, out = sample
    rows = converted(out)
    _, processor = build(ModelConfig())
    builder = InputBuilder(processor, PromptConfig(), 256)
    pairs = [interleaved_pair(r, PromptConfig().pair_query) for r in rows]
    batch = builder.interleaved_pairs_batch(pairs, negatives=True)
    images = sum(s is not None and s.image is not None for p in pairs for s in (p.query, p.target, p.negative))
    assert batch.negative_of == [5, 7] and len(batch.image_rows_for) == images == 10
    assert [(a, b) for a, b, _ in batch.groups] == [(0, 8), (8, 18)]
    assert {k: len(v[0]) for k, v in batch.pool.items()} == {"a": 8, "b": 8, "n": 2}
    plain = builder.interleaved_pairs_batch(pairs)
    assert plain.negative_of is None and len(plain.image_rows_for) == 9
    text_only = builder.interleaved_pairs_batch([InterleavedPair(Side("a query"), Side("a target"))])
    assert text_only.pixel_values is not None and text_only.image_rows_for == []  # a blank image keeps the tower in
