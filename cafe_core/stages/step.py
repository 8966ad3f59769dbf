"""A stage as a KFP pipeline step: the same function, the same one-line errors and exit status, the same
summary as `cafe <stage>`; `publish` copies a Result into the step's typed output artifacts."""

from __future__ import annotations

import sys
from typing import Any, Callable

import yaml

from cafe_core.config import CafeConfig
from cafe_core.errors import CafeError, exit_line
from cafe_core.stages.base import Result


def config_of(run_config: str) -> CafeConfig:
    """The run's configuration from the YAML the config-resolving task made (the same for every step)."""
    return CafeConfig.model_validate(yaml.safe_load(run_config))


def run_step(fn: Callable[..., Result], run_config: str, **kwargs: Any) -> Result:
    """Run the stage `fn` on the run's configuration. A stage error ends the step with the line and exit
    status `cafe <stage>` would give (2: bad input, 1: the stage failed), not a traceback."""
    from cafe_core.connect import connect

    cfg = config_of(run_config)
    try:
        with connect(cfg.s3, cfg.uris()) as store:
            result = fn(cfg, store, **kwargs)
    except CafeError as e:
        print(exit_line(e), file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None
    if result.summary:
        print(result.summary, flush=True)
    return result


def publish(result: Result, artifact: Any = None, metrics: Any = None, documents: dict[str, Any] | None = None) -> None:
    """`artifact`: metadata (URI, manifest sha256, figures) and the URI as its content; `metrics`: every
    metric logged (the KFP UI shows them) and the output's metadata; `documents`: file name -> the
    artifact that gets that document of the Result (e.g. {"why.md": why})."""
    if artifact is not None:
        artifact.metadata.update(result.metadata())
        with open(artifact.path, "w") as f:
            f.write(result.uri + "\n")
    if metrics is not None:
        for name, value in sorted(result.metrics.items()):
            metrics.log_metric(name, value)
        metrics.metadata.update({"cafe_output": result.metadata()})
    for name, target in (documents or {}).items():
        with open(target.path, "w") as f:
            f.write(result.documents[name])
