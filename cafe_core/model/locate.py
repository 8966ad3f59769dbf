"""Which model files a stage reads, and a digest that pins them.

A checkpoint URI is either a committed `cafe train` output (`_MANIFEST.json`, the Hugging Face folder under
`model/`) or a plain Hugging Face folder. Committed outputs are pinned by the sha256 of their manifest
(which lists every file's sha256), so a later stage can tell whether it still looks at the files an
earlier stage measured.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cafe_core.commit import MANIFEST, Manifest, manifest_digest, read_manifest
from cafe_core.config import ModelConfig
from cafe_core.errors import BadInput
from cafe_core.storage import ChecksumError, Storage
from cafe_core.uris import join, sha256_file

MODEL_DIR = "model"


class CheckpointNotFound(BadInput, ValueError):
    pass


@dataclass(frozen=True)
class CheckpointRef:
    uri: str  # what was configured
    model_uri: str  # the Hugging Face folder
    manifest: Manifest | None  # None for a plain folder
    digest: str | None  # sha256 of the manifest's bytes; None for a plain folder

    def model_files(self) -> list:
        """Manifest entries of the model folder (name relative to `model_uri`, size, sha256)."""
        if self.manifest is None:
            return []
        prefix = f"{MODEL_DIR}/" if self.model_uri != self.uri else ""
        return [e.model_copy(update={"name": e.name[len(prefix):]}) for e in self.manifest.entries if e.name.startswith(prefix)]


def locate(store: Storage, uri: str) -> CheckpointRef:
    uri = uri.rstrip("/")
    if store.exists(join(uri, MANIFEST)):
        manifest = read_manifest(store, uri)
        inner = any(e.name == f"{MODEL_DIR}/config.json" for e in manifest.entries)
        if not inner and not any(e.name == "config.json" for e in manifest.entries):
            raise CheckpointNotFound(f"{uri} is a committed output without a model (no config.json or {MODEL_DIR}/config.json)")
        return CheckpointRef(uri, join(uri, MODEL_DIR) if inner else uri, manifest, manifest_digest(store, uri))
    if store.exists(join(uri, "config.json")):
        return CheckpointRef(uri, uri, None, None)
    raise CheckpointNotFound(
        f"no model at {uri}: expected a `cafe train` output (with {MANIFEST} and {MODEL_DIR}/) or a Hugging Face "
        "folder (config.json + safetensors); check the checkpoint setting or run `cafe train` first"
    )


@contextmanager
def verified_copy(store: Storage, ref: CheckpointRef) -> Iterator[Path]:
    """The committed model files, downloaded afresh into a temporary folder and checked against the
    manifest's sha256 (never a cache): the files that load are exactly the files that were listed."""
    if ref.manifest is None:
        raise ChecksumError(f"{ref.uri} has no manifest: only a committed output can be verified")
    with tempfile.TemporaryDirectory(prefix="cafe-verified-") as tmp:
        for entry in ref.model_files():
            local = Path(tmp) / entry.name
            store.download(join(ref.model_uri, entry.name), local)
            if sha256_file(local) != entry.sha256:
                raise ChecksumError(f"{join(ref.model_uri, entry.name)}: sha256 differs from the manifest of {ref.uri}")
        yield Path(tmp)


def model_config_for(ref: CheckpointRef, base: ModelConfig, folder: Path | None = None) -> ModelConfig:
    """`base` (dtype, attention, cache) pointed at the checkpoint's model folder (or a local copy)."""
    return base.model_copy(update={"preset": None, "checkpoint": str(folder) if folder else ref.model_uri})
