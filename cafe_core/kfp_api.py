"""Submit a compiled pipeline to Kubeflow Pipelines: one run now (`cafe submit`) or a recurring run (`cafe schedule`).

Both upload the compiled YAML as a new version of the named pipeline (the pipeline is created on first use), so
every run points at the exact spec it ran, and the KFP UI lists the versions side by side. Parameters arrive as
`key=value` strings and are converted to the types the compiled pipeline declares.

Auth: kfp.Client's own discovery (in-cluster service account token, KF_PIPELINES_SA_TOKEN_PATH, kube config);
a bearer token in the environment variable KFP_TOKEN is passed as `existing_token` when set.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from cafe_core.errors import BadInput

TOKEN_ENV = "KFP_TOKEN"


class SubmitError(BadInput):
    """Bad input or an unusable Kubeflow Pipelines endpoint, with what to change."""


@dataclass(frozen=True)
class SubmitResult:
    run_id: str
    pipeline_id: str
    version_id: str
    url: str


@dataclass(frozen=True)
class ScheduleResult:
    job_id: str
    url: str
    pipeline_id: str = ""
    version_id: str = ""


# --- cron ----------------------------------------------------------------------------------------------------
# KFP's ScheduledWorkflow controller parses with robfig/cron: six fields, seconds first. Names and ranges below
# are that library's; `?` (= any) is accepted in the two day fields, as in the kfp docstring's '0 0 9 ? * 2-6'.

_MONTHS = {m: i for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], start=1)}
_DAYS = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
_FIELDS = (  # name, min, max, names, `?` allowed
    ("second", 0, 59, None, False),
    ("minute", 0, 59, None, False),
    ("hour", 0, 23, None, False),
    ("day-of-month", 1, 31, None, True),
    ("month", 1, 12, _MONTHS, False),
    ("day-of-week", 0, 6, _DAYS, True),
)
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_GO_DURATION = re.compile(r"((?:\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _cron_value(text: str, name: str, lo: int, hi: int, names: dict | None) -> int:
    if names and text.lower() in names:
        return names[text.lower()]
    if not text.isdigit():
        allowed = f", or a name ({'/'.join(n.upper() for n in names)})" if names else ""
        raise SubmitError(f"{name} field: {text!r} is not a number {lo}-{hi}{allowed}")
    value = int(text)
    if not lo <= value <= hi:
        raise SubmitError(f"{name} field: {value} is out of range {lo}-{hi}")
    return value


def _cron_field(expr: str, name: str, lo: int, hi: int, names: dict | None, any_ok: bool) -> None:
    """One field: a comma-separated list of `*`, `N`, `N-M`, each optionally `/STEP` (robfig/cron's grammar)."""
    for part in expr.split(","):
        if not part:
            raise SubmitError(f"{name} field {expr!r}: empty list element")
        range_, _, step = part.partition("/")
        if "/" in step:
            raise SubmitError(f"{name} field {part!r}: more than one '/'")
        if range_ in ("*", "?"):
            if range_ == "?" and not any_ok:
                raise SubmitError(f"{name} field: '?' is only allowed in the day-of-month and day-of-week fields")
        else:
            low, dash, high = range_.partition("-")
            start = _cron_value(low, name, lo, hi, names)
            if dash:
                end = _cron_value(high, name, lo, hi, names)
                if start > end:
                    raise SubmitError(f"{name} field {part!r}: range start {start} is after its end {end}")
        if step or part.endswith("/"):
            if not step.isdigit() or int(step) == 0:
                raise SubmitError(f"{name} field {part!r}: the step must be a positive number")


def _go_duration_seconds(text: str) -> float:
    if not text or not _GO_DURATION.fullmatch(text):
        raise SubmitError(f"@every {text!r}: not a duration such as 24h, 90m or 1h30m")
    return sum(float(n) * _GO_UNITS[u] for n, u in re.findall(r"((?:\d+(?:\.\d*)?|\.\d+))(ns|us|µs|ms|s|m|h)", text))


def validate_cron(expr: str) -> str:
    """The expression, normalised (single spaces), if Kubeflow Pipelines runs it as meant; SubmitError otherwise.

    Six fields, seconds first: `0 0 3 * * *` is every day at 03:00:00 (the scheduler's time zone, normally UTC).
    A five-field crontab line is refused, since KFP would read its first field as seconds and fire far more often
    than meant; the message shows the six-field equivalent. The seconds field must be one number (a pipeline
    started several times a minute is a typo). Descriptors (@daily, @hourly, ..., @every 24h) are accepted.
    """
    text = " ".join(str(expr).split())
    if not text:
        raise SubmitError("empty cron expression: KFP takes six fields, seconds first, e.g. '0 0 3 * * *'")
    if text.startswith("@"):
        if text in _DESCRIPTORS:
            return text
        if text.startswith("@every "):
            if _go_duration_seconds(text[len("@every "):]) < 60:
                raise SubmitError(f"{text!r} starts the pipeline more than once a minute; use at least '@every 1m'")
            return text
        raise SubmitError(f"unknown cron descriptor {text!r}: use one of {', '.join(_DESCRIPTORS)} or '@every 24h'")
    fields = text.split(" ")
    if len(fields) == 5:
        suggestion = "0 " + text
        try:
            validate_cron(suggestion)
            fix = f"did you mean {suggestion!r}?"
        except SubmitError as e:
            fix = f"as six fields that would be {suggestion!r}, which is still wrong: {e}"
        raise SubmitError(
            f"cron {text!r} has 5 fields, but Kubeflow Pipelines recurring runs take 6 with seconds first "
            f"(second minute hour day-of-month month day-of-week); a 5-field line would fire far more often than "
            f"meant: {fix}")
    if len(fields) != 6:
        raise SubmitError(
            f"cron {text!r} has {len(fields)} fields; Kubeflow Pipelines takes 6, seconds first "
            f"(second minute hour day-of-month month day-of-week), e.g. '0 0 3 * * *' for 03:00 every day")
    for value, (name, lo, hi, names, any_ok) in zip(fields, _FIELDS):
        try:
            _cron_field(value, name, lo, hi, names, any_ok)
        except SubmitError as e:
            raise SubmitError(f"cron {text!r}: {e}") from None
    if not fields[0].isdigit():
        raise SubmitError(
            f"cron {text!r}: the seconds field {fields[0]!r} starts the pipeline several times a minute; "
            f"use one second, e.g. {' '.join(['0', *fields[1:]])!r}")
    return text


# --- parameters ----------------------------------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _load_spec(package_path: str | os.PathLike) -> dict:
    path = Path(package_path)
    if path.suffix not in (".yaml", ".yml"):
        raise SubmitError(f"{path}: expected a compiled pipeline YAML (kfp.compiler output, .yaml)")
    try:
        with open(path, encoding="utf-8") as f:
            spec = next(iter(yaml.safe_load_all(f)), None)  # a second document holds the platform spec
    except OSError as e:
        raise SubmitError(f"{path}: cannot read the compiled pipeline: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SubmitError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, dict) or "root" not in spec or "pipelineInfo" not in spec:
        raise SubmitError(f"{path}: not a compiled KFP v2 pipeline (no root / pipelineInfo)")
    return spec


def pipeline_name(package_path: str | os.PathLike) -> str:
    """The name the package was compiled with (`cafe`, `cafe-ablation`)."""
    return str(_load_spec(package_path)["pipelineInfo"].get("name", ""))


def pipeline_parameters(package_path: str | os.PathLike) -> dict[str, dict]:
    """The pipeline's parameters from the compiled YAML: name -> {parameterType, defaultValue?, isOptional?}."""
    spec = _load_spec(package_path)
    return dict((spec["root"].get("inputDefinitions") or {}).get("parameters") or {})


def _convert(name: str, kind: str, raw: str) -> Any:
    def bad(expected: str) -> SubmitError:
        return SubmitError(f"parameter {name}={raw!r}: expected {expected} ({kind})")

    if kind == "STRING":
        return raw
    if kind == "NUMBER_INTEGER":
        if not re.fullmatch(r"[+-]?\d+", raw.strip()):
            raise bad("an integer")
        return int(raw)
    if kind == "NUMBER_DOUBLE":
        try:
            value = float(raw)
        except ValueError:
            raise bad("a number") from None
        if not math.isfinite(value):
            raise bad("a finite number")
        return value
    if kind == "BOOLEAN":
        if raw.strip().lower() in _TRUE:
            return True
        if raw.strip().lower() in _FALSE:
            return False
        raise bad("true or false")
    if kind in ("LIST", "STRUCT"):
        py_type, example = (list, '["a", "b"]') if kind == "LIST" else (dict, '{"key": 1}')
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise bad(f"JSON such as {example}") from None
        if not isinstance(value, py_type):
            raise bad(f"a JSON {'array' if kind == 'LIST' else 'object'} such as {example}")
        return value
    raise SubmitError(f"parameter {name}: type {kind} cannot be set from the command line")


def parse_params(package_path: str | os.PathLike, items: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings -> the pipeline's typed parameters (STRING, NUMBER_INTEGER, NUMBER_DOUBLE, BOOLEAN,
    LIST and STRUCT as JSON). Unknown keys are refused with a did-you-mean and the pipeline's parameter list."""
    declared = pipeline_parameters(package_path)
    params: dict[str, Any] = {}
    for item in items:
        key, eq, raw = str(item).partition("=")
        key = key.strip()
        if not eq or not key:
            raise SubmitError(f"{item!r}: pipeline parameters are given as key=value")
        if key not in declared:
            close = difflib.get_close_matches(key, declared, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SubmitError(f"unknown pipeline parameter {key!r}: {hint}the pipeline takes: "
                              f"{', '.join(sorted(declared)) or '(no parameters)'}")
        if key in params:
            raise SubmitError(f"pipeline parameter {key!r} is given twice")
        params[key] = _convert(key, declared[key].get("parameterType", "STRING"), raw)
    return params


def with_namespace(package_path: str | os.PathLike, params: dict[str, Any], namespace: str | None) -> dict[str, Any]:
    """`params` plus namespace=<the profile namespace> where the pipeline has a `namespace` parameter that
    `params` does not set: the run's training job goes where the run is (what the profile's RBAC and
    Secrets allow), unless `namespace=...` says otherwise."""
    if namespace and "namespace" not in params and "namespace" in pipeline_parameters(package_path):
        return {**params, "namespace": namespace}
    return dict(params)


def _check_params(package_path: str | os.PathLike, params: dict[str, Any]) -> None:
    declared = pipeline_parameters(package_path)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise SubmitError(f"unknown pipeline parameters {unknown}: the pipeline takes: {', '.join(sorted(declared))}")
    missing = sorted(k for k, d in declared.items() if not d.get("isOptional") and k not in params)
    if missing:
        raise SubmitError(f"required pipeline parameters not given: {', '.join(f'{k}=...' for k in missing)}")


# --- Kubeflow Pipelines --------------------------------------------------------------------------------------


def _connect(host: str, namespace: str | None):
    import kfp

    kwargs: dict[str, Any] = {"host": host, "existing_token": os.environ.get(TOKEN_ENV) or None}
    if namespace:
        kwargs["namespace"] = namespace
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        return kfp.Client(**kwargs)


@contextlib.contextmanager
def _kfp_errors(host: str, what: str):
    """API and connection errors -> SubmitError naming the step and the server's answer."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as e:
        body = (e.body.decode(errors="replace") if isinstance(e.body, bytes) else str(e.body or "")).strip()
        hint = " (set KFP_TOKEN or check the service account's access)" if e.status in (401, 403) else ""
        raise SubmitError(f"{what}: Kubeflow Pipelines at {host} answered {e.status} {e.reason}{hint}: "
                          f"{body[:500]}") from None
    except (HTTPError, OSError, TimeoutError) as e:
        raise SubmitError(f"{what}: cannot reach Kubeflow Pipelines at {host}: {e}") from None


def _equals_filter(key: str, value: str) -> str:
    """A KFP list filter, in the form kfp.Client itself sends (operation 1 = EQUALS)."""
    return json.dumps({"predicates": [{"operation": 1, "key": key, "stringValue": value}]})


def default_version_name(package_path: str | os.PathLike) -> str:
    """UTC time plus the package's digest: unique per upload, and the same file is recognisable."""
    digest = hashlib.sha256(Path(package_path).read_bytes()).hexdigest()[:12]
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{digest}"


def _find_pipeline(client, name: str, namespace: str | None) -> str | None:
    found = client.list_pipelines(filter=_equals_filter("display_name", name), namespace=namespace, page_size=2)
    pipelines = found.pipelines or []
    if len(pipelines) > 1:
        raise SubmitError(f"several pipelines are named {name!r}: rename or delete one in the KFP UI")
    return pipelines[0].pipeline_id if pipelines else None


def _upload_version(client, host: str, package_path: str, pipeline_name: str, version_name: str | None,
                    namespace: str | None) -> tuple[str, str]:
    """(pipeline_id, version_id) of a new version of `pipeline_name` holding the package."""
    from kfp_server_api import V2beta1Pipeline
    from kfp_server_api.exceptions import ApiException

    version_name = version_name or default_version_name(package_path)
    with _kfp_errors(host, f"looking up pipeline {pipeline_name!r}"):
        pipeline_id = _find_pipeline(client, pipeline_name, namespace)
    if pipeline_id is None:
        with _kfp_errors(host, f"creating pipeline {pipeline_name!r}"):
            try:
                created = client.pipelines.pipeline_service_create_pipeline(
                    V2beta1Pipeline(display_name=pipeline_name, namespace=namespace,
                                    description="CAFe fine-tuning of LLaVA-OneVision (uploaded by cafe submit)"))
                pipeline_id = created.pipeline_id
            except ApiException as e:  # created by a concurrent submission in the meantime
                if e.status != 409:
                    raise
                pipeline_id = _find_pipeline(client, pipeline_name, namespace)
                if pipeline_id is None:
                    raise
    with _kfp_errors(host, f"uploading {package_path} as version {version_name!r} of {pipeline_name!r}"):
        version = client.upload_pipeline_version(str(package_path), version_name, pipeline_id=pipeline_id)
    return pipeline_id, version.pipeline_version_id


def _experiment_id(client, host: str, experiment: str, namespace: str | None) -> str:
    with _kfp_errors(host, f"getting or creating experiment {experiment!r}"):
        return client.create_experiment(experiment, namespace=namespace).experiment_id


def submit(host: str, package_path: str, pipeline_name: str, params: dict, experiment: str,
           version_name: str | None = None, namespace: str | None = None, client=None,
           run_name: str | None = None, service_account: str | None = None) -> SubmitResult:
    """Upload the compiled pipeline as a new version of `pipeline_name` (created on first use) and start one run of
    that version in `experiment` (created if missing) with `params` (typed, e.g. from parse_params).
    service_account: the Kubernetes service account the run's pods use (default: the profile's
    default-editor in multi-user Kubeflow)."""
    _check_params(package_path, params)
    host = host.rstrip("/")
    if client is None:
        with _kfp_errors(host, "connecting"):
            client = _connect(host, namespace)
    pipeline_id, version_id = _upload_version(client, host, package_path, pipeline_name, version_name, namespace)
    experiment_id = _experiment_id(client, host, experiment, namespace)
    name = run_name or f"{pipeline_name} {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S}Z"
    with _kfp_errors(host, f"starting a run of {pipeline_name!r}"):
        run = client.run_pipeline(experiment_id, name, params=dict(params), pipeline_id=pipeline_id,
                                  version_id=version_id, service_account=service_account)
    return SubmitResult(run.run_id, pipeline_id, version_id, f"{host}/#/runs/details/{run.run_id}")


def schedule(host: str, package_path: str, pipeline_name: str, cron: str, params: dict, experiment: str,
             job_name: str, namespace: str | None = None, client=None, version_name: str | None = None,
             service_account: str | None = None) -> ScheduleResult:
    """Upload a new version as submit() does, then create an enabled recurring run of it: the validated 6-field
    cron, no catch-up of missed intervals, one run at a time, its runs' pods under `service_account`. Refused
    when `experiment` already has a recurring run named `job_name` (two schedules would retrain twice): disable
    or delete that one first."""
    cron = validate_cron(cron)
    _check_params(package_path, params)
    host = host.rstrip("/")
    if client is None:
        with _kfp_errors(host, "connecting"):
            client = _connect(host, namespace)
    experiment_id = _experiment_id(client, host, experiment, namespace)
    with _kfp_errors(host, f"listing the recurring runs of experiment {experiment!r}"):
        existing = client.list_recurring_runs(experiment_id=experiment_id, page_size=2,
                                              filter=_equals_filter("display_name", job_name)).recurring_runs
    if existing:
        raise SubmitError(
            f"experiment {experiment!r} already has a recurring run named {job_name!r} "
            f"({host}/#/recurringrun/details/{existing[0].recurring_run_id}): delete or disable it in the KFP UI "
            f"(or `kfp recurring-run delete {existing[0].recurring_run_id}`), or choose another name")
    pipeline_id, version_id = _upload_version(client, host, package_path, pipeline_name, version_name, namespace)
    with _kfp_errors(host, f"creating recurring run {job_name!r}"):
        job = client.create_recurring_run(
            experiment_id, job_name, cron_expression=cron, max_concurrency=1, no_catchup=True, enabled=True,
            params=dict(params), pipeline_id=pipeline_id, version_id=version_id, service_account=service_account,
            description=f"{pipeline_name} on '{cron}' (cafe schedule)")
    return ScheduleResult(job.recurring_run_id, f"{host}/#/recurringrun/details/{job.recurring_run_id}",
                          pipeline_id, version_id)
