"""The `cafe` command line: one subcommand per stage, each taking --config and dotted overrides.

Exit status: 0 success, 1 the stage ran and failed (reject limit, hard validation failure), 2 bad input
(configuration, missing data, unreachable storage).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

from cafe_core.config import FAMILIES, CafeConfig, ConfigError, load_config
from cafe_core.connect import connect, wants_embedded
from cafe_core.s3server import EmbeddedS3, EmbeddedS3Error, browse_hint
from cafe_core.steps import StepFailed, run_promote, run_train
from cafe_core.storage import Storage, StorageError, is_s3, read_manifest
from cafe_core.submit import SubmitError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, StorageError, EmbeddedS3Error, SubmitError)


# The stage ran and its result is a failure (exit 1).
StageFailed = StepFailed


def _config(args) -> CafeConfig:
    return load_config(args.config, args.overrides)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.max_samples=500")


# --- stages ------------------------------------------------------------------------------------------


def _synth(cfg: CafeConfig, store: Storage) -> str:
    from cafe_core.data.synth import generate, is_current

    if is_current(cfg.synth, store):
        print(f"synth: {cfg.synth.output} is up to date (same config); reusing it")
    else:
        manifest = generate(cfg.synth, store)
        print(f"synth: wrote {len(manifest.entries)} objects to {cfg.synth.output}")
    return cfg.synth.output


def _convert(cfg: CafeConfig, store: Storage) -> str:
    from cafe_core.data.convert import ConvertError, convert, summary
    from cafe_core.data.sources import SourceError

    data = cfg.require_data()
    try:
        result = convert(data, store, cfg.to_yaml())
    except SourceError as e:
        raise ConfigError(str(e)) from None
    except ConvertError as e:
        raise StageFailed(f"convert: {e}") from None
    print(f"convert: {result.output}\n{summary(result.stats)}")
    return result.output


def _validate(cfg: CafeConfig, store: Storage) -> str:
    from cafe_core.data.validate import validate_dataset

    report = validate_dataset(cfg.validate_, store, cfg.to_yaml())
    print(f"validate: {cfg.validate_.output}\n{report.summary_text()}")
    if not report.success:
        raise StageFailed(f"validate: {report.hard_failures} hard check(s) failed; see {cfg.validate_.output}/summary.txt")
    return cfg.validate_.output


def _export(cfg: CafeConfig, store: Storage) -> str:
    from cafe_core.evaluate.export import export

    with _eval_errors():
        result = export(cfg, store)
    print(f"export: {result.items} embeddings (dim {result.dim}) in {result.shards} shard(s)"
          f"{f', {result.reused_shards} reused from an interrupted run' if result.reused_shards else ''}: {result.output}")
    return result.output


def cmd_evaluate(args) -> None:
    from cafe_core.evaluate.report import metrics_markdown
    from cafe_core.evaluate.run import merge, run_family

    cfg = _config(args)
    if args.family and args.merge_only:
        raise ConfigError("--family runs families, --merge combines finished ones: give one of them")
    families = args.family or list(cfg.evaluate.families)
    with connect(cfg.s3, cfg.uris()) as store, _eval_errors():
        if not args.merge_only:
            for family in families:
                metrics = run_family(cfg, store, family)
                print(f"evaluate: {family}: {len(metrics)} metrics -> {cfg.evaluate.output}/{family}/")
        if args.family:
            return  # one family of a parallel evaluation; `cafe evaluate --merge` combines them
        record = merge(cfg, store)
        print(metrics_markdown(record["metrics"], HEADLINE_METRICS))
        print(f"evaluate: {cfg.evaluate.output}/metrics.json  {cfg.evaluate.output}/report.html")


def cmd_gate(args) -> None:
    from cafe_core.gate import decide, write_decision

    cfg = _config(args)
    with connect(cfg.s3, cfg.uris()) as store:
        decision = decide(cfg, store)
        print(decision.summary())
        if args.dry_run:
            print("gate: --dry-run: nothing written")
        else:
            print(f"gate: decision record {write_decision(store, cfg, decision)}")
    if not decision.passed:
        raise StageFailed(f"gate: FAIL ({'; '.join(decision.reasons[:2])})")


def _rollback(cfg: CafeConfig, store: Storage) -> str:
    from cafe_core.registry import RegistryError, rollback

    try:
        result = rollback(cfg, store)
    except RegistryError as e:
        raise StageFailed(f"rollback: {e}") from None
    print(f"rollback: {result.message}")
    return result.champion


# The metrics printed in summaries (every metric is in metrics.json and the report).
HEADLINE_METRICS = ("retrieval/", "mmeb/overall", "mmeb/ind", "mmeb/ood", "pope/average/", "caption/overall/",
                    "caption/classwise/", "mc/", "gap/centroid_distance")


@contextlib.contextmanager
def _eval_errors():
    """Bad evaluation input (missing sets, checkpoints, exports from another model) is a user error."""
    from cafe_core.evaluate.export import ExportError
    from cafe_core.evaluate.run import EvaluationError
    from cafe_core.evaluate.sets import EvalSetError
    from cafe_core.model.build import ModelLoadError
    from cafe_core.model.locate import CheckpointNotFound

    try:
        yield
    except (ExportError, EvaluationError, EvalSetError, ModelLoadError, CheckpointNotFound) as e:
        raise ConfigError(str(e)) from None


def _with_store(stage: Callable[[CafeConfig, Storage], str]):
    def run(args) -> None:
        cfg = _config(args)
        with connect(cfg.s3, cfg.uris()) as store:
            stage(cfg, store)

    return run


def cmd_run(args) -> None:
    """The main job: the whole KFP pipeline locally through kfp.local (synth -> convert -> validate -> train ->
    export -> evaluate -> gate -> promote on PASS), then the metrics, the decision and where everything went."""
    from cafe_core.evaluate.report import metrics_markdown
    from cafe_core.gate import read_decision
    from cafe_core.local_run import failure_reason, run_pipeline

    cfg = _config(args)
    with connect(cfg.s3, cfg.uris()) as store:
        print(f"run {cfg.run_id} (config {cfg.digest()}): the cafe pipeline through kfp.local")
        if store.endpoint_url:
            print(f"S3 endpoint: {store.endpoint_url}")
        passed_on = [o for o in args.overrides if not o.startswith(("run_id=", "root="))]  # given as parameters
        try:
            timing = run_pipeline(cfg, store, args.config, passed_on)
        except RuntimeError as e:
            log = f".cafe/logs/run-{cfg.run_id}.log"
            plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
            raise StageFailed(f"run: {failure_reason(log) or plain}\n  ({plain}; the whole log: {log})") from None
        record = store.read_json(f"{cfg.evaluate.output}/metrics.json")
        decision = read_decision(store, f"{cfg.gate.output}/decision.json")
        print(f"\nMetrics ({cfg.evaluate.output}/metrics.json; all of them in report.html):")
        print(metrics_markdown(record["metrics"], HEADLINE_METRICS))
        print(f"\n{decision.summary()}")
        if not decision.passed:
            print("promote: skipped (the gate did not pass)")
        else:
            aliases = store.read_json(f"{cfg.registry.uri}/{cfg.registry.model_name}/aliases.json")
            print(f"promote: champion {aliases['champion']} (previous {aliases['previous']})")
        work = sum(timing["steps"].values())
        print(f"\nPipeline: {timing['wall']:.0f} s wall; the steps' own time {work:.0f} s (imports inside them "
              f"included), kfp.local's orchestration {timing['wall'] - work:.0f} s; log {timing['log']}")
        run = f"{cfg.root}/runs/{cfg.run_id}"
        print("\nWhere everything went:")
        print(f"  synthetic data     {cfg.synth.output}/  (train/, eval/)")
        print(f"  converted pairs    {run}/convert/pairs/  {run}/convert/rejects.jsonl  {run}/convert/stats.json")
        print(f"  validation         {run}/validate/summary.txt  {run}/validate/data_docs/index.html")
        print(f"  checkpoints        {cfg.train.output}/checkpoints/  (latest.json)")
        print(f"  trained model      {cfg.train.output}/final/model/  {cfg.train.output}/final/loss_curve.png")
        print(f"  embeddings         {cfg.export.output}/index.parquet  {cfg.export.output}/shards/")
        print(f"  evaluation         {cfg.evaluate.output}/metrics.json  {cfg.evaluate.output}/report.html")
        print(f"  gate decision      {cfg.gate.output}/decision.json  {cfg.gate.output}/why.md")
        print(f"  registry           {cfg.registry.uri}/{cfg.registry.model_name}/aliases.json")
        print(f"  KFP artifacts      {KFP_LOCAL_ROOT}/  (kfp.local's pipeline root)")
        if store.endpoint_url and is_s3(cfg.root):
            print(browse_hint(store.endpoint_url, f"{run}/"))
            print("  (the embedded server stops with this command; `cafe s3 serve` keeps one running)")


KFP_LOCAL_ROOT = ".cafe/kfp-local"


def cmd_s3_serve(args) -> None:
    cfg = _config(args)
    server = EmbeddedS3(cfg.s3.embedded_dir)
    endpoint = server.start()
    if not server.owned:
        print(f"already running: {endpoint}")
        return
    print(browse_hint(endpoint, f"{cfg.root}/"))
    print(f"  other shells:  export AWS_ENDPOINT_URL={endpoint}")
    print(f"data folder: {server.data_dir}   (Ctrl-C stops the server)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        print("stopped")


def cmd_compile(args) -> None:
    from pipelines.compile import COMPILED, compile_all

    for path in compile_all(Path(args.out) if args.out else COMPILED):
        print(f"compile: {path}")


def cmd_submit(args) -> None:
    from cafe_core.submit import parse_params, submit

    params = parse_params(args.package, args.params)
    result = submit(args.host, args.package, args.pipeline_name, params, args.experiment,
                    version_name=args.version_name, namespace=args.namespace, run_name=args.run_name)
    print(f"submit: run {result.run_id} of pipeline {args.pipeline_name} (version {result.version_id})")
    print(f"  {result.url}")


def cmd_schedule(args) -> None:
    from cafe_core.submit import parse_params, schedule, validate_cron

    cron = validate_cron(args.cron)
    params = parse_params(args.package, args.params)
    result = schedule(args.host, args.package, args.pipeline_name, cron, params, args.experiment, args.name,
                      namespace=args.namespace, version_name=args.version_name)
    print(f"schedule: recurring run {result.job_id} ({cron}, no catch-up, one run at a time)")
    print(f"  {result.url}")


def _kfp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"), required=not os.environ.get("KF_PIPELINES_ENDPOINT"),
                   help="the KFP API/UI address (default $KF_PIPELINES_ENDPOINT); a token is read from $KFP_TOKEN")
    p.add_argument("--package", default="pipelines/compiled/cafe.yaml", help="compiled pipeline YAML (cafe compile)")
    p.add_argument("--pipeline-name", default="cafe", help="the pipeline in KFP; each submission adds a version")
    p.add_argument("--experiment", default="cafe")
    p.add_argument("--version-name", default=None, help="default: UTC time + the package's sha256")
    p.add_argument("--namespace", default=None, help="multi-user KFP: the profile namespace")
    p.add_argument("params", nargs="*", metavar="key=value", help="pipeline parameters, e.g. max_steps=800 gpus_per_node=8")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def _target(cfg: CafeConfig, what: str) -> str:
    """A URI, a local path, or a bare run id (looked up under {root}/runs/)."""
    if is_s3(what) or "/" in what or what.startswith("."):
        return what
    return f"{cfg.root}/runs/{what}"


def cmd_artifacts_ls(args) -> None:
    cfg = _config(args)
    prefix = _target(cfg, args.target)
    with connect(cfg.s3, [prefix]) as store:
        objects = store.list(prefix)
        if not objects:
            raise StorageError(f"nothing under {prefix}")
        for o in objects:
            print(f"{_human(o.size):>10}  {o.uri}")
        print(f"{len(objects)} objects, {_human(sum(o.size for o in objects))}")


def cmd_artifacts_get(args) -> None:
    cfg = _config(args)
    uri = _target(cfg, args.target)
    with connect(cfg.s3, [uri]) as store:
        if args.dest:
            store.download(uri, args.dest)
            print(f"{uri} -> {args.dest}")
        else:
            sys.stdout.buffer.write(store.read_bytes(uri))


def cmd_artifacts_verify(args) -> None:
    from cafe_core.storage import verify_output

    cfg = _config(args)
    prefix = _target(cfg, args.target)
    with connect(cfg.s3, [prefix]) as store:
        manifest = verify_output(store, prefix, read_manifest(store, prefix))
        print(f"{prefix}: committed {manifest.created}, {len(manifest.entries)} objects, all sha256 match")


def cmd_config_show(args) -> None:
    cfg = _config(args)
    print(cfg.to_yaml(), end="")
    if any(is_s3(u) for u in cfg.uris()):
        print(f"# S3: {'embedded SeaweedFS' if wants_embedded(cfg.s3) else 'configured endpoint / boto3 settings'}")


# --- parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cafe", description="CAFe fine-tuning pipeline")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str, parent=sub, positionals: Sequence[tuple[str, dict]] = ()) -> None:
        p = parent.add_parser(name, help=help, description=help)
        for arg, spec in positionals:  # before the key=value words, which take the rest
            p.add_argument(arg, **spec)
        _add_config_args(p)
        p.set_defaults(fn=fn)

    add("run", cmd_run, "run the main job (synth -> convert -> validate -> train) and print where everything went")
    data = sub.add_parser("data", help="synthetic data").add_subparsers(dest="data_command", required=True)
    add("synth", _with_store(_synth), "generate the synthetic shapes-world datasets", data)
    add("convert", _with_store(_convert), "convert training data into image-text pair shards")
    add("validate", _with_store(_validate), "check a converted dataset with great-expectations")
    add("train", _with_store(run_train), "CAFe fine-tuning (torchrun + DeepSpeed), resumable from S3 checkpoints")
    add("export", _with_store(_export), "embed every evaluation item with a checkpoint (sharded safetensors + index)")
    add("evaluate", cmd_evaluate, "evaluate a checkpoint on every benchmark family; metrics.json + report.html", sub,
        [("--family", {"action": "append", "choices": FAMILIES, "help": "run only this family (repeatable); "
                       "without --merge the combined metrics are not written"}),
         ("--merge", {"dest": "merge_only", "action": "store_true", "help": "only combine the families' outputs"})])
    add("gate", cmd_gate, "judge a run's metrics against the gate rules and the champion; write the decision", sub,
        [("--dry-run", {"action": "store_true", "help": "print the decision, write nothing"})])
    add("promote", _with_store(run_promote), "make the model of a PASS decision the registry's champion")
    add("rollback", _with_store(_rollback), "restore the previous champion")
    comp = sub.add_parser("compile", help="write the pipelines' YAML (pipelines/compiled/)",
                          description="write the pipelines' YAML (pipelines/compiled/), byte-for-byte reproducible")
    comp.add_argument("--out", help="another folder (default: pipelines/compiled)")
    comp.set_defaults(fn=cmd_compile)
    p = sub.add_parser("submit", help="upload the pipeline as a new version and start a run",
                       description="upload the compiled pipeline as a new version of a named pipeline and start a run")
    _kfp_args(p)
    p.add_argument("--run-name", default=None)
    p.set_defaults(fn=cmd_submit)
    p = sub.add_parser("schedule", help="create a recurring run (6-field cron, no catch-up, one at a time)",
                       description="create a recurring run; KFP cron has 6 fields, seconds first ('0 0 3 * * *' = "
                                   "03:00 daily, in the scheduler's time zone, usually UTC)")
    _kfp_args(p)
    p.add_argument("--cron", required=True, help="6-field cron, seconds first, e.g. '0 0 3 * * *'")
    p.add_argument("--name", default="cafe-retrain", help="the recurring run's name (refused if it exists)")
    p.set_defaults(fn=cmd_schedule)
    s3 = sub.add_parser("s3", help="the embedded S3 server").add_subparsers(dest="s3_command", required=True)
    add("serve", cmd_s3_serve, "run the embedded SeaweedFS S3 server until Ctrl-C", s3)
    art = sub.add_parser("artifacts", help="browse artifacts").add_subparsers(dest="art_command", required=True)
    add("ls", cmd_artifacts_ls, "list objects under a prefix or run id, with sizes", art,
        [("target", {"help": "s3://bucket/prefix, a local folder, or a run id"})])
    add("get", cmd_artifacts_get, "download one object (to a file with --dest, else to stdout)", art,
        [("target", {"help": "s3://bucket/key or a local path"}), ("--dest", {"help": "local file to write"})])
    add("verify", cmd_artifacts_verify, "check a committed output against its manifest (sizes, sha256)", art,
        [("target", {"help": "the output prefix, or a run id"})])
    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    add("show", cmd_config_show, "print the resolved configuration", cfg)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except StageFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
