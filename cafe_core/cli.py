"""The `cafe` command line: one subcommand per stage, each taking --config and dotted overrides.

Exit status: 0 success, 1 the stage ran and failed (reject limit, hard validation failure), 2 bad input
(configuration, missing data, unreachable storage).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Callable, Sequence

from cafe_core.config import CafeConfig, ConfigError, load_config
from cafe_core.connect import connect, wants_embedded
from cafe_core.s3server import EmbeddedS3, EmbeddedS3Error, browse_hint
from cafe_core.storage import Storage, StorageError, is_s3, read_manifest

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, StorageError, EmbeddedS3Error)


class StageFailed(RuntimeError):
    """The stage ran and its result is a failure (exit 1)."""


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


def _train(cfg: CafeConfig, store: Storage) -> str:
    from cafe_core.train.checkpoint import CheckpointError
    from cafe_core.train.data import DataError
    from cafe_core.train.launch import in_torchrun, torchrun
    from cafe_core.train.trainer import preflight, run

    try:
        if cfg.train.nproc_per_node > 1 and not in_torchrun():
            preflight(cfg, store, world=cfg.train.nproc_per_node)  # fail here, not in every child
            print(f"train: {cfg.train.nproc_per_node} processes under torchrun", flush=True)
            if torchrun(cfg, store, ["train"]) != 0:
                raise StageFailed(f"train: a training process failed; checkpoints under {cfg.train.output}/checkpoints")
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


def _uris(cfg: CafeConfig) -> list[str]:
    uris = [cfg.root, cfg.synth.output, cfg.validate_.input, cfg.validate_.output, cfg.train.data, cfg.train.output]
    if cfg.data:
        uris += [cfg.data.output, *(s.uri for s in cfg.data.sources)]
    return uris


def _with_store(stage: Callable[[CafeConfig, Storage], str]):
    def run(args) -> None:
        cfg = _config(args)
        with connect(cfg.s3, _uris(cfg)) as store:
            stage(cfg, store)

    return run


def cmd_run(args) -> None:
    """The main job on the embedded default: synth -> convert -> validate -> train, then where everything went."""
    cfg = _config(args)
    with connect(cfg.s3, _uris(cfg)) as store:
        print(f"run {cfg.run_id} (config {cfg.digest()})")
        if store.endpoint_url:
            print(f"S3 endpoint: {store.endpoint_url}")
        synth = _synth(cfg, store)
        converted = _convert(cfg, store)
        validated = _validate(cfg, store)
        trained = _train(cfg, store)
        print("\nWhere everything went:")
        print(f"  synthetic data     {synth}/  (train/, eval/)")
        print(f"  converted pairs    {converted}/pairs/")
        print(f"  rejects, stats     {converted}/rejects.jsonl  {converted}/stats.json")
        print(f"  validation         {validated}/summary.txt  {validated}/data_docs/index.html")
        print(f"  checkpoints        {cfg.train.output}/checkpoints/  (latest.json)")
        print(f"  trained model      {trained}/model/  {trained}/metrics.jsonl  {trained}/loss_curve.png")
        if store.endpoint_url and is_s3(cfg.root):
            print(browse_hint(store.endpoint_url, f"{cfg.root}/runs/{cfg.run_id}/"))
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
    if any(is_s3(u) for u in _uris(cfg)):
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
    add("train", _with_store(_train), "CAFe fine-tuning (torchrun + DeepSpeed), resumable from S3 checkpoints")
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
