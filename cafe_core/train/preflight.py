"""The checks a training run makes before any work: by `cafe train`'s parent before torchrun starts
processes, and again by each process. Light on purpose (torch, no transformers or deepspeed): the parent
of a multi-process run imports only this.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cafe_core.commit import read_manifest
from cafe_core.config import CafeConfig, ConfigError, TrainConfig
from cafe_core.data.records import INTERLEAVED_ROWS, PAIR_SCHEMA, PAIR_SCHEMA_VERSION
from cafe_core.storage import Storage
from cafe_core.train.checkpoint import MODEL_DIGEST, WORLD_SIZE, ZERO_STAGE, Checkpoints
from cafe_core.train.data import BatchPlan
from cafe_core.uris import join


def preflight(cfg: CafeConfig, store: Storage, world: int) -> str | None:
    """Every check that can fail before work starts, with the fix in the message: run once by the
    parent before torchrun starts processes, and again by each process. Returns the checkpoint to resume."""
    t = cfg.train
    if t.precision == "bf16" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        raise ConfigError("train.precision=bf16 needs a GPU with bf16 support; use train.precision=fp32 on this machine")
    if not (t.parts.vision or t.parts.projector or t.parts.llm or t.loss.learnable_temperature):
        raise ConfigError("train.parts freezes every part: nothing to train")
    store.check_reachable(t.data)
    BatchPlan(t.global_batch_size, t.grad_accum, world)
    manifest = read_manifest(store, t.data)  # the converted pairs exist and are committed
    check_pairs_fit(t, manifest.meta)
    data_bytes = sum(e.size for e in manifest.entries if e.name.startswith("pairs/"))
    if data_bytes > t.cache.max_gb * 2**30:
        # Every epoch visits rows in a random order: a cache smaller than the data fetches a whole shard again
        # for most rows, on every node, every step. Refuse rather than crawl.
        raise ConfigError(f"train.cache.max_gb={t.cache.max_gb:g} is below the {data_bytes / 2**30:.2f} GiB of "
                          f"training shards in {t.data}; raise it to at least {math.ceil(data_bytes / 2**30)} "
                          f"(and give train.cache.dir a volume that size)")
    checkpoints = Checkpoints(store, join(t.output, "checkpoints"), t.keep_checkpoints)
    found = checkpoints.resolve(t.resume)
    if found is None:
        return None
    checkpoints.check_compatible(found[1], compatibility(cfg, world))
    return found[0]


def check_pairs_fit(t: TrainConfig, meta: dict[str, Any]) -> None:
    """The converted pairs' layout is one this code reads, and the loss can use every pair: MMEB-train pairs
    (their own query and target, no conversation) train in interleaved mode and without the LM loss."""
    version = meta.get(PAIR_SCHEMA, 1)
    if not isinstance(version, int) or version > PAIR_SCHEMA_VERSION:
        raise ConfigError(f"{t.data} holds pairs of schema {version!r}, newer than this code reads "
                          f"({PAIR_SCHEMA_VERSION}); train with the cafe version that converted them")
    interleaved = meta.get(INTERLEAVED_ROWS, 0)
    if interleaved and t.loss.mode != "interleaved":
        raise ConfigError(f"{t.data} holds {interleaved} MMEB-train pairs (their own query and target texts and "
                          "images), which only interleaved inputs can read: set train.loss.mode=interleaved")
    if interleaved and t.loss.a_lm > 0:
        raise ConfigError(f"{t.data} holds {interleaved} MMEB-train pairs, which have no conversation for the LM "
                          "loss: set train.loss.a_lm=0 (VLM2Vec trains with the contrastive loss alone)")


def compatibility(cfg: CafeConfig, world: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it."""
    # Where a checkpoint is mirrored locally does not change the model (a cluster job moves it to its volume).
    return {WORLD_SIZE: world, ZERO_STAGE: cfg.train.zero_stage,
            MODEL_DIGEST: cfg.model.model_dump_json(exclude={"cache_dir"})}
