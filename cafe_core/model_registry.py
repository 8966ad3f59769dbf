"""Register a promoted version in the Kubeflow Model Registry (registry.kubeflow), through its Python client
(PyPI `model-registry`).

One registered model per registry.model_name; one model version per S3 registry version (v1, v2, ...), whose
artifact is the version's S3 copy of the model folder (safetensors) and whose metadata carries the gate's
metrics, the decision record and the code versions. The S3 registry stays the source of truth for which
version is champion; a version here says it was promoted at some point.

The client is used with its own REST calls (api/model_registry/v1): find the registered model by name and
create it when missing, find the version by name under it, create the version, then its model artifact.
Registering the same version twice with the same artifact is a no-op, so a promotion that failed later is
simply run again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Union

from cafe_core.config import KubeflowRegistryConfig
from cafe_core.errors import StageFailed

Value = Union[str, int, float, bool]  # what the registry stores as custom properties


class KubeflowRegistryError(StageFailed, RuntimeError):
    """The Kubeflow Model Registry did not take the version: unreachable, refused, or in conflict."""


@dataclass(frozen=True)
class VersionEntry:
    """What one promoted version registers."""

    model_name: str
    version: str  # the S3 registry's version id
    uri: str  # the model folder of that version's copy (s3://.../versions/vN/checkpoint/model)
    description: str
    metadata: dict[str, Value] = field(default_factory=dict)


def metadata_for(*, metrics: dict[str, Any], decision_uri: str, gate_decision_uri: str, checkpoint_digest: str,
                 run_id: str, code_version: str, gate_code_version: str, config_digest: str, s3_version: str,
                 source_model_uri: str) -> dict[str, Value]:
    """The version's custom properties: provenance under `cafe.`, every finite metric under `metric.` (a NaN or
    a non-number is left out: the registry stores typed values only)."""
    out: dict[str, Value] = {
        "cafe.decision_uri": decision_uri, "cafe.gate_decision_uri": gate_decision_uri,
        "cafe.checkpoint_digest": checkpoint_digest, "cafe.source_model_uri": source_model_uri,
        "cafe.run_id": run_id, "cafe.code_version": code_version, "cafe.gate_code_version": gate_code_version,
        "cafe.config_digest": config_digest, "cafe.s3_registry_version": s3_version,
    }
    for name, value in sorted(metrics.items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"metric.{name}"] = float(value)
    return out


def _token(k: KubeflowRegistryConfig) -> str | None:
    if k.token_env is None:
        return None  # the client reads the pod's service-account token itself
    token = os.environ.get(k.token_env, "").strip()
    if not token:
        raise KubeflowRegistryError(f"registry.kubeflow.token_env names {k.token_env}, which is not set: fill it "
                                    "from the Secret holding the registry's token, or set token_env=null to use "
                                    "the pod's service-account token")
    return token


def client(k: KubeflowRegistryConfig):
    """A connected client (its constructor lists one registered model to check the address and the token)."""
    try:
        from model_registry import ModelRegistry
    except ImportError:
        raise KubeflowRegistryError("registry.kubeflow is set but the Kubeflow Model Registry client is not "
                                    "installed: pip install model-registry (a project dependency)") from None
    token = _token(k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "User access token is missing" on a plain-http registry without one
        # asyncio.run per call instead of the client's default, which patches the process's event loop.
        return ModelRegistry(k.url, author=k.author, is_secure=k.is_secure, user_token=token, custom_ca=k.custom_ca,
                             async_runner=asyncio.run, log_level=logging.ERROR)


def register(k: KubeflowRegistryConfig, entry: VersionEntry) -> str:
    """Register `entry` (the registered model created when missing); a no-op when this version is already
    registered with the same artifact URI and checkpoint digest. Raises KubeflowRegistryError naming the
    registry and the problem. Returns a one-line account."""
    where = f"Kubeflow Model Registry at {k.url}"
    try:
        mr = client(k)
        if mr.get_registered_model(entry.model_name) is not None:
            existing = mr.get_model_version(entry.model_name, entry.version)
            if existing is not None:
                return _same_or_conflict(mr, entry, existing, where)
        mr.register_model(
            entry.model_name, entry.uri, version=entry.version, model_format_name=k.model_format_name,
            model_format_version=k.model_format_version, storage_key=k.storage_key, author=k.author,
            owner=k.author, version_description=entry.description, metadata=entry.metadata)
    except KubeflowRegistryError:
        raise
    except Exception as e:  # noqa: BLE001 - the client raises aiohttp, OpenAPI and its own errors alike
        raise KubeflowRegistryError(f"{where}: registering {entry.model_name} {entry.version} failed: "
                                    f"{type(e).__name__}: {_first_line(e)}") from None
    return f"{where}: registered {entry.model_name} version {entry.version} ({entry.uri})"


def _same_or_conflict(mr, entry: VersionEntry, existing, where: str) -> str:
    artifact = mr.get_model_artifact(entry.model_name, entry.version)
    digest = (existing.custom_properties or {}).get("cafe.checkpoint_digest")
    if artifact is not None and artifact.uri == entry.uri and digest == entry.metadata.get("cafe.checkpoint_digest"):
        return f"{where}: {entry.model_name} version {entry.version} already registered ({entry.uri})"
    raise KubeflowRegistryError(
        f"{where} already has {entry.model_name} version {entry.version} for other files (artifact "
        f"{getattr(artifact, 'uri', None)}, checkpoint digest {str(digest)[:12]}; this one is {entry.uri}, "
        f"{str(entry.metadata.get('cafe.checkpoint_digest'))[:12]}): the S3 registry was reset or another one "
        "registers under this name; use another registry.model_name, or archive that version in the registry")


def _first_line(e: Exception) -> str:
    text = str(e).strip() or repr(e)
    return text.splitlines()[0][:300]
