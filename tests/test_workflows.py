"""The GitHub Actions workflows in .github/workflows: triggers, the CI entry point, and the promotion/rollback jobs'
safety (inputs through env only, credentials from secrets, one registry change at a time, an approval environment)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cafe_core.config import CiConfig

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
S3_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
# `uses: owner/repo[/path]@<full commit SHA> # vX.Y.Z`: a tag can be moved to other code, a commit cannot; the
# comment says which release the SHA is, for the reader and for update tools.
PINNED_USES = re.compile(r"uses:\s*(?P<action>[\w.-]+/[\w.-]+(?:/[\w./-]+)?)@(?P<sha>[0-9a-f]{40})\s+#\s*v\d+\.\d+\.\d+\s*$")


def load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(doc, dict), name
    if True in doc:   # PyYAML reads the key `on` as the boolean True (YAML 1.1)
        doc["on"] = doc.pop(True)
    return doc


def triggers(doc: dict) -> dict:
    on = doc["on"]
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return {t: None for t in on}
    return on


def steps(doc: dict) -> list[tuple[str, dict, dict]]:
    """(job name, job, step) for every step of every job."""
    return [(name, job, step) for name, job in doc["jobs"].items() for step in job.get("steps", [])]


def all_workflows() -> list[str]:
    return sorted(p.name for p in WORKFLOWS.glob("*.yml")) + sorted(p.name for p in WORKFLOWS.glob("*.yaml"))


def test_the_three_workflows_exist():
    assert {"test.yml", "promote.yml", "rollback.yml"} <= set(all_workflows())


@pytest.mark.parametrize("name", all_workflows())
def test_no_expressions_inside_run_scripts(name):
    """Script injection: `${{ inputs.x }}` in a run: is pasted into the script before the shell sees it. Every value
    reaches a script through env: instead (and then only as a quoted "$VAR")."""
    for job_name, _, step in steps(load(name)):
        script = step.get("run")
        if script is None:
            continue
        assert "${{" not in script, f"{name} job {job_name} step {step.get('name')!r}: expression inside run:"
        for banned in ("inputs.", "github.event.inputs", "github.event.", "github.head_ref"):
            assert banned not in script, f"{name}: {banned} used inside run:"
        if "|" in re.sub(r"\|\|", "", script):   # a pipeline must not hide a failing command
            assert step.get("shell") == "bash", f"{name} step {step.get('name')!r}: pipe without shell: bash (pipefail)"


@pytest.mark.parametrize("name", all_workflows())
def test_setup_python_is_311_and_permissions_are_read_only(name):
    doc = load(name)
    assert doc.get("permissions") == {"contents": "read"}, f"{name}: least-privilege token"
    for job_name, job in doc["jobs"].items():
        assert "permissions" not in job, f"{name} job {job_name}: widens the workflow's read-only token"
    for _, job, step in steps(doc):
        uses = step.get("uses", "")
        if uses.startswith("actions/setup-python@"):
            version = step["with"]["python-version"]
            assert version == "3.11" and isinstance(version, str), f"{name}: python-version must be the string '3.11'"
            # Cached wheels only where no secret is in reach: the registry jobs install fresh.
            assert step["with"].get("cache") == ("pip" if name == "test.yml" else None), f"{name}: pip cache"
        assert "timeout-minutes" in job


@pytest.mark.parametrize("name", all_workflows())
def test_actions_are_pinned_to_a_commit_and_checkouts_keep_no_token(name):
    doc = load(name)
    used = [step["uses"] for _, _, step in steps(doc) if "uses" in step]
    assert used, f"{name}: no action used (checkout expected)"
    lines = [line.strip() for line in (WORKFLOWS / name).read_text().splitlines()]
    uses_lines = [line.removeprefix("- ") for line in lines if re.match(r"(- )?uses:", line)]
    assert len(uses_lines) == len(used), f"{name}: every uses: on its own line"
    for line in uses_lines:
        assert PINNED_USES.fullmatch(line), (
            f"{name}: {line!r}: pin to a full commit SHA with the release in a comment, e.g. "
            "`uses: actions/checkout@<40 hex digits> # v4.4.0` (git rev-parse 'v4.4.0^{commit}' in its repository)")
    for _, _, step in steps(doc):
        if step.get("uses", "").startswith("actions/checkout@"):
            # Otherwise the job's token stays in .git/config, readable by every later step and any upload.
            assert step.get("with", {}).get("persist-credentials") is False, f"{name}: checkout persists credentials"


def test_one_commit_per_action_across_workflows():
    """The same action at different commits in two workflows means one was updated and the other forgotten."""
    pins: dict[str, set[str]] = {}
    for name in all_workflows():
        for _, _, step in steps(load(name)):
            if "uses" in step:
                action, ref = step["uses"].split("@")
                pins.setdefault(action, set()).add(ref)
    assert {action: refs for action, refs in pins.items() if len(refs) > 1} == {}


def zizmor() -> str | None:
    """The zizmor in this venv (the test extra installs it), else one on PATH."""
    here = Path(sys.executable).parent / "zizmor"
    return str(here) if here.is_file() else shutil.which("zizmor")


@pytest.mark.skipif(zizmor() is None, reason="zizmor is not installed (pip install -e '.[test]')")
def test_zizmor_finds_nothing_offline():
    """GitHub Actions static analysis (template injection, unpinned actions, credential persistence, excessive
    permissions, cache poisoning, ...), offline: the audits that need the GitHub API are left out."""
    env = {k: v for k, v in os.environ.items() if k not in ("GH_TOKEN", "GITHUB_TOKEN", "ZIZMOR_GITHUB_TOKEN")}
    result = subprocess.run([zizmor(), "--offline", "--no-progress", "--format", "json", str(WORKFLOWS)],
                            capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert result.returncode == 0, f"zizmor found problems:\n{result.stdout}\n{result.stderr}"
    findings = json.loads(result.stdout)
    assert findings == [], json.dumps(findings, indent=2)


def test_ci_runs_on_every_push_and_pull_request():
    doc = load("test.yml")
    on = triggers(doc)
    assert "push" in on and "pull_request" in on
    for trigger in ("push", "pull_request"):   # no branch or path filter: every push and PR
        assert not on[trigger], f"test.yml: {trigger} is filtered: {on[trigger]}"
    [job] = doc["jobs"].values()
    assert job["timeout-minutes"] == 30
    runs = [s["run"].strip() for s in job["steps"] if "run" in s]
    assert runs == [".ci/run"], f"test.yml runs {runs}; the CI entry point is .ci/run"
    assert [s["uses"].split("@")[0] for s in job["steps"] if "uses" in s] == ["actions/checkout", "actions/setup-python"]
    assert os.access(ROOT / ".ci" / "run", os.X_OK), ".ci/run must be executable"
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("name, command, inputs", [
    ("promote.yml", "cafe promote", {"decision_uri": "DECISION_URI", "config": "CONFIG"}),
    ("rollback.yml", "cafe rollback", {"confirm": "CONFIRM", "config": "CONFIG"}),
])
def test_registry_workflows(name, command, inputs):
    doc = load(name)
    on = triggers(doc)
    assert list(on) == ["workflow_dispatch"], f"{name}: started by hand only"
    declared = on["workflow_dispatch"]["inputs"]
    assert set(declared) == set(inputs)
    required = {k for k, v in declared.items() if v.get("required")}
    assert required == set(inputs) - {"config"}
    default_config = declared["config"]["default"]
    assert (ROOT / default_config).is_file(), f"{name}: default config {default_config} is not in the repository"
    # The production setting, the one the pipeline's promotion request sends (promote.ci.config).
    assert default_config == CiConfig.model_fields["config"].default == "configs/cluster.yaml", name

    # One registry change at a time: promote and rollback share a group and queue rather than cancel.
    assert doc["concurrency"]["group"] == "cafe-registry"
    assert doc["concurrency"].get("cancel-in-progress") is False

    [(job_name, job)] = doc["jobs"].items()
    assert job.get("environment") == "production", f"{name}: an environment, so runs can require approval"
    env = job.get("env", {})
    for key, var in inputs.items():
        assert env.get(var) == f"${{{{ inputs.{key} }}}}", f"{name}: input {key} reaches scripts as ${var}"

    runs = [(s, s.get("run", "")) for s in job["steps"]]
    assert any("make venv" in r for _, r in runs), f"{name}: installs with make venv"
    [(cafe_step, script)] = [(s, r) for s, r in runs if command in r]
    assert f".venv/bin/{command}" in script
    assert '--config "$CONFIG"' in script
    assert "s3.embedded=never" in script, f"{name}: never start the embedded S3 in production"
    if command == "cafe promote":
        assert '"promote.decision=$DECISION_URI"' in script

    # Credentials come from repository/environment secrets, and only into the step that uses them.
    step_env = cafe_step.get("env", {})
    for secret in S3_SECRETS:
        assert step_env.get(secret) == f"${{{{ secrets.{secret} }}}}", f"{name}: {secret} from secrets"
    # promote: also the Kubeflow Model Registry's token (registry.kubeflow.token_env), for that step only.
    extra = {"CAFE_MR_TOKEN"} if command == "cafe promote" else set()
    for secret in extra:
        assert step_env.get(secret) == f"${{{{ secrets.{secret} }}}}", f"{name}: {secret} from secrets"
    text = (WORKFLOWS / name).read_text()
    assert text.count("secrets.") == len(S3_SECRETS) + len(extra), f"{name}: secrets used outside the {command} step"
    assert not any(k.startswith("AWS_") and "secrets." in str(v) for k, v in env.items())
    for step, _ in runs:
        if step is not cafe_step:
            assert "secrets." not in str(step), f"{name}: step {step.get('name')!r} sees a secret"

    # The checks run before anything is installed or touched.
    checks = [i for i, (_, r) in enumerate(runs) if "::error::" in r]
    assert checks and checks[0] < runs.index((cafe_step, script))
    if name == "rollback.yml":
        check = runs[checks[0]][1]
        assert '"$CONFIRM" != "rollback"' in check and "exit 1" in check
