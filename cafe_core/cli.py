"""The `cafe` command line: thin adapters over the stage layer (cafe_core.stages), plus the commands that
run, compile, submit and schedule the pipeline and browse its artifacts. Every command takes --config and
dotted key=value overrides.

Exit status: 0 success, 1 the stage ran and failed (reject limit, hard validation failure, gate FAIL), 2 bad
input (configuration, missing data, unreachable storage): cafe_core.errors, the same as the pipeline's steps.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from cafe_core.commit import read_manifest
from cafe_core.config import FAMILIES, CafeConfig, load_config
from cafe_core.connect import connect, wants_embedded
from cafe_core.errors import BadInput, CafeError, StageFailed, exit_line
from cafe_core.layout import METRICS_FILE, RunLayout, run_prefix
from cafe_core.s3server import EmbeddedS3, browse_hint
from cafe_core.stages import OTHER_STAGES, PIPELINE_ORDER, STAGES, Result, help_of
from cafe_core.params import DEFAULT_RATIOS
from cafe_core.storage import Storage, StorageError
from cafe_core.uris import is_s3


def _config(args) -> CafeConfig:
    return load_config(args.config, args.overrides)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.max_samples=500")


# --- stages ------------------------------------------------------------------------------------------

def _evaluate_options(args) -> dict[str, Any]:
    """--family X (repeatable): those families, not merged; --merge: only the merge; neither: everything."""
    if args.family and args.merge_only:
        raise BadInput("evaluate: --family runs families, --merge combines finished ones: give one of them")
    return {"families": [] if args.merge_only else args.family, "merge": not args.family, "progress": True}


# Command-line options of the stages that have any, as stage keyword arguments.
STAGE_OPTIONS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "convert": lambda args: {"progress": None},  # bars on a terminal only (tqdm decides)
    "export": lambda args: {"progress": True},
    "evaluate": _evaluate_options,
    "gate": lambda args: {"dry_run": args.dry_run},
    "pretrain": lambda args: {"out": args.out, "progress": True},
}


def stage_command(name: str, fn: Callable[..., Result]) -> Callable[[Any], None]:
    """`cafe <name>`: load the config, connect, run the stage, print its summary; a negative verdict
    (gate FAIL) exits 1 like a failed stage."""

    def command(args) -> None:
        options = STAGE_OPTIONS.get(name, lambda _: {})(args)
        cfg = _config(args)
        with connect(cfg.s3, cfg.uris()) as store:
            result = fn(cfg, store, **options)
        if result.summary:  # empty where another process has reported (torchrun's rank 0)
            print(result.summary)
        if result.failure:
            raise StageFailed(result.failure)

    return command


def metrics_summary(cfg: CafeConfig, store: Storage, metrics: dict[str, Any], where: str) -> str:
    """The run's headline metrics; beside the starting model's own when it is a base with a card."""
    from cafe_core.evaluate.report import metrics_markdown, side_by_side_markdown
    from cafe_core.stages.evaluate import HEADLINE_METRICS
    from cafe_core.stages.pretrain import card_metrics

    base = card_metrics(cfg, store)
    if base is None:
        return f"Metrics ({where}; all of them in report.html):\n{metrics_markdown(metrics, HEADLINE_METRICS)}"
    return (f"Metrics: the base {cfg.model.checkpoint} (from its card) and the fine-tuned model ({where}; all of "
            f"them in report.html):\n{side_by_side_markdown(metrics, base, HEADLINE_METRICS)}")


def cmd_run(args) -> None:
    """The main job: the whole KFP pipeline locally through kfp.local, then the metrics, the decision and
    where everything went."""
    from cafe_core.kfp_local import failure_reason, log_path, run_pipeline, where_everything_went
    from cafe_core.records import read_decision, registry_root
    from cafe_core.registry import read_aliases

    cfg = _config(args)
    with connect(cfg.s3, cfg.uris()) as store:
        print(f"run {cfg.run_id} (config {cfg.digest()}): the cafe pipeline through kfp.local")
        if store.endpoint_url:
            print(f"S3 endpoint: {store.endpoint_url}")
        try:
            timing = run_pipeline(cfg, store, args.config, args.overrides)
        except RuntimeError as e:
            log = log_path(cfg.run_id)
            plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
            raise StageFailed(f"run: {failure_reason(log) or plain}\n  ({plain}; the whole log: {log})") from None
        metrics = f"{cfg.evaluate.output}/{METRICS_FILE}"
        record = store.read_json(metrics)
        decision = read_decision(store, cfg.promote.decision)
        print(f"\n{metrics_summary(cfg, store, record['metrics'], metrics)}")
        print(f"\n{decision.summary()}")
        if not decision.passed:
            print("promote: skipped (the gate did not pass)")
        elif cfg.promote.mode == "ci":
            print("promote: left to the CI (promote.mode ci): the parity check passed and the promotion was "
                  "requested; the request step's lines above say where")
        else:
            aliases, _ = read_aliases(store, registry_root(cfg))
            print(f"promote: champion {aliases.champion} (previous {aliases.previous})")
        work = sum(timing["steps"].values())
        print(f"\nPipeline: {timing['wall']:.0f} s wall; the steps' own time {work:.0f} s (imports inside them "
              f"included), kfp.local's orchestration {timing['wall'] - work:.0f} s; log {timing['log']}")
        print("\nWhere everything went:")
        print("\n".join(where_everything_went(cfg)))
        if store.endpoint_url and is_s3(cfg.root):
            print(browse_hint(store.endpoint_url, f"{run_prefix(cfg.root, cfg.run_id)}/"))
            print("  (the embedded server stops with this command; `cafe s3 serve` keeps one running)")


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers, e.g. 0,0.1,1") from None
    if any(not (math.isfinite(r) and r >= 0) for r in ratios):
        raise argparse.ArgumentTypeError(f"{text!r}: a ratio a_lm / a_con is a finite number >= 0 (LM only is "
                                         "always one more variant)")
    if len({f"{r:g}" for r in ratios}) < len(ratios):  # a variant's run id is <run id>-lm<ratio>
        raise argparse.ArgumentTypeError(f"{text!r}: a ratio is given twice")
    return ratios


def cmd_ablation(args) -> None:
    """The a_lm:a_con ablation (the paper's Table 7) through kfp.local: one fine-tuning per ratio and an LM-only
    one, then the comparison table, plot and modality-gap scatters."""
    from cafe_core.kfp_local import failure_reason, log_path, run_pipeline

    cfg = _config(args)
    ratios = args.ratios or DEFAULT_RATIOS
    with connect(cfg.s3, cfg.uris()) as store:
        print(f"ablation {cfg.run_id}: ratios {', '.join(f'{r:g}' for r in ratios)} and LM only, through kfp.local")
        if store.endpoint_url:
            print(f"S3 endpoint: {store.endpoint_url}")
        try:
            timing = run_pipeline(cfg, store, args.config, args.overrides, "cafe-ablation", ratios=ratios)
        except RuntimeError as e:
            log = log_path(cfg.run_id)
            raise StageFailed(f"ablation: {failure_reason(log) or e}\n  (the whole log: {log})") from None
        where = RunLayout(cfg.root, cfg.run_id).ablation
        print(store.read_text(f"{where}/comparison.md"))
        print(f"ablation: {timing['wall']:.0f} s; {where}/comparison.html (table and pictures), log {timing['log']}")
        if store.endpoint_url and is_s3(cfg.root):
            print(browse_hint(store.endpoint_url, f"{where}/"))
            print("  (the embedded server stops with this command; `cafe s3 serve` keeps one running)")


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
    from pipelines.compile import COMPILED, check_image, compile_all

    for option, ref in (("--base-image", args.base_image), ("--train-image", args.train_image)):
        warning = check_image(ref, option) if ref is not None else None
        if warning:
            print(f"compile: warning: {warning}", file=sys.stderr)
    for path in compile_all(Path(args.out) if args.out else COMPILED, args.ablation_parallelism, args.base_image,
                            args.train_image):
        print(f"compile: {path}")


def cmd_submit(args) -> None:
    from cafe_core.kfp_api import parse_params, submit, with_namespace

    params = _checked(args.package, with_namespace(args.package, parse_params(args.package, args.params),
                                                   args.namespace))
    result = submit(args.host, args.package, args.pipeline_name, params, args.experiment,
                    version_name=args.version_name, namespace=args.namespace, run_name=args.run_name,
                    service_account=args.service_account)
    print(f"submit: run {result.run_id} of pipeline {args.pipeline_name} (version {result.version_id})")
    print(f"  {result.url}")


def cmd_schedule(args) -> None:
    from cafe_core.kfp_api import parse_params, schedule, validate_cron, with_namespace

    cron = validate_cron(args.cron)
    params = _checked(args.package, with_namespace(args.package, parse_params(args.package, args.params),
                                                   args.namespace))
    result = schedule(args.host, args.package, args.pipeline_name, cron, params, args.experiment, args.name,
                      namespace=args.namespace, version_name=args.version_name,
                      service_account=args.service_account)
    print(f"schedule: recurring run {result.job_id} ({cron}, no catch-up, one run at a time)")
    print(f"  {result.url}")


def _checked(package: str, params: dict) -> dict:
    """The parameters of a cafe pipeline package checked against cafe_core.params (types, ranges)."""
    from cafe_core.kfp_api import pipeline_name
    from cafe_core.params import PARAMS_OF, parse

    kind = PARAMS_OF.get(pipeline_name(package))
    if kind is not None:
        parse(kind, params)
    return params


def _kfp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"), required=not os.environ.get("KF_PIPELINES_ENDPOINT"),
                   help="the KFP API/UI address (default $KF_PIPELINES_ENDPOINT); a token is read from $KFP_TOKEN")
    p.add_argument("--package", default="pipelines/compiled/cafe.yaml", help="compiled pipeline YAML (cafe compile)")
    p.add_argument("--pipeline-name", default="cafe", help="the pipeline in KFP; each submission adds a version")
    p.add_argument("--experiment", default="cafe")
    p.add_argument("--version-name", default=None, help="default: UTC time + the package's sha256")
    p.add_argument("--namespace", default=None, help="multi-user KFP: the profile namespace (also the pipeline's "
                   "namespace parameter, where the training job goes, unless namespace=... is given)")
    p.add_argument("--service-account", default=None, help="the Kubernetes service account the run's pods use "
                   "(e.g. the profile's dedicated cafe-pipeline account; default: KFP's, default-editor)")
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
    return run_prefix(cfg.root, what)


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
    from cafe_core.commit import verify_output

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


def cmd_job_render(args) -> None:
    """`cafe job render`: the training job the pipeline's train step creates for this configuration, as YAML
    (like `helm template`): the same builder path as the step (cafe_core.cluster.spec.job_spec)."""
    import yaml

    from cafe_core.cluster.kinds import job_object, kind_of
    from cafe_core.cluster.spec import job_spec

    cfg = _config(args)
    spec = job_spec(cfg)
    job = job_object(spec)
    where = "" if cfg.cluster.namespace else (f" cluster.namespace is empty: the step uses its own namespace; here "
                                              f"{spec.namespace} ($POD_NAMESPACE, else 'default').")
    print(f"# {kind_of(spec).kind} {spec.namespace}/{spec.name}: the train step also makes its own pod the job's "
          f"owner (metadata.ownerReferences), which this omits.{where}", file=sys.stderr)
    sys.stdout.write(yaml.safe_dump(job, sort_keys=False, width=120))


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

    add("run", cmd_run, f"run the main job, the whole pipeline through kfp.local ({PIPELINE_ORDER}), and print "
                        "the metrics, the decision and where everything went")
    add("ablation", cmd_ablation, "fine-tune with each a_lm:a_con ratio and with the LM loss only (the paper's "
        "Table 7) through kfp.local, and compare them with the base: table, plot, modality-gap scatters",
        positionals=[("--ratios", {"type": _ratios, "metavar": "R,R,...", "help": "a_lm / a_con per variant, "
                                   f"comma-separated (default: {','.join(f'{r:g}' for r in DEFAULT_RATIOS)})"})])
    options = {
        "evaluate": [("--family", {"action": "append", "choices": FAMILIES, "help": "run only this family "
                                   "(repeatable); without --merge the combined metrics are not written"}),
                     ("--merge", {"dest": "merge_only", "action": "store_true",
                                  "help": "only combine the families' outputs"})],
        "gate": [("--dry-run", {"action": "store_true", "help": "print the decision, write nothing"})],
        "pretrain": [("--out", {"default": "models/shapes-base", "help": "the local folder the base model and its "
                                "card are written to (default: %(default)s)"})],
    }
    data = sub.add_parser("data", help="synthetic data").add_subparsers(dest="data_command", required=True)
    for name, fn in {**STAGES, **OTHER_STAGES}.items():
        add(name, stage_command(name, fn), help_of(fn), data if name == "synth" else sub, options.get(name, ()))
    comp = sub.add_parser("compile", help="write the pipelines' YAML (pipelines/compiled/)",
                          description="write the pipelines' YAML (pipelines/compiled/), byte-for-byte reproducible")
    comp.add_argument("--out", help="another folder (default: pipelines/compiled)")
    comp.add_argument("--ablation-parallelism", type=int, default=1, metavar="N",
                      help="ablation variants trained at once (default 1: each is a GPU job; 0: all at once)")
    comp.add_argument("--base-image", metavar="REF", help="the base_image parameter's default, NAME@sha256:<digest> "
                      "(NAME:TAG is accepted with a warning)")
    comp.add_argument("--train-image", metavar="REF", help="the train_image parameter's default, "
                      "NAME@sha256:<digest> (NAME:TAG is accepted with a warning)")
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
    job = sub.add_parser("job", help="the training job").add_subparsers(dest="job_command", required=True)
    add("render", cmd_job_render, "print (YAML) the training job the pipeline's train step creates for this "
        "configuration: a PyTorchJob or TrainJob per cluster.api", job)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.fn(args)
    except CafeError as e:
        print(exit_line(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head & co.
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
