"""manifests/overlays: installing into a Kubeflow profile. Each overlay builds (`kubectl kustomize`, or the same
resolution in Python where kubectl is missing), every object is a valid Kubernetes object (kubernetes-validate,
strict), nothing is cluster-scoped, and the account the runs use may do exactly what they need: the profile's
`default-editor` the train step's Role, the dedicated `cafe-pipeline` that and what KFP's pods need. The
`kubectl auth can-i` answers in manifests/README.md are checked against the same RBAC evaluation."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cafe_core.cluster.pytorchjob import S3_SECRET

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = MANIFESTS / "overlays"
# overlay -> the ServiceAccount its runs execute as
ACCOUNTS = {"profile": "default-editor", "dedicated": "cafe-pipeline"}
# The oldest Kubernetes still in common use next to KFP 2.x, and the newest the validator knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
NAMESPACED_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap"}
KUBECTL = shutil.which("kubectl")

Grant = tuple[str, str, str, str | None]  # (apiGroup, resource, verb, resourceName or None for any)
JOB_VERBS = ("create", "get", "list", "watch", "patch", "delete")
# The train step (base/role.yaml): its calls are listed in cafe_core/cluster/jobs.py.
JOB: set[Grant] = {
    *(("kubeflow.org", "pytorchjobs", v, None) for v in JOB_VERBS),
    *(("trainer.kubeflow.org", "trainjobs", v, None) for v in JOB_VERBS),
    *(("", "pods", v, None) for v in ("get", "list", "watch")),
    ("", "pods/log", "get", None),
    *(("", "events", v, None) for v in ("list", "watch")),
}
# Every pod of a KFP 2.x run (overlays/dedicated/kfp-runner-role.yaml has the sources).
KFP_RUNNER: set[Grant] = {
    ("", "configmaps", "get", "kfp-launcher"),
    ("", "secrets", "get", S3_SECRET),
    ("", "secrets", "get", "mlpipeline-minio-artifact"),
    ("argoproj.io", "workflowtaskresults", "create", None),
    ("argoproj.io", "workflowtaskresults", "patch", None),
}


# --- building the overlays ---------------------------------------------------------------------------


def resolve(directory: Path) -> list[dict[str, Any]]:
    """What `kubectl kustomize` makes of a kustomization that uses only `resources` and `labels` (ours); anything
    else is refused rather than half-understood."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "labels"}
    assert not unknown, f"{directory}: {sorted(unknown)}: resolve() knows resources and labels only"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += resolve(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for label in kustomization.get("labels", []):
        assert set(label) == {"pairs"}, f"{directory}: labels with selectors are not resolved here"
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    return objects


def kustomize(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(OVERLAYS / name) if KUBECTL else resolve(OVERLAYS / name) for name in ACCOUNTS}


def key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


# --- RBAC, evaluated the way the API server does for these objects ---------------------------------------


def grants(objects: list[dict[str, Any]], account: str) -> set[Grant]:
    """What the ServiceAccount `account` of the install namespace may do through these RoleBindings."""
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
    granted: set[Grant] = set()
    for binding in (o for o in objects if o["kind"] == "RoleBinding"):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"]):
            continue
        role = roles.get(binding["roleRef"]["name"])
        assert role is not None, f"RoleBinding {binding['metadata']['name']} refers to a Role this overlay lacks"
        for rule in role["rules"]:
            names = rule.get("resourceNames") or [None]
            granted |= {(g, r, v, n) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
                        for n in names}
    return granted


def allowed(granted: set[Grant], verb: str, group: str, resource: str, name: str | None = None) -> bool:
    # A rule with resourceNames allows only requests for those names (never list, or create without a name).
    return any((g, r, v) == (group, resource, verb) and n in (None, name) for g, r, v, n in granted)


def test_the_rbac_evaluation_on_a_hand_made_case():
    objects = [
        {"kind": "Role", "metadata": {"name": "r"}, "rules": [
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["a"], "verbs": ["get"]},
            {"apiGroups": ["x.io"], "resources": ["jobs", "jobs/log"], "verbs": ["get", "list"]}]},
        {"kind": "RoleBinding", "metadata": {"name": "b"}, "roleRef": {"kind": "Role", "name": "r"},
         "subjects": [{"kind": "ServiceAccount", "name": "sa"}]},
    ]
    g = grants(objects, "sa")
    assert g == {("", "secrets", "get", "a"), ("x.io", "jobs", "get", None), ("x.io", "jobs", "list", None),
                 ("x.io", "jobs/log", "get", None), ("x.io", "jobs/log", "list", None)}
    assert allowed(g, "get", "", "secrets", "a") and not allowed(g, "get", "", "secrets", "b")
    assert not allowed(g, "list", "", "secrets") and not allowed(g, "get", "", "secrets")
    assert allowed(g, "list", "x.io", "jobs") and not allowed(g, "list", "y.io", "jobs")
    assert grants(objects, "other") == set()


# --- the overlays -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", [*ACCOUNTS])
def test_kustomization_lists_every_file_of_its_folder(overlay):
    directory = OVERLAYS / overlay
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert "../../base" in resources and len(resources) == len(set(resources))
    for entry in resources:
        assert (directory / entry).exists(), f"{overlay}/kustomization.yaml lists {entry}, which does not exist"
    local = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
    assert local == {e for e in resources if not e.startswith("..")}, f"{overlay}: a file is not listed"
    assert "namespace" not in kustomization, "the namespace comes from kubectl apply -k ... -n <namespace>"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed; the overlays were resolved in Python")
@pytest.mark.parametrize("overlay", [*ACCOUNTS])
def test_kubectl_kustomize_builds_what_resolve_reads(overlay):
    by_kustomize = sorted(kustomize(OVERLAYS / overlay), key=key)
    assert by_kustomize == sorted(resolve(OVERLAYS / overlay), key=key)


@pytest.mark.parametrize("overlay", [*ACCOUNTS])
def test_every_object_is_valid_kubernetes(built, overlay):
    objects = built[overlay]
    assert objects
    assert len({key(o) for o in objects}) == len(objects), f"{overlay}: an object is defined twice"
    for obj in objects:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)  # strict: unknown fields are errors
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cafe", key(obj)


def test_the_validation_rejects_a_misspelt_field(built):
    (role,) = [o for o in built["dedicated"] if key(o) == ("Role", "cafe-pipeline")]
    broken = {**role, "rules": [{**role["rules"][0], "resourceName": ["x"]}]}  # resourceNames, misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", [*ACCOUNTS])
def test_nothing_cluster_scoped_and_no_namespace_fixed(built, overlay):
    for obj in built[overlay]:
        assert obj["kind"] in NAMESPACED_KINDS, f"{overlay}: {key(obj)} is not one of {sorted(NAMESPACED_KINDS)}"
        assert "namespace" not in obj["metadata"], f"{overlay}: {key(obj)} fixes its namespace"
        if obj["kind"] == "RoleBinding":
            assert obj["roleRef"]["kind"] == "Role", f"{overlay}: {key(obj)} binds a ClusterRole"
            for subject in obj["subjects"]:  # no namespace: the binding's own, the one given to kubectl -n
                assert subject.keys() == {"kind", "name"} and subject["kind"] == "ServiceAccount", key(obj)


@pytest.mark.parametrize("overlay", [*ACCOUNTS])
def test_least_privilege(built, overlay):
    for role in (o for o in built[overlay] if o["kind"] == "Role"):
        for rule in role["rules"]:
            assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, "no nonResourceURLs"
            assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], key(role)
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), key(role)
            assert not {"pods/exec", "pods/attach", "pods/portforward", "serviceaccounts/token", "roles",
                        "rolebindings"} & set(rule["resources"]), key(role)
            if "secrets" in rule["resources"]:
                assert rule["verbs"] == ["get"] and rule.get("resourceNames"), "Secrets: get by name only"
    granted = grants(built[overlay], ACCOUNTS[overlay])
    assert not allowed(granted, "create", "", "pods"), "the operator creates the pods, not the pipeline"
    assert not allowed(granted, "list", "", "secrets")


def test_profile_overlay_grants_the_train_step_role_to_default_editor(built):
    objects = built["profile"]
    assert grants(objects, "default-editor") == JOB
    # The profile controller owns default-editor; the overlay must not create or replace it.
    assert [o for o in objects if o["kind"] == "ServiceAccount"] == []
    assert {key(o) for o in objects} == {("Role", "cafe-pipeline"), ("RoleBinding", "cafe-pipeline-default-editor"),
                                         ("ConfigMap", "kfp-launcher")}


def test_dedicated_overlay_account_has_the_job_and_kfp_permissions_and_no_more(built):
    objects = built["dedicated"]
    assert ("ServiceAccount", "cafe-pipeline") in {key(o) for o in objects}
    assert grants(objects, "cafe-pipeline") == JOB | KFP_RUNNER
    assert grants(objects, "default-editor") == set(), "the dedicated overlay leaves the profile's account alone"


@pytest.mark.parametrize("overlay", [*ACCOUNTS])
def test_the_launcher_can_read_what_its_configmap_names(built, overlay):
    """Read from the ConfigMap the overlay installs, so that a renamed Secret there without the Role following
    fails here. default-editor reads them through the profile's kubeflow-edit; cafe-pipeline through this Role."""
    (cm,) = [o for o in built[overlay] if key(o) == ("ConfigMap", "kfp-launcher")]
    assert cm["data"]["defaultPipelineRoot"].startswith("s3://cafe/")
    secret_ref = yaml.safe_load(cm["data"]["providers"])["s3"]["default"]["credentials"]["secretRef"]
    assert secret_ref["secretName"] == S3_SECRET  # the Secret the steps and the training pods read too
    if overlay == "dedicated":
        granted = grants(built[overlay], "cafe-pipeline")
        assert allowed(granted, "get", "", "configmaps", cm["metadata"]["name"])
        assert allowed(granted, "get", "", "secrets", secret_ref["secretName"])
        assert allowed(granted, "get", "", "pods", "the-step-pod")  # the driver and launcher read their own pod
        assert all(allowed(granted, v, "argoproj.io", "workflowtaskresults") for v in ("create", "patch"))


# --- the README's `kubectl auth can-i` lines --------------------------------------------------------------

CAN_I = re.compile(r'kubectl auth can-i (?P<verb>[a-z]+) (?P<what>\S+?)(?: --subresource=(?P<sub>[a-z]+))? '
                   r'-n "\$NS" --as="system:serviceaccount:\$NS:(?P<account>[^"]+)"\s+# (?P<answer>yes|no)\b')


def can_i(line_match: re.Match[str]) -> tuple[str, str, str, str | None]:
    """(verb, apiGroup, resource, name) of one `kubectl auth can-i` line: pods, pods --subresource=log,
    pytorchjobs.kubeflow.org, configmaps/kfp-launcher."""
    what, name = (line_match["what"].split("/", 1) + [None])[:2]
    resource, _, group = what.partition(".")
    if line_match["sub"]:
        resource = f"{resource}/{line_match['sub']}"
    return line_match["verb"], group, resource, name


def test_the_readme_permission_checks_give_the_answers_it_says(built):
    text = (MANIFESTS / "README.md").read_text()
    checks = list(CAN_I.finditer(text))
    assert len(checks) >= 8, "manifests/README.md lost its kubectl auth can-i lines (or their format)"
    for m in checks:
        verb, group, resource, name = can_i(m)
        overlays = [*ACCOUNTS] if m["account"] == "$SA" else [o for o, a in ACCOUNTS.items() if a == m["account"]]
        assert overlays, f"README: unknown account {m['account']!r}"
        for overlay in overlays:
            answer = allowed(grants(built[overlay], ACCOUNTS[overlay]), verb, group, resource, name)
            assert answer == (m["answer"] == "yes"), f"README says {m['answer']} for {ACCOUNTS[overlay]}: {m[0]}"
