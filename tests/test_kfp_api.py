"""cafe_core.kfp_api: cron validation, typed pipeline parameters, and submit/schedule through the real kfp.Client
against a fake KFP REST API (http.server in a thread) that records what the client sent.

No `from __future__ import annotations` here: kfp reads the toy component's annotations as types.
"""

import email.parser
import email.policy
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from cafe_core.kfp_api import (
    ScheduleResult,
    SubmitError,
    SubmitResult,
    parse_params,
    pipeline_parameters,
    schedule,
    submit,
    validate_cron,
)

# --- cron ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr", [
    "0 0 3 * * *",                 # 03:00 every day
    "0 0 9 ? * 2-6",               # the kfp docstring's example
    "0 */15 * * * *",              # every quarter hour
    "0 30 2 1,15 * *",             # 1st and 15th at 02:30
    "0 0 4 * * mon-fri",           # names, lower case
    "0 0 4 * JAN-MAR SUN",         # names, upper case
    "0 0 4 * Jul,Dec Sat",         # names, mixed case, lists
    "30 5 0-23/6 * * *",           # range with step
    "59 59 23 31 12 6",            # every maximum
    "0 0 0 1 1 0",                 # every minimum
    "0 0 3/2 * * *",               # N/STEP: from N to the end
    "0 0 3 ? * *",
    "@daily", "@hourly", "@weekly", "@monthly", "@yearly", "@annually", "@midnight",
    "@every 24h", "@every 1h30m", "@every 90m", "@every 1.5h",
])
def test_valid_cron(expr):
    assert validate_cron(expr) == expr


def test_cron_is_normalised():
    assert validate_cron("  0  0 3 *\t* *  ") == "0 0 3 * * *"


@pytest.mark.parametrize("five, six", [
    ("0 3 * * *", "0 0 3 * * *"),
    ("*/5 * * * *", "0 */5 * * * *"),
    ("30 2 * * mon-fri", "0 30 2 * * mon-fri"),
])
def test_five_fields_refused_with_six_field_equivalent(five, six):
    with pytest.raises(SubmitError) as e:
        validate_cron(five)
    msg = str(e.value)
    assert "5 fields" in msg and "seconds first" in msg and f"did you mean {six!r}" in msg
    assert validate_cron(six) == six


def test_five_fields_that_are_wrong_anyway_say_so():
    with pytest.raises(SubmitError, match=r"'0 0 25 \* \* \*', which is still wrong: .*hour field: 25 is out of range"):
        validate_cron("0 25 * * *")


@pytest.mark.parametrize("expr, fragment", [
    ("", "empty cron"),
    ("0 0 3 * *  * 2025", "7 fields"),
    ("0 3 *", "3 fields"),
    ("0 60 * * * *", "minute field: 60 is out of range 0-59"),
    ("60 0 * * * *", "second field: 60 is out of range 0-59"),
    ("0 0 24 * * *", "hour field: 24 is out of range 0-23"),
    ("0 0 3 0 * *", "day-of-month field: 0 is out of range 1-31"),
    ("0 0 3 32 * *", "day-of-month field: 32 is out of range 1-31"),
    ("0 0 3 * 13 *", "month field: 13 is out of range 1-12"),
    ("0 0 3 * 0 *", "month field: 0 is out of range 1-12"),
    ("0 0 3 * * 7", "day-of-week field: 7 is out of range 0-6"),
    ("0 0 3 * foo *", "month field: 'foo' is not a number 1-12, or a name (JAN/"),
    ("0 0 3 * * funday", "day-of-week field: 'funday' is not a number 0-6, or a name (SUN/"),
    ("0 0 mon * * *", "hour field: 'mon' is not a number"),   # names only where the field has them
    ("0 0 5-1 * * *", "range start 5 is after its end 1"),
    ("0 0 */0 * * *", "the step must be a positive number"),
    ("0 0 */ * * *", "the step must be a positive number"),
    ("0 0 */x * * *", "the step must be a positive number"),
    ("0 0 1/2/3 * * *", "more than one '/'"),
    ("0 0 1-2-3 * * *", "'2-3' is not a number"),
    ("0 0 1,,2 * * *", "empty list element"),
    ("0 0 -1 * * *", "'' is not a number"),
    ("0 0 +3 * * *", "'+3' is not a number"),
    ("0 0 ? * * *", "'?' is only allowed in the day-of-month and day-of-week"),
    ("* 0 3 * * *", "seconds field '*' starts the pipeline several times a minute"),
    ("*/10 0 3 * * *", "several times a minute"),
    ("0,30 0 3 * * *", "several times a minute"),
    ("@every 10s", "more than once a minute"),
    ("@every soon", "not a duration"),
    ("@every", "unknown cron descriptor"),
    ("@fortnightly", "unknown cron descriptor"),
    ("@DAILY", "unknown cron descriptor"),
    ("TZ=UTC 0 0 3 * * *", "7 fields"),
])
def test_invalid_cron(expr, fragment):
    with pytest.raises(SubmitError) as e:
        validate_cron(expr)
    assert fragment in str(e.value)


# --- parameters ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """A toy pipeline with one parameter of every type, compiled with kfp (the project's pipelines are not used)."""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")
    def echo(s: str, i: int, f: float, b: bool, l: list, d: dict) -> str:
        return s

    @dsl.pipeline(name="toy-cafe")
    def toy(run_id: str, a_con: float = 10.0, max_steps: int = 100, dry_run: bool = False,
            eval_sets: list = ["retrieval"], extra: dict = {"k": 1}, note: str = ""):
        echo(s=run_id, i=max_steps, f=a_con, b=dry_run, l=eval_sets, d=extra)

    path = tmp_path_factory.mktemp("pkg") / "toy.yaml"
    compiler.Compiler().compile(toy, str(path))
    return str(path)


def test_pipeline_parameters(package):
    params = pipeline_parameters(package)
    assert {k: v["parameterType"] for k, v in params.items()} == {
        "run_id": "STRING", "a_con": "NUMBER_DOUBLE", "max_steps": "NUMBER_INTEGER", "dry_run": "BOOLEAN",
        "eval_sets": "LIST", "extra": "STRUCT", "note": "STRING"}


def test_parse_params_converts_to_declared_types(package):
    got = parse_params(package, [
        "run_id=r7", "a_con=10", "max_steps=250", "dry_run=TRUE", 'eval_sets=["pope", "mmeb"]',
        'extra={"a": {"b": [1, 2]}}', "note=x=y z"])
    assert got == {"run_id": "r7", "a_con": 10.0, "max_steps": 250, "dry_run": True,
                   "eval_sets": ["pope", "mmeb"], "extra": {"a": {"b": [1, 2]}}, "note": "x=y z"}
    assert type(got["a_con"]) is float and type(got["max_steps"]) is int and got["dry_run"] is True
    assert parse_params(package, ["dry_run=no", "note=", "a_con=-1.5e-3", "max_steps=-3"]) == {
        "dry_run": False, "note": "", "a_con": -1.5e-3, "max_steps": -3}
    assert parse_params(package, []) == {}


def test_parse_params_unknown_key_did_you_mean(package):
    with pytest.raises(SubmitError) as e:
        parse_params(package, ["a_conn=10"])
    msg = str(e.value)
    assert "unknown pipeline parameter 'a_conn'" in msg and "did you mean 'a_con'?" in msg
    assert "a_con, dry_run, eval_sets, extra, max_steps, note, run_id" in msg
    with pytest.raises(SubmitError, match="unknown pipeline parameter 'zzz': the pipeline takes"):
        parse_params(package, ["zzz=1"])


@pytest.mark.parametrize("item, fragment", [
    ("max_steps=1.5", "expected an integer (NUMBER_INTEGER)"),
    ("max_steps=ten", "expected an integer"),
    ("a_con=abc", "expected a number (NUMBER_DOUBLE)"),
    ("a_con=nan", "expected a finite number"),
    ("a_con=inf", "expected a finite number"),
    ("dry_run=maybe", "expected true or false (BOOLEAN)"),
    ("eval_sets=pope", "expected JSON such as"),
    ('eval_sets={"a": 1}', "expected a JSON array"),
    ("extra=[1]", "expected a JSON object"),
    ("run_id", "are given as key=value"),
    ("=5", "are given as key=value"),
])
def test_parse_params_bad_values(package, item, fragment):
    with pytest.raises(SubmitError) as e:
        parse_params(package, [item])
    assert fragment in str(e.value)


def test_parse_params_refuses_duplicates_and_non_packages(package, tmp_path):
    with pytest.raises(SubmitError, match="given twice"):
        parse_params(package, ["note=a", "note=b"])
    with pytest.raises(SubmitError, match="expected a compiled pipeline YAML"):
        parse_params(tmp_path / "p.json", [])
    with pytest.raises(SubmitError, match="cannot read"):
        parse_params(tmp_path / "missing.yaml", [])
    (tmp_path / "other.yaml").write_text("a: 1\n")
    with pytest.raises(SubmitError, match="not a compiled KFP v2 pipeline"):
        parse_params(tmp_path / "other.yaml", [])


# --- a fake KFP API --------------------------------------------------------------------------------------------


class FakeKFP:
    """Just the v2beta1 endpoints kfp.Client 2.17 calls for submit and schedule, with in-memory state."""

    def __init__(self):
        self.requests: list[dict] = []
        self.pipelines: list[dict] = []
        self.versions: list[dict] = []
        self.experiments: list[dict] = []
        self.runs: list[dict] = []
        self.recurring: list[dict] = []
        self.fail: dict[tuple[str, str], int] = {}   # (method, path) -> HTTP status to answer instead
        self.lock = threading.Lock()

    @staticmethod
    def _matches(item: dict, query: dict) -> bool:
        for pred in json.loads(query.get("filter", ["{}"])[0]).get("predicates", []):
            assert pred["operation"] in (1, "EQUALS"), pred
            if item.get(pred["key"]) != pred.get("stringValue", pred.get("string_value")):
                return False
        return True

    def handle(self, method: str, path: str, query: dict, headers, body: bytes) -> tuple[int, dict]:
        record = {"method": method, "path": path, "query": query, "headers": {k.lower(): v for k, v in headers.items()},
                  "body": body}
        with self.lock:
            self.requests.append(record)
            if (method, path) in self.fail:
                return self.fail[(method, path)], {"error": "injected failure", "code": 3}
            n = len(self.requests)
            if (method, path) == ("GET", "/apis/v2beta1/healthz"):
                return 200, {"multi_user": False, "pipeline_store": "database"}
            if (method, path) == ("GET", "/apis/v2beta1/pipelines"):
                found = [p for p in self.pipelines if self._matches(p, query)]
                return 200, {"pipelines": found, "total_size": len(found)} if found else {}
            if (method, path) == ("POST", "/apis/v2beta1/pipelines"):
                pipeline = json.loads(body)
                if any(p["display_name"] == pipeline["display_name"] for p in self.pipelines):
                    return 409, {"error": "already exists", "code": 6}
                pipeline["pipeline_id"] = f"pipeline-{n}"
                self.pipelines.append(pipeline)
                return 200, pipeline
            if (method, path) == ("POST", "/apis/v2beta1/pipelines/upload_version"):
                pipeline_id = query["pipelineid"][0]
                assert any(p["pipeline_id"] == pipeline_id for p in self.pipelines), pipeline_id
                msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                files = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                         for part in msg.iter_parts()}
                version = {"pipeline_id": pipeline_id, "pipeline_version_id": f"version-{n}",
                           "display_name": query["name"][0]}
                self.versions.append({**version, "package": files["uploadfile"]})
                return 200, version
            if (method, path) == ("GET", "/apis/v2beta1/experiments"):
                found = [e for e in self.experiments if self._matches(e, query)]
                return 200, {"experiments": found, "total_size": len(found)} if found else {}
            if (method, path) == ("POST", "/apis/v2beta1/experiments"):
                experiment = {**json.loads(body), "experiment_id": f"experiment-{n}"}
                self.experiments.append(experiment)
                return 200, experiment
            if (method, path) == ("POST", "/apis/v2beta1/runs"):
                run = {**json.loads(body), "run_id": f"run-{n}", "state": "PENDING"}
                self.runs.append(run)
                return 200, run
            if (method, path) == ("GET", "/apis/v2beta1/recurringruns"):
                found = [r for r in self.recurring if self._matches(r, query)
                         and r["experiment_id"] == query.get("experiment_id", [r["experiment_id"]])[0]]
                return 200, {"recurringRuns": found, "total_size": len(found)} if found else {}
            if (method, path) == ("POST", "/apis/v2beta1/recurringruns"):
                job = {**json.loads(body), "recurring_run_id": f"job-{n}", "status": "ENABLED"}
                self.recurring.append(job)
                return 200, job
            return 404, {"error": f"no route {method} {path}", "code": 5}

    def of(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]


@pytest.fixture
def kfp_api(monkeypatch, tmp_path):
    """The fake API on a loopback port; stopped (and its thread joined) after the test."""
    import kfp.client.client as kfp_client

    for var in ("KFP_TOKEN", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
                "KF_PIPELINES_APP_OAUTH2_CLIENT_ID", "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    # kfp.Client reads (and in multi-user mode writes) ~/.config/kfp/context.json: keep the user's out of it.
    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    fake = FakeKFP()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            url = urlsplit(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                status, payload = fake.handle(self.command, url.path, parse_qs(url.query, keep_blank_values=True),
                                              self.headers, body)
            except Exception as e:  # a broken request shows in the test, not as a hang
                status, payload = 500, {"error": repr(e)}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.host = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    assert not thread.is_alive()


PARAMS = {"run_id": "r7", "a_con": 10.0, "max_steps": 250, "dry_run": True, "eval_sets": ["pope"]}


def test_submit_uploads_a_version_and_runs_it(kfp_api, package):
    result = submit(kfp_api.host + "/", package, "cafe-finetune", PARAMS, "cafe", version_name="v-abc")

    assert isinstance(result, SubmitResult)
    [pipeline] = kfp_api.pipelines
    assert pipeline["display_name"] == "cafe-finetune"
    [version] = kfp_api.versions
    assert version["display_name"] == "v-abc" and version["pipeline_id"] == pipeline["pipeline_id"]
    assert version["package"] == open(package, "rb").read()
    [experiment] = kfp_api.experiments
    assert experiment["display_name"] == "cafe"
    [run] = kfp_api.runs
    assert run["experiment_id"] == experiment["experiment_id"]
    assert run["pipeline_version_reference"] == {"pipeline_id": pipeline["pipeline_id"],
                                                 "pipeline_version_id": version["pipeline_version_id"]}
    assert "pipeline_spec" not in run   # the run points at the uploaded version, not an inline copy
    assert run["runtime_config"]["parameters"] == PARAMS
    assert run["display_name"].startswith("cafe-finetune ")
    assert result == SubmitResult(run["run_id"], pipeline["pipeline_id"], version["pipeline_version_id"],
                                  f"{kfp_api.host}/#/runs/details/{run['run_id']}")
    assert all("authorization" not in r["headers"] for r in kfp_api.requests)

    # Second submission: same pipeline and experiment, a new version with a generated name, a new run.
    again = submit(kfp_api.host, package, "cafe-finetune", {"run_id": "r8"}, "cafe", run_name="retry")
    assert len(kfp_api.pipelines) == 1 and len(kfp_api.experiments) == 1
    assert len(kfp_api.of("POST", "/apis/v2beta1/pipelines")) == 1
    assert again.pipeline_id == result.pipeline_id and again.version_id != result.version_id
    digest = hashlib.sha256(open(package, "rb").read()).hexdigest()[:12]
    assert kfp_api.versions[1]["display_name"].endswith("-" + digest)
    assert kfp_api.runs[1]["display_name"] == "retry"
    assert kfp_api.runs[1]["runtime_config"]["parameters"] == {"run_id": "r8"}
    assert kfp_api.runs[1]["pipeline_version_reference"]["pipeline_version_id"] == again.version_id


def test_schedule_creates_recurring_run(kfp_api, package, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "secret-token")
    result = schedule(kfp_api.host, package, "cafe-finetune", "0  0 3 * * *", PARAMS, "cafe-nightly",
                      "nightly-retrain")

    assert isinstance(result, ScheduleResult)
    [job] = kfp_api.recurring
    [version] = kfp_api.versions
    [experiment] = kfp_api.experiments
    assert job["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert job["no_catchup"] is True and int(job["max_concurrency"]) == 1 and job["mode"] == "ENABLE"
    assert job["display_name"] == "nightly-retrain" and job["experiment_id"] == experiment["experiment_id"]
    assert job["pipeline_version_reference"] == {"pipeline_id": version["pipeline_id"],
                                                 "pipeline_version_id": version["pipeline_version_id"]}
    assert job["runtime_config"]["parameters"] == PARAMS
    url = f"{kfp_api.host}/#/recurringrun/details/{job['recurring_run_id']}"
    assert result == ScheduleResult(job["recurring_run_id"], url, version["pipeline_id"],
                                    version["pipeline_version_id"])
    assert {r["headers"].get("authorization") for r in kfp_api.requests} == {"Bearer secret-token"}
    assert not kfp_api.runs

    # A second schedule of the same name would retrain twice a night: refused, and nothing uploaded.
    with pytest.raises(SubmitError, match="already has a recurring run named 'nightly-retrain'"):
        schedule(kfp_api.host, package, "cafe-finetune", "0 0 4 * * *", PARAMS, "cafe-nightly", "nightly-retrain")
    assert len(kfp_api.recurring) == 1 and len(kfp_api.versions) == 1


def test_bad_input_is_refused_before_any_request(kfp_api, package):
    with pytest.raises(SubmitError, match="did you mean '0 0 3 \\* \\* \\*'"):
        schedule(kfp_api.host, package, "cafe-finetune", "0 3 * * *", PARAMS, "cafe", "nightly")
    with pytest.raises(SubmitError, match=r"required pipeline parameters not given: run_id=\.\.\."):
        submit(kfp_api.host, package, "cafe-finetune", {"a_con": 1.0}, "cafe")
    with pytest.raises(SubmitError, match=r"unknown pipeline parameters \['a_conn'\]"):
        submit(kfp_api.host, package, "cafe-finetune", {"run_id": "r", "a_conn": 1.0}, "cafe")
    assert kfp_api.requests == []


def test_server_errors_name_the_step(kfp_api, package):
    kfp_api.fail[("POST", "/apis/v2beta1/runs")] = 400
    with pytest.raises(SubmitError, match=r"starting a run of 'cafe-finetune': Kubeflow Pipelines at .* answered 400"):
        submit(kfp_api.host, package, "cafe-finetune", PARAMS, "cafe")
    kfp_api.fail[("POST", "/apis/v2beta1/pipelines/upload_version")] = 403
    with pytest.raises(SubmitError, match="uploading .* answered 403 .*set KFP_TOKEN"):
        submit(kfp_api.host, package, "cafe-finetune", PARAMS, "cafe")


def test_pipeline_created_concurrently_is_reused(kfp_api, package):
    """Another submission created the pipeline between our lookup and our create: its id is used."""
    import kfp

    with pytest.warns(FutureWarning):
        client = kfp.Client(host=kfp_api.host)
    real_list = client.list_pipelines
    calls = []

    def list_then_race(**kw):
        calls.append(kw)
        if len(calls) == 1:   # our first lookup sees nothing; then the other submission creates it
            answer = real_list(**kw)
            kfp_api.pipelines.append({"display_name": "cafe-finetune", "pipeline_id": "pipeline-other"})
            return answer
        return real_list(**kw)

    client.list_pipelines = list_then_race
    result = submit(kfp_api.host, package, "cafe-finetune", PARAMS, "cafe", client=client)
    assert result.pipeline_id == "pipeline-other" and kfp_api.versions[0]["pipeline_id"] == "pipeline-other"
    assert len(kfp_api.of("POST", "/apis/v2beta1/pipelines")) == 1 and len(kfp_api.pipelines) == 1   # 409, looked again


@pytest.mark.timeout(120)  # an endless retry would hang here; the answer comes in about a second
def test_unreachable_host(package, monkeypatch, tmp_path):
    import kfp.client.client as kfp_client

    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SubmitError, match=f"cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}"):
        submit(f"http://127.0.0.1:{port}", package, "cafe-finetune", PARAMS, "cafe")


def test_runs_use_the_given_service_account(kfp_api, package):
    """--service-account: the run's pods (and a recurring run's) use the profile's dedicated account."""
    submit(kfp_api.host, package, "cafe-finetune", PARAMS, "cafe", service_account="cafe-pipeline")
    schedule(kfp_api.host, package, "cafe-finetune", "0 0 3 * * *", PARAMS, "cafe", "nightly",
             service_account="cafe-pipeline")
    submit(kfp_api.host, package, "cafe-finetune", PARAMS, "cafe")
    assert kfp_api.runs[0]["service_account"] == "cafe-pipeline"
    assert kfp_api.recurring[0]["service_account"] == "cafe-pipeline"
    assert "service_account" not in kfp_api.runs[1]  # not given: KFP's own default (default-editor)


def test_the_profile_namespace_is_the_training_jobs_unless_a_parameter_says_otherwise(package):
    from cafe_core.kfp_api import with_namespace
    from pipelines.compile import COMPILED

    cafe = COMPILED / "cafe.yaml"
    assert with_namespace(cafe, {"max_steps": 5}, "team-a") == {"max_steps": 5, "namespace": "team-a"}
    assert with_namespace(cafe, {"namespace": "team-b"}, "team-a") == {"namespace": "team-b"}
    assert with_namespace(cafe, {"max_steps": 5}, None) == {"max_steps": 5}
    assert with_namespace(package, {"run_id": "r"}, "team-a") == {"run_id": "r"}  # a pipeline without one


def test_submit_command_passes_namespace_and_service_account(kfp_api, cafe_main, capsys):
    assert cafe_main("submit", "--host", kfp_api.host, "--namespace", "team-a", "--service-account", "cafe-pipeline",
                     "max_steps=5") == 0, capsys.readouterr().err
    [run] = kfp_api.runs
    assert run["runtime_config"]["parameters"] == {"max_steps": 5, "namespace": "team-a"}
    assert run["service_account"] == "cafe-pipeline"
    assert cafe_main("submit", "--host", kfp_api.host, "--namespace", "team-a", "namespace=team-b") == 0
    assert kfp_api.runs[1]["runtime_config"]["parameters"] == {"namespace": "team-b"}
