"""`cafe validate`: great-expectations checks of a converted image-text dataset.

The converted pairs are streamed shard by shard into a slim per-row frame (no image bytes) and a one-row
dataset-level frame built from ``stats.json``; each configured check is one or more GX expectations on those
frames, run in an ephemeral context. Results, a human summary, GX Data Docs and the config are committed
next to the dataset. Failed checks never raise: ``ValidationReport.success`` is False when a hard check
failed, and soft failures are only recorded.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Set before great_expectations is imported: a pipeline stage must not report usage anywhere.
os.environ["GX_ANALYTICS_ENABLED"] = "False"

import great_expectations as gx  # noqa: E402
import great_expectations.expectations as gxe  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from great_expectations.core.expectation_validation_result import (  # noqa: E402
    ExpectationSuiteValidationResult,
    ExpectationValidationResult,
)
from great_expectations.data_context.types.base import (  # noqa: E402
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations.metadata_types import FailureSeverity  # noqa: E402
from PIL import Image  # noqa: E402
from pydantic import BaseModel, computed_field  # noqa: E402

from cafe_core.commit import OutputWriter, read_manifest  # noqa: E402
from cafe_core.config import CHECKS, Bounds, Severity, ValidateConfig  # noqa: E402
from cafe_core.storage import Storage, StorageError  # noqa: E402
from cafe_core.uris import join  # noqa: E402

STATS = "stats.json"
MAX_EXAMPLES = 10
_BATCH_ROWS = 256  # rows decoded at a time: bounds memory below one shard's image bytes
_READ_COLUMNS = ["id", "source", "caption", "image", "image_sha256", "width", "height"]
# Pair schema 2: an interleaved (MMEB-train) pair's sides, absent from older shards. Such a row has no image or
# caption: its caption_chars is its target text's, `decodes` covers each of its images, and it has no width,
# height (null: not checked) or stored digest.
_SIDE_COLUMNS = ["query_text", "query_image", "target_text", "target_image", "negative_image"]
_SLIM_DTYPES = {
    "id": object,
    "source": object,
    "caption_chars": "int64",
    "width": "int64",
    "height": "int64",
    "decodes": bool,
    "image_sha256_ok": bool,
}
_GX_SEVERITY = {"hard": FailureSeverity.CRITICAL, "soft": FailureSeverity.WARNING}
_DOCS_SITE = "cafe"
_ROW_RESULT_FORMAT = {
    "result_format": "SUMMARY",
    "partial_unexpected_count": MAX_EXAMPLES,
    "unexpected_index_column_names": ["id"],  # so failures name sample ids, not frame positions
}
_DATASET_RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES}


class UnusableInputError(StorageError):
    """The committed input lacks something validation needs (e.g. stats.json); no check could run."""


class CheckResult(BaseModel):
    """One configured check, aggregated over its expectations (keyed by column in observed/expected)."""

    check: str
    severity: Severity
    success: bool
    skipped: bool = False  # nothing configured to check (all bounds open, no source_mix)
    # Per expectation: GX's observed_value for aggregates, else a sample of the unexpected values.
    observed: dict[str, Any] = {}
    expected: dict[str, Any] = {}
    element_count: int | None = None
    # Unexpected values summed over the check's expectations (a row failing two of them counts twice).
    unexpected_count: int | None = None
    unexpected_examples: list[str] = []
    # Human phrases: the failing expectations when the check failed, every expectation when it passed.
    details: list[str] = []

    @computed_field  # type: ignore[prop-decorator]
    @property
    def status(self) -> str:
        if self.skipped:
            return "SKIP"
        if self.success:
            return "PASS"
        return "FAIL" if self.severity == "hard" else "WARN"

    def summary_line(self) -> str:
        line = f"{self.status} {self.check} [{self.severity}]: " + "; ".join(self.details)
        if self.unexpected_examples:
            line += "; e.g. ids " + ", ".join(self.unexpected_examples)
        return line


class ValidationReport(BaseModel):
    success: bool  # no hard check failed
    input: str
    output: str
    checks: list[CheckResult]
    hard_failures: int
    soft_failures: int

    def summary_text(self) -> str:
        verdict = "PASSED" if self.success else "FAILED"
        head = f"validation of {self.input}: {verdict} ({self.hard_failures} hard, {self.soft_failures} soft failures)"
        return "\n".join([head, *(c.summary_line() for c in self.checks)]) + "\n"


def validate_dataset(cfg: ValidateConfig, store: Storage, config_yaml: str) -> ValidationReport:
    """Check the converted dataset at cfg.input and commit the results under cfg.output."""
    manifest = read_manifest(store, cfg.input)
    names = manifest.names()
    if STATS not in names:
        raise UnusableInputError(
            f"{join(cfg.input, STATS)} is missing: the converted dataset's manifest does not list it; "
            "re-run the conversion"
        )
    rates = read_rates(store, join(cfg.input, STATS))
    shards = sorted(n for n in names if n.startswith("pairs/") and n.endswith(".parquet"))
    rows = scan_pairs(store, cfg.input, shards, _pixel_limit(cfg))
    dataset = dataset_frame(rows, rates, cfg)
    with tempfile.TemporaryDirectory(prefix="cafe-validate-") as tmp:
        docs_dir = Path(tmp)
        gx_results = _run_gx(
            {
                "pairs": (rows, row_expectations(cfg), _ROW_RESULT_FORMAT),
                "dataset": (dataset, dataset_expectations(cfg), _DATASET_RESULT_FORMAT),
            },
            docs_dir,
        )
        checks = collect_checks(cfg, [r for result in gx_results.values() for r in result.results])
        hard = sum(not c.success and c.severity == "hard" for c in checks)
        soft = sum(not c.success and c.severity == "soft" for c in checks)
        report = ValidationReport(
            success=hard == 0,
            input=cfg.input,
            output=cfg.output,
            checks=checks,
            hard_failures=hard,
            soft_failures=soft,
        )
        _write_outputs(store, report, gx_results, docs_dir, config_yaml)
    return report


# --- frames ------------------------------------------------------------------------------------------


def scan_pairs(store: Storage, prefix: str, shards: list[str], max_pixels: int | None) -> pd.DataFrame:
    """The slim per-row frame of every shard, read one shard (and one batch of images) at a time."""
    frames = []
    with _pixel_guard(max_pixels):
        for name in shards:
            uri = join(prefix, name)
            with store.local_copy(uri) as path, pq.ParquetFile(path) as shard:
                names = shard.schema_arrow.names
                missing = [c for c in _READ_COLUMNS if c not in names]
                if missing:
                    raise UnusableInputError(f"{uri} lacks the column(s) {', '.join(missing)}")
                columns = _READ_COLUMNS + [c for c in _SIDE_COLUMNS if c in names]
                for batch in shard.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
                    frames.append(slim_batch(batch))
    if not frames:
        return pd.DataFrame({col: pd.Series(dtype=dtype) for col, dtype in _SLIM_DTYPES.items()})
    return pd.concat(frames, ignore_index=True)


def slim_batch(batch: pa.RecordBatch) -> pd.DataFrame:
    images = batch.column("image").to_pylist()
    digests = batch.column("image_sha256").to_pylist()
    names = batch.schema.names
    sides = {c: batch.column(c).to_pylist() if c in names else [None] * batch.num_rows for c in _SIDE_COLUMNS}
    interleaved = [q is not None for q in sides["query_text"]]
    frame = batch.select(["id", "source", "width", "height"]).to_pandas()
    # A missing caption counts as 0 chars, so it fails a positive minimum instead of being skipped as null.
    texts = pc.if_else(pa.array(interleaved, pa.bool_()), pa.array(sides["target_text"], pa.string()),
                       batch.column("caption"))
    frame.insert(2, "caption_chars", pc.fill_null(pc.utf8_length(texts), 0).to_numpy())
    side_images = list(zip(sides["query_image"], sides["target_image"], sides["negative_image"]))
    frame["decodes"] = [
        all(image_decodes(d) for d in own if d is not None) if mmeb else image_decodes(data)
        for data, mmeb, own in zip(images, interleaved, side_images)
    ]
    frame["image_sha256_ok"] = [
        mmeb or (data is not None and hashlib.sha256(data).hexdigest() == digest)
        for data, digest, mmeb in zip(images, digests, interleaved)
    ]
    return frame


def image_decodes(data: bytes | None) -> bool:
    """Whether PIL opens and fully decodes the bytes, as the trainer will have to."""
    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # any decoder failure (truncation, bomb guard, unknown format) makes the sample unusable
        return False
    return True


def _pixel_limit(cfg: ValidateConfig) -> int | None:
    if cfg.image_width.max is None or cfg.image_height.max is None:
        return None
    return int(cfg.image_width.max * cfg.image_height.max)


@contextmanager
def _pixel_guard(max_pixels: int | None) -> Iterator[None]:
    """PIL refuses images over twice MAX_IMAGE_PIXELS; tie that to the configured size bounds so a
    decompression bomb can't exhaust memory. Images between one and two times the limit still decode (their
    size is image_size's concern), so PIL's warning for them is silenced. With open bounds PIL's default stays."""
    previous = Image.MAX_IMAGE_PIXELS
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def read_rates(store: Storage, uri: str) -> dict[str, float]:
    """reject_rate and duplicate_rate from the conversion's stats.json."""
    try:
        stats = store.read_json(uri)
    except ValueError as e:
        raise UnusableInputError(f"{uri} is not valid JSON: {e}") from None
    rates = {}
    for key in ("reject_rate", "duplicate_rate"):
        value = stats.get(key) if isinstance(stats, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UnusableInputError(f"{uri} has no numeric {key!r} (found {value!r})")
        rates[key] = float(value)
    return rates


def dataset_frame(rows: pd.DataFrame, rates: Mapping[str, float], cfg: ValidateConfig) -> pd.DataFrame:
    """One row of dataset-level measures: the rates from stats.json, the row count, each source's share."""
    total = len(rows)
    counts = rows["source"].value_counts()
    record: dict[str, float] = {**rates, "row_count": total}
    for name in cfg.source_mix:
        record[f"source_share__{name}"] = int(counts.get(name, 0)) / total if total else 0.0
    return pd.DataFrame([record])


# --- expectations ------------------------------------------------------------------------------------


def row_expectations(cfg: ValidateConfig) -> list[gxe.Expectation]:
    """Expectations on the slim per-row frame."""
    expectations: list[gxe.Expectation | None] = [
        gxe.ExpectColumnValuesToBeUnique(column="id", **_tag(cfg, "unique_ids", "have a duplicate id")),
        _values_between(cfg, "caption_length", "caption_chars", cfg.caption_chars),
        _values_between(cfg, "image_size", "width", cfg.image_width),
        _values_between(cfg, "image_size", "height", cfg.image_height),
        gxe.ExpectColumnValuesToBeInSet(
            column="decodes", value_set=[True], **_tag(cfg, "images_decode", "have image bytes that do not decode")
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="image_sha256_ok",
            value_set=[True],
            **_tag(cfg, "images_decode", "have image bytes that do not match image_sha256"),
        ),
    ]
    if cfg.source_mix:
        names = sorted(cfg.source_mix)
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(
                column="source",
                value_set=names,
                **_tag(cfg, "source_mix", "have a source outside {" + ", ".join(names) + "}"),
            )
        )
    return [e for e in expectations if e is not None]


def dataset_expectations(cfg: ValidateConfig) -> list[gxe.Expectation]:
    """Expectations on the one-row dataset frame. Its column max is the value itself, and GX reports it
    as observed_value, so ExpectColumnMaxToBeBetween serves every measure."""
    measures: list[tuple[str, str, Bounds, str]] = [
        ("duplicate_rate", "duplicate_rate", Bounds(max=cfg.max_duplicate_rate), "duplicate_rate"),
        ("reject_rate", "reject_rate", Bounds(max=cfg.max_reject_rate), "reject_rate"),
        ("row_count", "row_count", Bounds(min=cfg.min_rows), "row count"),
    ]
    measures += [
        ("source_mix", f"source_share__{name}", bounds, f"share of source {name!r}")
        for name, bounds in sorted(cfg.source_mix.items())
    ]
    return [
        gxe.ExpectColumnMaxToBeBetween(
            column=column, min_value=bounds.min, max_value=bounds.max, **_tag(cfg, check, what)
        )
        for check, column, bounds, what in measures
        if not _unbounded(bounds)
    ]


def _values_between(cfg: ValidateConfig, check: str, column: str, bounds: Bounds) -> gxe.Expectation | None:
    if _unbounded(bounds):
        return None
    what = f"have {column} {_outside(bounds)}"
    return gxe.ExpectColumnValuesToBeBetween(
        column=column, min_value=bounds.min, max_value=bounds.max, **_tag(cfg, check, what)
    )


def _tag(cfg: ValidateConfig, check: str, what: str) -> dict[str, Any]:
    """Severity and meta shared by every expectation; meta carries our check name (and the phrase the
    summary uses) through GX's results and into the Data Docs."""
    return {"severity": _GX_SEVERITY[cfg.severity_of(check)], "meta": {"check": check, "what": what}}


def _unbounded(bounds: Bounds) -> bool:
    return bounds.min is None and bounds.max is None


def _outside(bounds: Bounds) -> str:
    if bounds.max is None:
        return f"below {bounds.min:g}"
    if bounds.min is None:
        return f"above {bounds.max:g}"
    return f"outside [{bounds.min:g}, {bounds.max:g}]"


def _expected_range(kwargs: Mapping[str, Any]) -> str:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if high is None:
        return f">= {low:g}"
    if low is None:
        return f"<= {high:g}"
    return f"between {low:g} and {high:g}"


# --- running GX --------------------------------------------------------------------------------------


def _run_gx(
    suites: Mapping[str, tuple[pd.DataFrame, list[gxe.Expectation], dict[str, Any]]], docs_dir: Path
) -> dict[str, ExpectationSuiteValidationResult]:
    """Validate each frame against its suite in a fresh ephemeral context, then build Data Docs into
    docs_dir (the only site: the default ephemeral one would write to an unmanaged temp dir)."""
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            _DOCS_SITE: {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            }
        },
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    source = context.data_sources.add_pandas("converted")
    results = {}
    for name, (frame, expectations, result_format) in suites.items():
        batches = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batches, suite=suite))
        # run() keeps the result in the context's store, which the Data Docs build renders.
        results[name] = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
    context.build_data_docs(site_names=[_DOCS_SITE])
    return results


# --- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    """What one expectation found, read out of its GX result."""

    key: str
    success: bool
    observed: Any
    expected: dict[str, Any]
    element_count: int | None
    unexpected_count: int | None
    examples: list[str]
    detail: str


def collect_checks(cfg: ValidateConfig, results: list[ExpectationValidationResult]) -> list[CheckResult]:
    """Group expectation results by our check name, in CHECKS order; checks with no expectation are skipped."""
    by_check: dict[str, list[_Outcome]] = {check: [] for check in CHECKS}
    for result in results:
        by_check[result.expectation_config.meta["check"]].append(_outcome(result))
    return [_check_result(check, cfg.severity_of(check), outcomes) for check, outcomes in by_check.items()]


def _check_result(check: str, severity: Severity, outcomes: list[_Outcome]) -> CheckResult:
    if not outcomes:
        return CheckResult(check=check, severity=severity, success=True, skipped=True, details=["not configured"])
    outcomes = sorted(outcomes, key=lambda o: o.key)
    success = all(o.success for o in outcomes)
    counts = [o.unexpected_count for o in outcomes if o.unexpected_count is not None]
    elements = [o.element_count for o in outcomes if o.element_count is not None]
    examples = list(dict.fromkeys(x for o in outcomes for x in o.examples))[:MAX_EXAMPLES]
    return CheckResult(
        check=check,
        severity=severity,
        success=success,
        observed={o.key: o.observed for o in outcomes},
        expected={o.key: o.expected for o in outcomes},
        element_count=max(elements) if elements else None,
        unexpected_count=sum(counts) if counts else None,
        unexpected_examples=examples,
        details=[o.detail for o in outcomes if success or not o.success],
    )


def _outcome(result: ExpectationValidationResult) -> _Outcome:
    as_json = result.to_json_dict()  # JSON-native values (no numpy scalars) for the report
    config = as_json["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k not in ("batch_id", "column")}
    what = config["meta"]["what"]
    found = as_json.get("result") or {}
    errors = _error_messages(as_json.get("exception_info"))
    total, bad = found.get("element_count"), found.get("unexpected_count")
    if errors:
        observed, detail = None, f"{what}: could not be evaluated ({'; '.join(errors)})"
    elif "observed_value" in found:
        observed = found["observed_value"]
        detail = f"{what} is {_number(observed)} (expected {_expected_range(kwargs)})"
    else:
        observed = found.get("partial_unexpected_list", [])
        share = f" ({100 * bad / total:.3g}%)" if total else ""
        detail = f"{bad:,} of {total:,} rows{share} {what}"
    ids = [str(row["id"]) for row in found.get("partial_unexpected_index_list", []) if "id" in row]
    return _Outcome(
        key=config["kwargs"]["column"],
        success=bool(as_json["success"]),
        observed=observed,
        expected=kwargs,
        element_count=total,
        unexpected_count=bad,
        examples=ids,
        detail=detail,
    )


def _error_messages(info: Mapping[str, Any] | None) -> list[str]:
    """GX reports an expectation's exception either flat or keyed by the metric that raised it."""
    if not info:
        return []
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, Mapping)]
    return list(dict.fromkeys(str(e.get("exception_message")) for e in entries if e.get("raised_exception")))


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


# --- outputs -----------------------------------------------------------------------------------------


def _write_outputs(
    store: Storage,
    report: ValidationReport,
    gx_results: Mapping[str, ExpectationSuiteValidationResult],
    docs_dir: Path,
    config_yaml: str,
) -> None:
    out = OutputWriter(store, report.output, kind="validation")
    result = report.model_dump(mode="json")
    result["gx"] = {name: r.to_json_dict() for name, r in gx_results.items()}
    out.put_json("result.json", result)
    out.put_text("summary.txt", report.summary_text())
    for path in sorted(p for p in docs_dir.rglob("*") if p.is_file()):
        out.put_file(f"data_docs/{path.relative_to(docs_dir).as_posix()}", path)
    out.put_text("config.yaml", config_yaml)
    out.commit(meta={"success": report.success, "hard_failures": report.hard_failures, "soft_failures": report.soft_failures})
