"""The pipeline's steps as plain functions: what each KFP component runs (components/ only wraps these).

A step takes the run's resolved configuration (YAML text, made once by `resolve_config` so every step
sees the same run id and settings), connects to S3, runs one stage of cafe_core and returns an `Outcome`:
the S3 URI of the committed output, the sha256 of its manifest, and a few figures. Components copy that
into their typed artifacts' metadata; the data itself stays in S3, under `{root}/runs/{run_id}/`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import yaml

from cafe_core.config import CafeConfig, ConfigError, load_config
from cafe_core.connect import connect
from cafe_core.storage import Storage, join, manifest_digest, read_manifest


class StepFailed(RuntimeError):
    """The stage ran and its result is a failure (the component fails with this message)."""


@dataclass
class Outcome:
    uri: str
    manifest_sha256: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        """For an artifact's metadata: where the data is and what pins it."""
        return {"uri": self.uri, "manifest_sha256": self.manifest_sha256, **self.meta}


# --- configuration -----------------------------------------------------------------------------------


def resolve_config(config: str, root: str, run_id: str, kfp_run_id: str, data_uri: str, model_preset: str,
                   model_checkpoint: str, a_lm: float, a_con: float, temperature: float, max_steps: int,
                   nodes: int, gpus_per_node: int, gate_rules: str, overrides: list[str],
                   lm_ratio: float = -1.0, train_data: str = "") -> str:
    """The run's configuration from the base file and the pipeline's parameters, as YAML text.
    Empty strings mean "the base file's value"; run_id "" means the KFP run's id. An ablation variant sets
    lm_ratio >= 0 (a_lm = lm_ratio * a_con, run id suffixed) and trains on `train_data`."""
    run_id = run_id or kfp_run_id
    if lm_ratio >= 0:  # an ablation variant: trains on the base run's pairs under its own run id
        a_lm = lm_ratio * a_con
        train_data = train_data or f"{root.rstrip('/')}/runs/{run_id}/convert"
        run_id = f"{run_id}-lm{lm_ratio:g}"
    args = [f"root={root}", f"run_id={run_id}", f"train.loss.a_lm={a_lm}",
            f"train.loss.a_con={a_con}", f"train.loss.temperature={temperature}", f"train.max_steps={max_steps}"]
    if data_uri:
        args += ["data.sources.0.uri=" + data_uri]
    if model_checkpoint:
        args += ["model.preset=null", f"model.checkpoint={model_checkpoint}"]
    elif model_preset:
        args += [f"model.preset={model_preset}"]
    if gpus_per_node > 0:  # one process per GPU, bf16; on CPU the base file's process count stays
        args += [f"train.nproc_per_node={gpus_per_node}", "train.precision=bf16"]
    if gate_rules:
        args += [f"gate.rules_from={gate_rules}"]
    if train_data:
        args += [f"train.data={train_data}"]
    cfg = load_config(config, [*args, *overrides])
    if nodes > 1 and cfg.train.global_batch_size % (nodes * max(gpus_per_node, 1) * cfg.train.grad_accum):
        raise ConfigError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by {nodes} nodes x "
                          f"{max(gpus_per_node, 1)} processes x grad_accum {cfg.train.grad_accum}")
    return cfg.to_yaml()


def config_of(run_config: str) -> CafeConfig:
    return CafeConfig.model_validate(yaml.safe_load(run_config))


@contextlib.contextmanager
def store_of(cfg: CafeConfig) -> Iterator[Storage]:
    with connect(cfg.s3, cfg.uris()) as store:
        yield store


def trained(store: Storage, final: str, **meta: Any) -> Outcome:
    """The outcome of a training: the final output with its steps and held-out accuracy."""
    manifest = read_manifest(store, final)
    return outcome(store, final, steps=manifest.meta.get("steps"), **meta,
                   **{k: v for k, v in manifest.meta.items() if k.startswith("heldout/")})


def outcome(store: Storage, uri: str, **meta: Any) -> Outcome:
    return Outcome(uri, manifest_digest(store, uri), {"files": len(read_manifest(store, uri).entries), **meta})


# --- stages shared with the command line -------------------------------------------------------------


def run_train(cfg: CafeConfig, store: Storage) -> str:
    """`cafe train`: torchrun with train.nproc_per_node local processes (or this process); the final output."""
    from cafe_core.train.checkpoint import CheckpointError
    from cafe_core.train.data import DataError
    from cafe_core.train.launch import in_torchrun, torchrun
    from cafe_core.train.trainer import preflight, run

    try:
        if cfg.train.nproc_per_node > 1 and not in_torchrun():
            preflight(cfg, store, world=cfg.train.nproc_per_node)  # fail here, not in every child
            print(f"train: {cfg.train.nproc_per_node} processes under torchrun", flush=True)
            if torchrun(cfg, store, ["train"]) != 0:
                raise StepFailed(f"train: a training process failed; checkpoints under {cfg.train.output}/checkpoints")
            return f"{cfg.train.output}/final"
        result = run(cfg, store)
    except (DataError, CheckpointError) as e:
        raise ConfigError(str(e)) from None
    if os.environ.get("RANK", "0") != "0":
        return result.output
    if result.heldout:
        print(f"train: held-out image->text top-1 {result.heldout['heldout/i2t_top1']:.3f} "
              f"(chance {result.heldout['heldout/chance']:.3f}) after {result.steps} steps")
    print(f"train: {result.output}")
    return result.output


def run_promote(cfg: CafeConfig, store: Storage) -> str:
    """`cafe promote` of promote.decision, re-embedding a sample from the promoted files; the champion's URI."""
    from cafe_core.evaluate.export import reembed_check
    from cafe_core.gate import read_decision
    from cafe_core.registry import RegistryError, promote

    uri = cfg.promote.decision

    def check_model(model_uri: str) -> None:
        decision = read_decision(store, uri)
        embeddings = store.read_json(join(decision.inputs.metrics, "metrics.json")).get("embeddings")
        if not embeddings:
            raise RegistryError(f"{decision.inputs.metrics}/metrics.json does not say which export it used")
        print(f"promote: {reembed_check(cfg, store, model_uri, embeddings)}")

    try:
        result = promote(cfg, store, uri, check_model=check_model)
    except RegistryError as e:
        raise StepFailed(f"promote: {e}") from None
    print(f"promote: {result.message}")
    return result.model_uri


# --- steps -------------------------------------------------------------------------------------------


def timed(step):
    """Record the step's own working time in its outcome (`seconds`): the pipeline's overhead is the
    rest of the wall time."""

    @functools.wraps(step)
    def run(*args, **kwargs):
        started = time.monotonic()
        result = step(*args, **kwargs)
        outcome = result[0] if isinstance(result, tuple) else result
        outcome.meta["seconds"] = round(time.monotonic() - started, 3)
        return result

    return run



@timed
def prepare_data(run_config: str) -> Outcome:
    """Generate the synthetic sets when the run uses them (reused when already committed with this config)."""
    from cafe_core.data.synth import generate, is_current

    cfg = config_of(run_config)
    with store_of(cfg) as store:
        if is_current(cfg.synth, store):
            print(f"synth: {cfg.synth.output} is up to date (same config); reusing it")
        else:
            manifest = generate(cfg.synth, store)
            print(f"synth: wrote {len(manifest.entries)} objects to {cfg.synth.output}")
        return outcome(store, cfg.synth.output)


@timed
def convert(run_config: str) -> Outcome:
    from cafe_core.data.convert import ConvertError, convert as run_convert

    cfg = config_of(run_config)
    with store_of(cfg) as store:
        try:
            result = run_convert(cfg.require_data(), store, cfg.to_yaml(), progress=False)
        except ConvertError as e:
            raise StepFailed(f"convert: {e}") from None
        s = result.stats
        print(f"convert: {s['accepted']} pairs accepted, {s['rejected']} rejected, {s['deduped']} duplicates of "
              f"{s['input']} records: {result.output}")
        return outcome(store, result.output, input=s["input"], accepted=s["accepted"], rejected=s["rejected"],
                       deduped=s["deduped"])


@timed
def validate(run_config: str) -> Outcome:
    from cafe_core.data.validate import validate_dataset

    cfg = config_of(run_config)
    with store_of(cfg) as store:
        report = validate_dataset(cfg.validate_, store, cfg.to_yaml())
        print(f"validate: {'passed' if report.success else 'FAILED'}: {cfg.validate_.output}/summary.txt")
        if not report.success:
            raise StepFailed(f"validate: {report.hard_failures} hard check(s) failed; see {cfg.validate_.output}/summary.txt")
        return outcome(store, cfg.validate_.output, success=True)


@timed
def train_local(run_config: str) -> Outcome:
    """`cafe train` on this machine: torchrun with train.nproc_per_node processes (or one process)."""
    cfg = config_of(run_config)
    with store_of(cfg) as store:
        return trained(store, run_train(cfg, store))


@timed
def export(run_config: str) -> Outcome:
    from cafe_core.evaluate.export import export as run_export

    cfg = config_of(run_config)
    with store_of(cfg) as store:
        result = run_export(cfg, store, progress=False)
        print(f"export: {result.items} embeddings (dim {result.dim}): {result.output}")
        return outcome(store, result.output, items=result.items, dim=result.dim)


@timed
def evaluate_family(run_config: str, family: str) -> tuple[Outcome, dict[str, float]]:
    from cafe_core.evaluate.run import run_family

    cfg = config_of(run_config)
    with store_of(cfg) as store:
        metrics = run_family(cfg, store, family, progress=False)
        print(f"evaluate: {family}: {len(metrics)} metrics -> {cfg.evaluate.output}/{family}/")
        return outcome(store, join(cfg.evaluate.output, family), family=family), metrics


@timed
def merge_evaluation(run_config: str, families: list[str] | None = None) -> tuple[Outcome, dict[str, Any], str]:
    """Combine the families; returns the outcome, the metrics record and the HTML report."""
    from cafe_core.evaluate.run import merge

    cfg = config_of(run_config)
    with store_of(cfg) as store:
        record = merge(cfg, store, families)
        html = store.read_text(join(cfg.evaluate.output, "report.html"))
        return outcome(store, cfg.evaluate.output), record, html


@timed
def gate(run_config: str) -> tuple[Outcome, str, str]:
    """Decide and write the record; returns (outcome, "PASS"|"FAIL", the why summary in Markdown)."""
    from cafe_core.gate import decide, write_decision

    cfg = config_of(run_config)
    with store_of(cfg) as store:
        decision = decide(cfg, store)
        uri = write_decision(store, cfg, decision)
        result = outcome(store, cfg.gate.output, decision=decision.decision, decision_uri=uri)
        return result, decision.decision, decision.summary()


@timed
def promote(run_config: str) -> Outcome:
    cfg = config_of(run_config)
    with store_of(cfg) as store:
        return outcome(store, run_promote(cfg, store).rsplit("/", 1)[0])


# The columns of the ablation table: the retrieval side against the understanding side (Table 7).
ABLATION_COLUMNS = ("retrieval/*/i2t_R@1", "retrieval/*/t2i_R@1", "mmeb/overall/p@1", "pope/average/f1",
                    "pope/average/accuracy", "mc/*/accuracy")


def compare_ablation(run_config: str, variants: list[dict[str, Any]]) -> tuple[str, str]:
    """The a_lm:a_con comparison as Markdown and HTML, also written to `{root}/runs/{run_id}/ablation/`.
    `variants` are the evaluation artifacts' metadata (logged metrics, run ids)."""
    import fnmatch

    from cafe_core.evaluate.report import table
    from cafe_core.storage import OutputWriter

    cfg = config_of(run_config)
    rows = []
    for v in variants:
        values = {k: x for k, x in v.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
        run = str(v.get("run_id", "?"))
        ratio = run.rsplit("-lm", 1)[-1] if "-lm" in run else "?"
        cells = []
        for pattern in ABLATION_COLUMNS:
            found = [values[k] for k in sorted(values) if fnmatch.fnmatch(k, pattern) and k.count("/") == pattern.count("/")]
            cells.append(found[0] if found else "n/a")
        rows.append([ratio, run, *cells])
    rows.sort(key=lambda r: float(r[0]) if r[0] not in ("?",) else float("inf"))
    header = ["a_lm:a_con", "run", *ABLATION_COLUMNS]
    fmt = lambda x: f"{x:.4f}" if isinstance(x, float) else str(x)  # noqa: E731
    markdown = "\n".join(["# a_lm:a_con ablation (retrieval vs understanding)", "",
                           "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                           *("| " + " | ".join(fmt(c) for c in r) + " |" for r in rows)]) + "\n"
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>cafe ablation</title></head><body>"
            "<h1>a_lm:a_con ablation</h1>" + table(header, rows) + "</body></html>")
    with store_of(cfg) as store:
        out = OutputWriter(store, f"{cfg.root}/runs/{cfg.run_id}/ablation", kind="ablation")
        out.put_text("comparison.md", markdown)
        out.put_text("comparison.html", html)
        out.put_json("variants.json", variants)
        out.commit(meta={"variants": len(variants)})
    return markdown, html


@timed
def train_cluster(run_config: str, image: str, nodes: int, gpus_per_node: int, namespace: str, s3_secret: str) -> Outcome:
    """Training as a Training Operator PyTorchJob (Master + Workers), followed until it ends; the step fails
    when the job fails, times out, or cannot be scheduled. Every replica runs `cafe train` on the run's
    resolved configuration, passed in the environment."""
    from cafe_core.launcher import TrainingJobSpec, job_name, launch

    cfg = config_of(run_config)
    spec = TrainingJobSpec(
        name=job_name(cfg.run_id),
        namespace=namespace, image=image, nodes=nodes, gpus_per_node=gpus_per_node,
        argv=["-m", "cafe_core.cli", "train", "--config", "env:CAFE_CONFIG_YAML"],
        s3_secret=s3_secret, env={"CAFE_CONFIG_YAML": run_config},
    )
    launch(spec)
    with store_of(cfg) as store:
        return trained(store, f"{cfg.train.output}/final", job=spec.name)
