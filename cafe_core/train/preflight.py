"""The checks a training run makes before any work: by `cafe train`'s parent before torchrun starts
processes, and again by each process. Light on purpose (torch, no transformers or deepspeed): the parent
of a multi-process run imports only this.
"""

from __future__ import annotations

from typing import Any

import torch

from cafe_core.commit import read_manifest
from cafe_core.config import CafeConfig, ConfigError
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
    read_manifest(store, t.data)  # the converted pairs exist and are committed
    checkpoints = Checkpoints(store, join(t.output, "checkpoints"), t.keep_checkpoints)
    found = checkpoints.resolve(t.resume)
    if found is None:
        return None
    checkpoints.check_compatible(found[1], compatibility(cfg, world))
    return found[0]


def compatibility(cfg: CafeConfig, world: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it."""
    return {WORLD_SIZE: world, ZERO_STAGE: cfg.train.zero_stage, MODEL_DIGEST: cfg.model.model_dump_json()}
