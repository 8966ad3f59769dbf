"""Schema checks for generated Kubernetes objects, shared by the training job tests: a custom resource against
its vendored CRD's openAPIV3Schema (jsonschema, plus the fields a structural schema would silently prune), and
a pod against the Kubernetes OpenAPI schema (kubernetes-validate, strict: unknown fields are errors)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

DATA = Path(__file__).parent / "data"
PYTORCHJOB_CRD = DATA / "pytorchjobs-crd-v1.9.0.yaml"  # Training Operator v1.9.0
TRAINJOB_CRD = DATA / "trainjobs-crd-v2.3.0.yaml"  # Kubeflow Trainer v2.3.0
RUNTIME_CRD = DATA / "clustertrainingruntimes-crd-v2.3.0.yaml"
TORCH_RUNTIME = DATA / "torch-distributed-runtime-v2.3.0.yaml"  # the ClusterTrainingRuntime itself
KUBERNETES = "1.33.0"  # the API version pods are validated against (kubernetes-validate ships the schemas)


def documents(path: Path) -> list[dict[str, Any]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 6,000-10,000 lines
    return [d for d in yaml.load_all(path.read_text(), Loader=loader) if d is not None]


@functools.cache
def crd_schema(path: Path, version: str) -> dict[str, Any]:
    """The openAPIV3Schema of one version of the (only) CRD in a file."""
    (crd,) = [d for d in documents(path) if d.get("kind") == "CustomResourceDefinition"]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would silently prune: not declared in a structural schema."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key in schema["properties"]:
                found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
            elif not isinstance(schema.get("additionalProperties"), dict):
                found.append(f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            found += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def assert_valid_custom_object(obj: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.validate(obj, schema)
    assert unknown_fields(obj, schema) == [], "fields the CRD does not declare (the API server would drop them)"


def assert_valid_pod(spec: dict[str, Any], labels: dict[str, str] | None = None) -> None:
    """A pod spec as Kubernetes' own schema has it: types, required fields, no unknown field."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": labels or {}}, "spec": spec}
    try:
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(f"not a valid pod at {list(e.path)}: {e.message}") from None
