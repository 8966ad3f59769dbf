"""Starting the CI's promote workflow: the exact workflow_dispatch request GitHub receives (against a local
stand-in for its API), each refusal's message and fix, retries, and the token never shown."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cafe_core import ci_trigger
from cafe_core.ci_trigger import CiRequestError, CiUnavailable, dispatch, gh_command, web_url
from cafe_core.config import CiConfig

TOKEN = "github_pat_11AAAA_secretvalue"
DECISION = "s3://cafe/runs/r7/gate/decision.json"


class FakeGitHub:
    """Answers POSTs with the queued statuses (204 once the queue is empty) and records each request."""

    def __init__(self, statuses=(), body: dict | None = None):
        self.statuses = list(statuses)
        self.body = body
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                fake.requests.append({"path": self.path, "headers": headers, "body": json.loads(data)})
                status = fake.statuses.pop(0) if fake.statuses else 204
                answer = b"" if status == 204 else json.dumps(
                    fake.body if status < 300 else {"message": f"said {status}",
                                                    "documentation_url": "https://docs.github.com"}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def ci(api_url: str, **kw) -> CiConfig:
    return CiConfig(api_url=api_url, repository="acme/cafe", **{"config": "configs/cluster.yaml", **kw})


def test_the_request_github_receives(monkeypatch):
    monkeypatch.setenv("CAFE_CI_TOKEN", TOKEN + "\n")  # a Secret's value often ends with a newline
    with FakeGitHub() as gh:
        sent = dispatch(ci(gh.url, ref="release"), DECISION)
    (req,) = gh.requests
    assert req["path"] == "/repos/acme/cafe/actions/workflows/promote.yml/dispatches"
    assert req["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert req["headers"]["accept"] == "application/vnd.github+json"
    assert req["headers"]["x-github-api-version"] == "2022-11-28"
    assert req["body"] == {"ref": "release", "inputs": {"decision_uri": DECISION, "config": "configs/cluster.yaml"}}
    assert sent.url == f"{gh.url}/acme/cafe/actions/workflows/promote.yml" and sent.run_url is None


def test_a_run_url_in_the_answer_is_returned():
    run = "https://github.com/acme/cafe/actions/runs/7"
    with FakeGitHub([200], body={"workflow_run_id": 7, "html_url": run}) as gh:
        sent = dispatch(ci(gh.url), DECISION, token=TOKEN)
    assert sent.run_url == run


@pytest.mark.parametrize("status, says", [
    (401, r"CI token was refused \(401\) \(GitHub: said 401\): CAFE_CI_TOKEN is invalid or expired"),
    (403, r"may not start acme/cafe workflow promote.yml at main \(403\).*'Actions: read and write'"),
    (404, r"acme/cafe workflow promote.yml at main not found \(404\).*promote.ci.repository and promote.ci.workflow"),
    (422, r"would not start .* \(422\).*promote.ci.ref exists.*workflow_dispatch.*decision_uri and config"),
])
def test_refusals_name_the_fix_and_never_the_token(status, says, capsys):
    with FakeGitHub([status]) as gh:
        with pytest.raises(CiRequestError, match=says) as err:
            dispatch(ci(gh.url), DECISION, token=TOKEN)
    assert len(gh.requests) == 1  # a refusal is not retried
    assert TOKEN not in str(err.value) and TOKEN not in "".join(capsys.readouterr())


def test_server_errors_are_retried_then_reported(monkeypatch):
    monkeypatch.setattr(ci_trigger.time, "sleep", lambda s: None)
    with FakeGitHub([502, 503]) as gh:
        dispatch(ci(gh.url), DECISION, token=TOKEN)  # the third attempt gets 204
    assert len(gh.requests) == 3
    with FakeGitHub([500, 500, 500]) as gh:
        with pytest.raises(CiUnavailable, match=r"did not take the request after 3 attempts \(500 said 500\); "
                                                r"try again, or run `gh workflow run promote.yml --repo acme/cafe"):
            dispatch(ci(gh.url), DECISION, token=TOKEN)


def test_unreachable_api_is_reported(monkeypatch):
    monkeypatch.setattr(ci_trigger.time, "sleep", lambda s: None)
    from cafe_core.ports import free_port

    with pytest.raises(CiUnavailable, match="did not take the request after 3 attempts"):
        dispatch(ci(f"http://127.0.0.1:{free_port()}"), DECISION, token=TOKEN)


def test_missing_token_names_the_variable_and_the_command(monkeypatch):
    monkeypatch.delenv("CAFE_CI_TOKEN", raising=False)
    with pytest.raises(CiRequestError, match=r"CAFE_CI_TOKEN is not set: .*`gh workflow run promote.yml "
                                             r"--repo acme/cafe --ref main -f decision_uri=s3://"):
        dispatch(ci("http://127.0.0.1:9"), DECISION)


def test_gh_command_and_web_addresses():
    assert gh_command(DECISION) == f"gh workflow run promote.yml -f decision_uri={DECISION}"
    assert gh_command("s3://b/a b/decision.json", config="configs/x.yaml") == (
        "gh workflow run promote.yml -f 'decision_uri=s3://b/a b/decision.json' -f config=configs/x.yaml")
    assert web_url("https://api.github.com") == "https://github.com"
    assert web_url("https://ghe.example.com/api/v3") == "https://ghe.example.com"
