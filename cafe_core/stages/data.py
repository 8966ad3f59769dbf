"""Data stages: the synthetic sets, conversion to pairs, validation of the pairs."""

from __future__ import annotations

from cafe_core.config import CafeConfig
from cafe_core.errors import StageFailed
from cafe_core.stages.base import Result, committed, stage
from cafe_core.storage import Storage


@stage("synth", lambda cfg: cfg.synth.output)
def synth(cfg: CafeConfig, store: Storage) -> Result:
    """Generate the synthetic shapes-world sets (training split and evaluation sets). Reused when already
    committed with the same configuration."""
    from cafe_core.data.synth import generate, is_current

    if is_current(cfg.synth, store):
        line = f"synth: {cfg.synth.output} is up to date (same config); reusing it"
    else:
        manifest = generate(cfg.synth, store)
        line = f"synth: wrote {len(manifest.entries)} objects to {cfg.synth.output}"
    return committed(store, "synth", cfg.synth.output, line)


@stage("convert", lambda cfg: cfg.require_data().output)
def convert(cfg: CafeConfig, store: Storage, progress: bool | None = False) -> Result:
    """Convert training data (LLaVA-OneVision parquet, LLaVA-NeXT JSON) into image-text pair shards. Every
    rejected record is kept with its reason; fails without committing when too much is rejected."""
    from cafe_core.data.convert import convert as run
    from cafe_core.data.convert import summary

    result = run(cfg.require_data(), store, cfg.to_yaml(), progress=progress)
    s = result.stats
    return committed(store, "convert", result.output, f"convert: {result.output}\n{summary(s)}",
                     input=s["input"], accepted=s["accepted"], rejected=s["rejected"], deduped=s["deduped"])


@stage("validate", lambda cfg: cfg.validate_.output)
def validate(cfg: CafeConfig, store: Storage) -> Result:
    """Check the converted pairs with great-expectations. A hard check that fails fails the stage."""
    from cafe_core.data.validate import validate_dataset

    report = validate_dataset(cfg.validate_, store, cfg.to_yaml())
    out = cfg.validate_.output
    if not report.success:
        print(report.summary_text(), flush=True)
        raise StageFailed(f"{report.hard_failures} hard check(s) failed; see {out}/summary.txt")
    result = committed(store, "validate", out, f"validate: {out}\n{report.summary_text()}", success=True)
    result.documents["summary.md"] = f"# Validation of {cfg.validate_.input}\n\n```\n{report.summary_text()}\n```\n"
    return result
