"""CAFe fine-tuning: LLaVA-OneVision + joint loss, DeepSpeed, resumable S3 checkpoints.

Launch (the same entry point for 1 process or many, on one node or several):

    cafe train --config configs/local.yaml                              # 1 process
    cafe train --config configs/local.yaml train.nproc_per_node=2       # starts torchrun itself
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m cafe_core.cli train --config cluster.yaml                    # what a PyTorchJob runs

Recipe shape as in torchtune: setup() (checks, data, model, optimizer, engine, resume), train(), cleanup().
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from cafe_core.cache import NodeCache
from cafe_core.commit import OutputWriter
from cafe_core.config import CafeConfig, ConfigError
from cafe_core.loss import JointLoss
from cafe_core.model.build import build, save
from cafe_core.model.inputs import InputBuilder, interleaved_pair
from cafe_core.model.joint import CafeModel
from cafe_core.storage import Storage
from cafe_core.train import heldout as heldout_eval
from cafe_core.train.checkpoint import Checkpoints, json_lines, read_json_lines
from cafe_core.train.data import BatchOrder, BatchPlan, DataError, PairShards
from cafe_core.train.distributed import init_process_group, process_group_backend, sum_over_ranks, training_device
from cafe_core.train.preflight import compatibility, preflight
from cafe_core.train.schedule import cosine_with_warmup
from cafe_core.train.step import OptimizerStep
from cafe_core.uris import join

DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


@dataclass
class TrainResult:
    output: str
    steps: int
    metrics: list[dict] = field(default_factory=list)
    heldout: dict[str, float] = field(default_factory=dict)


def deepspeed_config(cfg: CafeConfig, plan: BatchPlan) -> dict[str, Any]:
    """The repo's ZeRO config for the stage, with the batch, clipping and precision of this run."""
    t = cfg.train
    ds = json.loads((DEEPSPEED_CONFIGS / f"zero{t.zero_stage}.json").read_text())
    ds.update(
        train_batch_size=t.global_batch_size,
        train_micro_batch_size_per_gpu=plan.micro_batch,
        gradient_accumulation_steps=t.grad_accum,
        gradient_clipping=t.optim.clip_grad,
    )
    ds["bf16"] = {"enabled": t.precision == "bf16"}
    return ds


# Dense bf16 tensor-core peaks (TFLOP/s) by device name, for the MFU estimate; train.peak_tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


class Trainer:
    def __init__(self, cfg: CafeConfig, store: Storage):
        self.cfg, self.t, self.store = cfg, cfg.train, store
        self.rank, self.world, self.local_rank = 0, 1, 0
        self.metrics: list[dict] = []
        self.step = 0

    # --- setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        self._setup_distributed()
        self.resume_from = preflight(self.cfg, self.store, self.world)
        self._setup_data()
        self._setup_model()
        self._setup_engine()
        self._resume()
        self.optimizer_step = OptimizerStep(self.engine, self.model.loss, self.device, self.t.contrastive_batch,
                                            self._log_scale)

    def _setup_distributed(self) -> None:
        deepspeed = import_deepspeed()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = training_device(self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = process_group_backend(self.device, self.t.dist_backend)
        self.rank, self.world = init_process_group(self.device, backend)
        deepspeed.init_distributed(dist_backend=backend)  # adopts the group made above

    def _setup_data(self) -> None:
        self.plan = BatchPlan(self.t.global_batch_size, self.t.grad_accum, self.world)
        # Shards are fetched when first needed, once per node, into the cache the node's ranks share.
        self.shards = PairShards(self.store, self.t.data, NodeCache.from_config(self.t.cache, self.store))
        self.train_rows = np.arange(len(self.shards))
        self.heldout = None
        if self.t.heldout == "pairs":
            if len(self.shards) < 2 * self.t.heldout_size:
                raise DataError(f"{len(self.shards)} pairs cannot spare train.heldout_size={self.t.heldout_size} "
                                "for held-out accuracy; lower it or set train.heldout=null")
            # Drawn from every source, never trained on; the batch order runs over the rest.
            self.train_rows, held = heldout_eval.split_by_source(self.shards.sources(), self.t.heldout_size, self.t.seed)
            self.heldout = heldout_eval.from_pairs(self.shards.rows(held), self.t.prompts.pair_query)
        elif self.t.heldout:
            self.heldout = heldout_eval.load(self.store, self.t.heldout, self.t.heldout_size)
        self.order = BatchOrder(len(self.train_rows), self.t.global_batch_size, self.t.seed)
        # Decided for the whole run from the manifest, so every rank's batches carry the negatives slot alike.
        loss = self.t.loss
        self.negatives = loss.mode == "interleaved" and loss.hard_negatives and self.shards.negative_rows > 0
        self.total_steps = self.order.total_steps(self.t.epochs, self.t.max_steps)

    def _setup_model(self) -> None:
        torch.manual_seed(self.t.seed)
        hf, self.processor = build(self.cfg.model, self.store)
        if self.t.gradient_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = JointLoss(self.t.loss.a_lm, self.t.loss.a_con, self.t.loss.temperature, self.t.loss.learnable_temperature)
        self.model = CafeModel(hf, loss)
        self.builder = InputBuilder(self.processor, self.t.prompts, self.t.max_length)
        self._check_max_length()
        self.param_groups = self._param_groups(hf)
        self.n_params = sum(p.numel() for p in hf.parameters())

    def _check_max_length(self) -> None:
        """The largest image the processor can produce must fit in max_length with room for its prompt,
        so that no valid pair can fail at collation in the middle of a run."""
        pinpoints = self.processor.image_processor.image_grid_pinpoints
        largest = max(self.processor._get_num_multimodal_tokens(image_sizes=[tuple(p) for p in pinpoints])["num_image_tokens"])
        prompt = len(self.builder.prompt(self.t.prompts.image, image_tokens=[1]).ids)
        if largest + prompt >= self.t.max_length:
            raise ConfigError(
                f"train.max_length={self.t.max_length} leaves no room: the largest image takes {largest} tokens and "
                f"the image prompt {prompt} more; raise train.max_length above {largest + prompt}"
            )

    def _param_groups(self, hf) -> list[dict]:
        """Separate learning rates for vision tower, projector and LLM; frozen parts get no group."""
        o, parts = self.t.optim, self.t.parts
        groups = {
            "vision": (parts.vision, o.lr_vision, list(hf.model.vision_tower.parameters())),
            "projector": (parts.projector, o.lr_projector,
                          list(hf.model.multi_modal_projector.parameters()) + [hf.model.image_newline]),
            "llm": (parts.llm, o.lr_llm, list(hf.model.language_model.parameters()) + list(hf.lm_head.parameters())),
        }
        out, seen = [], set()
        for name, (trained, lr, params) in groups.items():
            unique = [p for p in params if id(p) not in seen]  # tied embeddings appear once
            seen.update(id(p) for p in unique)
            for p in unique:
                p.requires_grad_(trained)
            if trained:
                out.append({"name": name, "params": unique, "lr": lr, "weight_decay": o.weight_decay})
        loss_params = list(self.model.loss.parameters())
        if loss_params:
            out.append({"name": "temperature", "params": loss_params, "lr": o.lr_temperature, "weight_decay": 0.0})
        return out  # preflight made sure something trains

    def _setup_engine(self) -> None:
        import deepspeed

        if self.t.zero_stage == 3:
            # image_newline is used by the vision feature packing, outside its owner's forward: have ZeRO-3
            # gather it for this module's forward whatever the persistence threshold.
            deepspeed.zero.register_external_parameter(self.model, self.model.hf.model.image_newline)
        o = self.t.optim
        optimizer = torch.optim.AdamW(self.param_groups, betas=o.betas)  # client AdamW: no C++ op to compile
        warmup = int(round(o.warmup_ratio * self.total_steps))
        scheduler = cosine_with_warmup(optimizer, warmup, self.total_steps, o.min_lr_ratio)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.cfg, self.plan), dist_init_required=False,
            # DeepSpeed would select cuda:LOCAL_RANK, which does not exist where ranks share a GPU.
            args=SimpleNamespace(device_rank=self.device.index if self.device.type == "cuda" else self.local_rank),
        )

    def _resume(self) -> None:
        self.checkpoints = Checkpoints(self.store, join(self.t.output, "checkpoints"), self.t.keep_checkpoints)
        self.compatibility = compatibility(self.cfg, self.world)
        if self.resume_from is None:
            return
        uri = self.resume_from
        self.step, metrics = self.checkpoints.load(self.engine, uri)
        self.metrics = [m for m in read_json_lines(metrics) if m["step"] <= self.step]
        self._say(f"resumed from {uri} at step {self.step}")

    # --- training ------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        chance = 1.0 / len(self.heldout) if self.heldout else None
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=self.rank != 0 or None, unit="step")
        window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
        batches = self._batches()
        while self.step < self.total_steps:
            micro = [next(batches) for _ in range(self.t.grad_accum)]
            record = {"step": self.step + 1, **self.optimizer_step([batch for _, batch in micro])}
            if self.model.loss.infonce.learnable:
                record["temperature"] = 1.0 / float(self.model.loss.infonce.logit_scale(self._log_scale()))
            window_samples += sum(n_rows for n_rows, _ in micro)
            window_tokens += sum(batch.num_tokens() for _, batch in micro)
            self.step += 1
            bar.update(1)
            if self.step % self.t.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                record.update(self._throughput(window_samples, window_tokens, elapsed))
                window_start, window_samples, window_tokens = time.perf_counter(), 0, 0
                self._say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if self.heldout and (self.step % self.t.eval_every == 0 or self.step == self.total_steps):
                acc = heldout_eval.i2t_top1(self.engine, self.builder, self.heldout, self.device, self.rank, self.world,
                                            self.t.loss.mode)
                record.update({"heldout/i2t_top1": acc, "heldout/chance": chance})
                self._say(f"step {self.step}: held-out image->text top-1 {acc:.3f} (chance {chance:.3f})")
            self.metrics.append(record)
            if self.step % self.t.checkpoint_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        batches.close()
        bar.close()
        return self._finish()

    def _batches(self):
        """(rows, batch) of every micro-batch from the current step on, in order. With
        train.prefetch_batches > 0 a background thread builds them ahead, so image decoding, resizing and
        tokenisation overlap the step (on a GPU, most of the host's work). A batch depends only on (step,
        micro-batch, rank), so prefetching changes nothing that resume relies on."""
        keys = ((s, m) for s in range(self.step, self.total_steps) for m in range(self.t.grad_accum))
        if not self.t.prefetch_batches:
            yield from (self._build_batch(self.builder, *key) for key in keys)
            return
        # The thread's own tokenizer: the main thread tokenises held-out prompts meanwhile.
        builder = InputBuilder(copy.deepcopy(self.processor), self.t.prompts, self.t.max_length)
        with ThreadPoolExecutor(1, thread_name_prefix="cafe-batches") as pool:
            pending = deque(pool.submit(self._build_batch, builder, *k) for k in itertools.islice(keys, self.t.prefetch_batches))
            while pending:
                ready = pending.popleft().result()
                pending.extend(pool.submit(self._build_batch, builder, *k) for k in itertools.islice(keys, 1))
                yield ready

    def _build_batch(self, builder: InputBuilder, step: int, micro: int):
        rows = self.shards.rows(self.train_rows[self.plan.rows(self.order.batch(step), micro, self.rank)])
        conversations = [r["conversations"] for r in rows] if self.model.loss.uses_lm else None
        ids = [r["id"] for r in rows]
        if self.t.loss.mode == "interleaved":
            pairs = [interleaved_pair(r, self.t.prompts.pair_query) for r in rows]
            return len(rows), builder.interleaved_pairs_batch(pairs, conversations, ids, negatives=self.negatives)
        batch = builder.pairs_batch([r["image"] for r in rows], [r["caption"] for r in rows], conversations, ids)
        return len(rows), batch

    def _log_scale(self) -> torch.Tensor:
        """The InfoNCE logit scale's current value, whole even where ZeRO-3 partitions parameters."""
        log_scale = self.model.loss.infonce.log_scale
        if self.t.zero_stage == 3 and isinstance(log_scale, torch.nn.Parameter):
            import deepspeed

            with deepspeed.zero.GatheredParameters([log_scale]):
                return log_scale.detach().clone()
        return log_scale.detach()

    def _throughput(self, samples: int, tokens: int, seconds: float) -> dict[str, float]:
        lrs = {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups}
        total_samples, total_tokens = sum_over_ranks([samples, tokens], self.device)
        out = {"lr": self.optimizer.param_groups[0]["lr"], **lrs,
               "samples_per_s": total_samples / seconds, "tokens_per_s": total_tokens / seconds}
        if self.device.type == "cuda":
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        peak = self.t.peak_tflops or (peak_tflops(torch.cuda.get_device_name()) if self.device.type == "cuda" else None)
        if peak:
            # nanoGPT-style estimate: 6 FLOPs per parameter per token (forward + backward).
            out["mfu"] = 6 * self.n_params * out["tokens_per_s"] / (peak * 1e12 * self.world)
        return out

    def save_checkpoint(self) -> None:
        files = {"metrics.jsonl": json_lines(self.metrics), "config.yaml": self.cfg.to_yaml().encode()}
        uri = self.checkpoints.save(self.engine, self.step, self.compatibility, files)
        self._say(f"checkpoint step {self.step}: {uri}")

    def _finish(self) -> TrainResult:
        """Write the final model (a complete HF folder), metrics, loss curve and summary, committed."""
        heldout = {k: v for k, v in self.metrics[-1].items() if k.startswith("heldout/")} if self.metrics else {}
        final = join(self.t.output, "final")
        with self._full_parameters():
            if self.rank == 0:
                self._write_final(final, heldout)
        if self.world > 1:
            dist.barrier()
        return TrainResult(output=final, steps=self.step, metrics=self.metrics, heldout=heldout)

    def _full_parameters(self):
        import deepspeed

        if self.t.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.model.hf.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def _write_final(self, final: str, heldout: dict[str, float]) -> None:
        from cafe_core.train.plots import loss_curve_png

        last = {k: v for k, v in self.metrics[-1].items() if isinstance(v, float)} if self.metrics else {}
        card_metrics = {**{f"train/{k}": v for k, v in last.items() if k.startswith("loss")}, **heldout}
        out = OutputWriter(self.store, final, kind="trained-model")
        with tempfile.TemporaryDirectory(prefix="cafe-final-") as tmp:
            folder = Path(tmp) / "model"
            save(self.model.hf, self.processor, folder, cafe_config_yaml=self.cfg.to_yaml(), metrics=card_metrics)
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                out.put_file(f"model/{path.relative_to(folder).as_posix()}", path)
        out.put_bytes("metrics.jsonl", json_lines(self.metrics))
        out.put_bytes("loss_curve.png", loss_curve_png(self.metrics))
        out.put_json("summary.json", {"steps": self.step, "world_size": self.world, "final": last, **heldout})
        out.put_text("config.yaml", self.cfg.to_yaml())
        out.commit(meta={"steps": self.step, **heldout})
        self._say(f"final model: {final}/model")

    def _say(self, text: str) -> None:
        if self.rank == 0:
            tqdm.write(text)

    def cleanup(self) -> None:
        """The process group goes, whatever happened (no barrier: a failed rank may be gone). The data cache
        stays: the node's other ranks and later runs share it."""
        if dist.is_initialized():
            dist.destroy_process_group()


def import_deepspeed():
    """DeepSpeed with the CPU accelerator when there is no GPU, without its JIT-compiled shared-memory op
    (used only by tensor-parallel inference all-reduce, never in training; building it needs a C++
    compiler and ~40-60 s), and without torch's deprecation warnings about DeepSpeed's own collectives."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings(
        "ignore", category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    )
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the module, shadowed by a same-named package attribute)

    comm = sys.modules["deepspeed.comm.torch"]
    if hasattr(comm, "build_shm_op"):
        comm.build_shm_op = lambda: None
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    return deepspeed



def run(cfg: CafeConfig, store: Storage) -> TrainResult:
    trainer = Trainer(cfg, store)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()

