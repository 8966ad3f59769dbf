"""Ask the CI to promote a decision: start its promote workflow through GitHub's workflow_dispatch API.

    POST {api_url}/repos/{owner}/{name}/actions/workflows/{workflow}/dispatches
    {"ref": "main", "inputs": {"decision_uri": "s3://.../gate/decision.json", "config": "configs/cluster.yaml"}}

The token (a fine-grained token with "Actions: read and write" on the repository, or a GitHub App's) comes
from the environment variable CAFE_CI_TOKEN, which the pipeline fills from a Secret; it is sent only in the
Authorization header and never printed. The workflow's environment can require a reviewer's approval before
the promotion runs, and it alone holds the registry-write credential.
"""

from __future__ import annotations

import json
import os
import shlex
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from cafe_core.config import CiConfig
from cafe_core.errors import BadInput, StageFailed

TOKEN_ENV = "CAFE_CI_TOKEN"
API_VERSION = "2022-11-28"
ATTEMPTS = 3  # a 5xx or a dropped connection is tried again; a dispatch sent twice only queues a no-op promotion


class CiRequestError(BadInput, RuntimeError):
    """The CI refused the request for a reason the configuration or the token must fix."""


class CiUnavailable(StageFailed, RuntimeError):
    """The CI did not answer, or answered with a server error, after the retries."""


@dataclass(frozen=True)
class Dispatched:
    url: str  # the workflow's page, to watch the run and approve it
    run_url: str | None  # the run itself, when GitHub says which one it started


def gh_command(decision_uri: str, workflow: str = "promote.yml", config: str | None = None,
               repository: str | None = None, ref: str | None = None) -> str:
    """The `gh workflow run` command that requests the same promotion by hand."""
    words = ["gh", "workflow", "run", workflow]
    if repository:
        words += ["--repo", repository]
    if ref:
        words += ["--ref", ref]
    words += ["-f", f"decision_uri={decision_uri}"]
    if config:
        words += ["-f", f"config={config}"]
    return shlex.join(words)


def dispatch_request(ci: CiConfig, decision_uri: str, token: str) -> urllib.request.Request:
    """The HTTP request that starts the workflow (pure: built here, sent by `dispatch`)."""
    url = f"{ci.api_url}/repos/{ci.repository}/actions/workflows/{ci.workflow}/dispatches"
    body = {"ref": ci.ref, "inputs": {"decision_uri": decision_uri, "config": ci.config}}
    return urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Accept": "application/vnd.github+json",
        "Authorization": f"Bearer {token}",
        "X-GitHub-Api-Version": API_VERSION,
        "Content-Type": "application/json",
        "User-Agent": "cafe-request-promotion",
    })


def refusal(ci: CiConfig, status: int, message: str) -> str:
    """What a 4xx answer means for this request, and the fix."""
    where = f"{ci.repository} workflow {ci.workflow} at {ci.ref}"
    said = f" (GitHub: {message})" if message else ""
    if status == 401:
        return (f"the CI token was refused (401){said}: {TOKEN_ENV} is invalid or expired; renew it and update "
                "the Secret the pipeline reads it from")
    if status == 403:
        return (f"the CI token may not start {where} (403){said}: give it 'Actions: read and write' on "
                f"{ci.repository} (fine-grained token or GitHub App), or authorize it for the organisation's SSO")
    if status == 404:
        return (f"{where} not found (404){said}: check promote.ci.repository and promote.ci.workflow (the file name "
                f"in .github/workflows), and that the token can see {ci.repository}")
    if status == 422:
        return (f"GitHub would not start {where} (422){said}: check that promote.ci.ref exists, that the workflow "
                "has a workflow_dispatch trigger, and that its inputs are decision_uri and config")
    return f"GitHub refused to start {where} ({status}){said}"


def dispatch(ci: CiConfig, decision_uri: str, token: str | None = None, timeout: float = 30.0) -> Dispatched:
    """Start the promote workflow for `decision_uri`. Raises CiRequestError (4xx, a missing token) or
    CiUnavailable (no answer or 5xx after ATTEMPTS tries)."""
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    by_hand = gh_command(decision_uri, ci.workflow, ci.config, ci.repository, ci.ref)
    if not token.strip():
        raise CiRequestError(f"{TOKEN_ENV} is not set: the pipeline fills it from a Secret holding a token that may "
                             f"start workflows of {ci.repository}; or run `{by_hand}`")
    page = f"{web_url(ci.api_url)}/{ci.repository}/actions/workflows/{ci.workflow}"
    problem = ""
    for attempt in range(ATTEMPTS):
        try:
            with urllib.request.urlopen(dispatch_request(ci, decision_uri, token.strip()), timeout=timeout) as resp:
                body = resp.read()
            run = json.loads(body).get("html_url") if body.strip() else None  # 200 + run details on newer APIs
            return Dispatched(page, run)
        except urllib.error.HTTPError as e:
            message = _message(e)
            if e.code < 500:
                raise CiRequestError(refusal(ci, e.code, message)) from None
            problem = f"{e.code} {message}".strip()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            problem = str(getattr(e, "reason", e))
        if attempt + 1 < ATTEMPTS:
            time.sleep(2 ** attempt)
    raise CiUnavailable(f"{ci.api_url} did not take the request after {ATTEMPTS} attempts ({problem}); try again, "
                        f"or run `{by_hand}`")


def web_url(api_url: str) -> str:
    """The web address behind an API address: api.github.com -> github.com, HOST/api/v3 -> HOST (Enterprise)."""
    if api_url.endswith("/api/v3"):
        return api_url[: -len("/api/v3")]
    return api_url.replace("://api.github.com", "://github.com")


def _message(err: urllib.error.HTTPError) -> str:
    """GitHub's own one-line reason from an error body (JSON with `message`), if any."""
    try:
        return str(json.loads(err.read() or b"{}").get("message", ""))[:300]
    except (ValueError, AttributeError, OSError):
        return ""
