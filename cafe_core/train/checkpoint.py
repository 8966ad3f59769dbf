"""Resumable checkpoints in S3 (or a local folder), committed atomically, with a `latest` pointer.

Layout under `{train.output}/checkpoints/`:
    step-00000050/...        DeepSpeed's files (model, optimizer and scheduler states, every rank's shard),
                             rng/rank-XXXXX.pt (each rank's RNG states), metrics.jsonl, config.yaml,
                             _MANIFEST.json (the commit point, written by rank 0 once every rank uploaded)
    latest.json              {"step": 50, "tag": "step-00000050"}: replaced in one PUT after the commit

A kill at any moment leaves either the previous `latest` or the new one, each pointing at a committed
checkpoint; an uncommitted step folder is never read and is overwritten or removed later.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cafe_core.commit import ManifestEntry, OutputWriter, read_manifest, verify_output
from cafe_core.errors import BadInput
from cafe_core.storage import NotCommittedError, Storage
from cafe_core.uris import join, sha256_file

LATEST = "latest.json"
# Keys of the client state saved with every checkpoint (named once, as torchtune does).
STEP, WORLD_SIZE, ZERO_STAGE, MODEL_DIGEST = "step", "world_size", "zero_stage", "model_digest"
CLIENT = "cafe"  # our keys live under one key of DeepSpeed's client state, apart from its own


class CheckpointError(BadInput, RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Latest:
    step: int
    tag: str


class Checkpoints:
    def __init__(self, store: Storage, prefix: str, keep: int):
        self.store, self.prefix, self.keep = store, prefix.rstrip("/"), keep

    def uri(self, tag: str) -> str:
        return join(self.prefix, tag)

    # -- writing (every rank calls save: DeepSpeed's save is collective)
    def save(self, engine, step: int, meta: dict[str, Any], files: dict[str, bytes]) -> str:
        """Save, upload this rank's files, and (rank 0) commit the manifest and move `latest`."""
        rank, world = _rank_world()
        tag = tag_for(step)
        with tempfile.TemporaryDirectory(prefix=f"cafe-ckpt-{rank}-") as tmp:
            root = Path(tmp)
            engine.save_checkpoint(str(root), tag=tag, client_state={CLIENT: {**meta, STEP: step}})
            folder = root / tag
            rng = folder / "rng" / f"rank-{rank:05d}.pt"
            rng.parent.mkdir(parents=True, exist_ok=True)
            torch.save(rng_state(), rng)
            if rank == 0:
                for name, data in files.items():
                    (folder / name).write_bytes(data)
            entries = []
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                name = path.relative_to(folder).as_posix()
                self.store.upload(path, join(self.uri(tag), name))
                entries.append(ManifestEntry(name=name, size=path.stat().st_size, sha256=sha256_file(path)))
        gathered: list[list[ManifestEntry]] = [entries]
        if world > 1:
            gathered = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(gathered, entries)
        if rank == 0:
            out = OutputWriter(self.store, self.uri(tag), kind="checkpoint")
            for rank_entries in gathered:
                for e in rank_entries:
                    out.add_uploaded(e)
            out.commit(meta={**meta, STEP: step})
            self.store.write_json(join(self.prefix, LATEST), {"step": step, "tag": tag})
            self._prune(tag)
        if world > 1:
            dist.barrier()
        return self.uri(tag)

    def _prune(self, newest: str) -> None:
        tags = sorted({o.uri[len(self.prefix) + 1 :].split("/", 1)[0] for o in self.store.list(self.prefix)})
        tags = [t for t in tags if t.startswith("step-") and t != newest]
        for old in tags[: max(0, len(tags) - (self.keep - 1))]:
            for o in self.store.list(self.uri(old)):
                self.store.delete(o.uri)

    # -- reading
    def latest(self) -> Latest | None:
        uri = join(self.prefix, LATEST)
        if not self.store.exists(uri):
            return None
        data = self.store.read_json(uri)
        return Latest(step=int(data["step"]), tag=str(data["tag"]))

    def resolve(self, resume: str) -> tuple[str, dict] | None:
        """Which checkpoint to resume from: None for a fresh start. `resume` is latest | none | a URI."""
        if resume == "none":
            return None
        if resume == "latest":
            latest = self.latest()
            if latest is None:
                return None
            uri = self.uri(latest.tag)
        else:
            uri = resume.rstrip("/")
        try:
            manifest = read_manifest(self.store, uri)
        except NotCommittedError:
            raise CheckpointError(f"checkpoint {uri} is missing or was never committed; use train.resume=none or another step") from None
        return uri, manifest.meta

    def check_compatible(self, meta: dict, expected: dict) -> None:
        bad = [f"{k}: checkpoint has {meta.get(k)!r}, this run has {v!r}" for k, v in expected.items() if meta.get(k) != v]
        if bad:
            raise CheckpointError(
                "the checkpoint does not fit this run (" + "; ".join(bad) + "). Resume with the same model, "
                "world size and ZeRO stage, or start fresh with train.resume=none"
            )

    def load(self, engine, uri: str) -> tuple[int, bytes | None]:
        """Download, verify and load into the engine; restores this rank's RNG. Returns (step, metrics)."""
        rank, _ = _rank_world()
        manifest = verify_output(self.store, uri, checksums=False)
        tag = uri.rsplit("/", 1)[1]
        with tempfile.TemporaryDirectory(prefix=f"cafe-resume-{rank}-") as tmp:
            folder = Path(tmp) / tag
            for e in manifest.entries:
                local = folder / e.name
                self.store.download(join(uri, e.name), local)
                if sha256_file(local) != e.sha256:
                    raise CheckpointError(f"{join(uri, e.name)} does not match its manifest checksum")
            load_path, client = engine.load_checkpoint(str(Path(tmp)), tag=tag)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load {uri}")
            rng = folder / "rng" / f"rank-{rank:05d}.pt"
            if rng.exists():
                set_rng_state(torch.load(rng, weights_only=False))
            metrics = (folder / "metrics.jsonl").read_bytes() if (folder / "metrics.jsonl").exists() else None
        return int(client[CLIENT][STEP]), metrics


def json_lines(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def read_json_lines(data: bytes | None) -> list[dict]:
    if not data:
        return []
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]

