"""validate_dataset on small converted datasets built here: real PNG shards + stats.json, committed."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from great_expectations.core.expectation_validation_result import ExpectationValidationResult
from great_expectations.expectations.expectation_configuration import ExpectationConfiguration
from PIL import Image

from cafe_core.commit import OutputWriter, read_manifest
from cafe_core.config import Bounds, ValidateConfig
from cafe_core.data.convert import PAIR_SCHEMA
from cafe_core.data.validate import (
    CHECKS,
    CheckResult,
    UnusableInputError,
    ValidationReport,
    collect_checks,
    image_decodes,
    validate_dataset,
)
from cafe_core.storage import NotCommittedError, Storage

CONFIG_YAML = "validate:\n  min_rows: 1\n"


def png(width: int = 8, height: int = 6, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def pair(i: int, source: str = "shapes", **overrides: Any) -> dict[str, Any]:
    image = overrides.pop("image", None) or png(color=(i % 256, 40, 90))
    row = {
        "id": f"{source}/{i:05d}",  # as `cafe convert` stores it: "<source>/<id>"
        "source": source,
        "image": image,
        "image_sha256": hashlib.sha256(image).hexdigest(),
        "image_format": "PNG",
        "width": 8,
        "height": 6,
        "caption": f"a red square number {i}",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"a red square number {i}"},
        ],
    }
    row.update(overrides)
    return row


def clean_rows(n: int = 20) -> list[dict[str, Any]]:
    return [pair(i, source="shapes" if i % 4 else "photos") for i in range(n)]


def write_dataset(
    store: Storage,
    prefix: str,
    rows: list[dict[str, Any]],
    scratch: Path,
    shards: int = 2,
    stats: dict[str, Any] | None = None,
    with_stats: bool = True,
) -> str:
    """A committed converted dataset, as the conversion stage writes it."""
    out = OutputWriter(store, prefix, kind="pairs")
    per_shard = -(-len(rows) // shards)
    for k in range(shards):
        local = scratch / f"part-{k:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[k * per_shard : (k + 1) * per_shard], schema=PAIR_SCHEMA), local)
        out.put_file(f"pairs/part-{k:05d}.parquet", local)
    if with_stats:
        out.put_json(
            "stats.json",
            {
                "input": len(rows),
                "accepted": len(rows),
                "rejected": 0,
                "deduped": 0,
                "reject_rate": 0.0,
                "duplicate_rate": 0.0,
                "rejected_by_reason": {},
                "by_source": {},
                **(stats or {}),
            },
        )
    out.put_text("rejects.jsonl", "")
    out.put_text("config.yaml", "data: {}\n")
    out.commit()
    return prefix


def make_cfg(tmp_path: Path, **kwargs: Any) -> ValidateConfig:
    return ValidateConfig(input=str(tmp_path / "convert"), output=str(tmp_path / "validate"), **kwargs)


def run(tmp_path: Path, store: Storage, rows: list[dict[str, Any]], **kwargs: Any) -> ValidationReport:
    stats = kwargs.pop("stats", None)
    cfg = make_cfg(tmp_path, **kwargs)
    write_dataset(store, cfg.input, rows, tmp_path, stats=stats)
    return validate_dataset(cfg, store, CONFIG_YAML)


def check_by_name(checks: list[CheckResult], name: str) -> CheckResult:
    return next(c for c in checks if c.check == name)


def check(report: ValidationReport, name: str) -> CheckResult:
    return check_by_name(report.checks, name)


def failing(report: ValidationReport) -> set[str]:
    return {c.check for c in report.checks if not c.success}


def test_clean_dataset_passes_every_check(tmp_path: Path, store: Storage) -> None:
    mix = {"shapes": Bounds(min=0.7, max=0.8), "photos": Bounds(min=0.2, max=0.3)}
    report = run(tmp_path, store, clean_rows(), source_mix=mix, min_rows=20)

    assert report.success and report.hard_failures == 0 and report.soft_failures == 0
    assert [c.check for c in report.checks] == list(CHECKS)
    assert all(c.success and not c.skipped for c in report.checks)
    assert {c.check: c.severity for c in report.checks} == {n: "soft" if n == "source_mix" else "hard" for n in CHECKS}
    assert check(report, "row_count").observed == {"row_count": 20}
    assert check(report, "source_mix").observed["source_share__photos"] == pytest.approx(0.25)
    assert check(report, "unique_ids").element_count == 20


def test_duplicate_ids_fail_hard_and_name_the_id(tmp_path: Path, store: Storage) -> None:
    rows = clean_rows()
    rows[7]["id"] = rows[3]["id"]

    report = run(tmp_path, store, rows)

    result = check(report, "unique_ids")
    assert not report.success and report.hard_failures == 1
    assert failing(report) == {"unique_ids"}
    assert (result.severity, result.status, result.unexpected_count) == ("hard", "FAIL", 2)
    assert result.unexpected_examples == [rows[3]["id"]]


def test_caption_too_long_fails_caption_length(tmp_path: Path, store: Storage) -> None:
    rows = clean_rows()
    rows[5]["caption"] = "x" * 51

    report = run(tmp_path, store, rows, caption_chars=Bounds(min=1, max=50))

    result = check(report, "caption_length")
    assert failing(report) == {"caption_length"} and result.severity == "hard"
    assert result.unexpected_examples == [rows[5]["id"]]
    assert result.observed == {"caption_chars": [51]}
    assert "1 of 20 rows (5%) have caption_chars outside [1, 50]" in result.summary_line()


def test_undecodable_or_mismatched_images_fail_images_decode(tmp_path: Path, store: Storage) -> None:
    rows = clean_rows()
    rows[2] = pair(2, image=png()[:40])  # truncated PNG whose sha256 matches its (broken) bytes
    rows[9]["image_sha256"] = "0" * 64  # decodes, but not the bytes the conversion hashed

    report = run(tmp_path, store, rows)

    result = check(report, "images_decode")
    assert failing(report) == {"images_decode"} and not report.success
    assert result.observed == {"decodes": [False], "image_sha256_ok": [False]}
    assert set(result.unexpected_examples) == {rows[2]["id"], rows[9]["id"]}


def test_image_size_out_of_bounds(tmp_path: Path, store: Storage) -> None:
    rows = clean_rows()
    rows[4] = pair(4, image=png(64, 6), width=64)

    report = run(tmp_path, store, rows, image_width=Bounds(min=1, max=32))

    assert failing(report) == {"image_size"}
    assert check(report, "image_size").unexpected_examples == [rows[4]["id"]]


def test_reject_rate_over_limit_fails(tmp_path: Path, store: Storage) -> None:
    report = run(tmp_path, store, clean_rows(), stats={"reject_rate": 0.2}, max_reject_rate=0.1)

    result = check(report, "reject_rate")
    assert failing(report) == {"reject_rate"} and not report.success
    assert result.observed == {"reject_rate": 0.2} and result.expected == {"reject_rate": {"max_value": 0.1}}
    assert "reject_rate is 0.2 (expected <= 0.1)" in result.details


def test_source_mix_out_of_bounds_is_a_soft_failure(tmp_path: Path, store: Storage) -> None:
    mix = {"shapes": Bounds(min=0.9), "photos": Bounds(max=0.1)}
    rows = clean_rows() + [pair(99, source="web")]

    report = run(tmp_path, store, rows, source_mix=mix)

    result = check(report, "source_mix")
    assert report.success and report.hard_failures == 0 and report.soft_failures == 1
    assert (result.severity, result.status) == ("soft", "WARN")
    assert result.unexpected_examples == ["web/00099"]  # the source outside the configured set
    assert len(result.details) == 3  # shapes share, photos share, unknown source


def test_hard_check_configured_soft_only_warns(tmp_path: Path, store: Storage) -> None:
    rows = clean_rows()
    rows[1]["id"] = rows[0]["id"]

    report = run(tmp_path, store, rows, severity={"unique_ids": "soft"})

    result = check(report, "unique_ids")
    assert report.success and report.soft_failures == 1
    assert (result.success, result.severity, result.status) == (False, "soft", "WARN")


def test_row_count_below_minimum_and_empty_dataset(tmp_path: Path, store: Storage) -> None:
    report = run(tmp_path, store, [], min_rows=1)

    assert failing(report) == {"row_count"}
    assert check(report, "row_count").details == ["row count is 0 (expected >= 1)"]


def test_unbounded_checks_are_skipped(tmp_path: Path, store: Storage) -> None:
    report = run(tmp_path, store, clean_rows(), caption_chars=Bounds())

    assert report.success
    assert {c.check for c in report.checks if c.skipped} == {"caption_length", "source_mix"}


def test_uncommitted_input_raises(tmp_path: Path, store: Storage) -> None:
    cfg = make_cfg(tmp_path)
    (tmp_path / "convert" / "pairs").mkdir(parents=True)

    with pytest.raises(NotCommittedError):
        validate_dataset(cfg, store, CONFIG_YAML)
    assert not (tmp_path / "validate").exists()


def test_missing_stats_json_names_the_file(tmp_path: Path, store: Storage) -> None:
    cfg = make_cfg(tmp_path)
    write_dataset(store, cfg.input, clean_rows(4), tmp_path, with_stats=False)

    with pytest.raises(UnusableInputError, match=r"convert/stats\.json is missing"):
        validate_dataset(cfg, store, CONFIG_YAML)


def test_outputs_are_written_and_committed(tmp_path: Path, store: Storage) -> None:
    rows = clean_rows()
    rows[7]["id"] = rows[3]["id"]
    report = run(tmp_path, store, rows, severity={"reject_rate": "soft"})
    out = tmp_path / "validate"

    result = json.loads((out / "result.json").read_text())
    assert result["success"] is False and result["input"] == str(tmp_path / "convert")
    assert {c["check"]: c["status"] for c in result["checks"]}["unique_ids"] == "FAIL"
    gx_severity = {
        r["expectation_config"]["meta"]["check"]: r["expectation_config"]["severity"]
        for suite in result["gx"].values()
        for r in suite["results"]
    }
    assert gx_severity["unique_ids"] == "critical" and gx_severity["reject_rate"] == "warning"

    summary = (out / "summary.txt").read_text()
    assert summary == report.summary_text()
    assert f"FAIL unique_ids [hard]: 2 of 20 rows (10%) have a duplicate id; e.g. ids {rows[3]['id']}" in summary

    index = (out / "data_docs" / "index.html").read_text()
    assert "<html" in index.lower()
    assert list((out / "data_docs" / "validations").rglob("*.html"))
    assert (out / "config.yaml").read_text() == CONFIG_YAML

    manifest = read_manifest(store, str(out))
    assert manifest.kind == "validation"
    assert manifest.meta == {"success": False, "hard_failures": 1, "soft_failures": 0}
    assert {"result.json", "summary.txt", "config.yaml", "data_docs/index.html"} <= set(manifest.names())
    assert all((out / name).is_file() for name in manifest.names())


def test_images_past_the_pixel_guard_are_not_decoded(tmp_path: Path, store: Storage) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    # 8x6 = 48 pixels, more than twice the 4x4 the bounds allow: PIL must refuse to decode them.
    report = run(tmp_path, store, clean_rows(4), image_width=Bounds(max=4), image_height=Bounds(max=4))

    assert failing(report) == {"image_size", "images_decode"}
    assert check(report, "images_decode").unexpected_count == 4
    assert Image.MAX_IMAGE_PIXELS == limit
    assert image_decodes(png()) and not image_decodes(b"not an image") and not image_decodes(None)


@pytest.mark.s3
def test_dataset_and_results_on_s3(s3_store: Storage, bucket: str, tmp_path: Path) -> None:
    rows = clean_rows()
    rows[5]["caption"] = ""
    cfg = ValidateConfig(input=f"{bucket}/convert", output=f"{bucket}/validate")
    write_dataset(s3_store, cfg.input, rows, tmp_path)

    report = validate_dataset(cfg, s3_store, CONFIG_YAML)

    assert failing(report) == {"caption_length"} and report.output == f"{bucket}/validate"
    assert read_manifest(s3_store, cfg.output).meta["hard_failures"] == 1
    assert "<html" in s3_store.read_text(f"{bucket}/validate/data_docs/index.html").lower()


def test_expectation_that_raised_is_reported_as_failed(tmp_path: Path) -> None:
    config = ExpectationConfiguration(
        type="expect_column_values_to_be_between",
        kwargs={"column": "width", "min_value": 1},
        meta={"check": "image_size", "what": "have width below 1"},
    )
    raised = ExpectationValidationResult(
        success=False,
        expectation_config=config,
        result={},
        exception_info={"m1": {"raised_exception": True, "exception_message": "column is not numeric"}},
    )

    result = check_by_name(collect_checks(make_cfg(tmp_path), [raised]), "image_size")

    assert not result.success and result.status == "FAIL"
    assert result.details == ["have width below 1: could not be evaluated (column is not numeric)"]
