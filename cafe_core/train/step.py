"""One optimizer step over this rank's micro-batches, the same whatever the split of the global batch.

The engine (DeepSpeed, or anything with its contract) divides each micro-batch's backward by the number
of micro-steps and averages gradients over ranks. Against that:
- the LM loss of every micro-batch is normalised by the target-token count of the whole step (all
  micro-batches, all ranks), so every token of the step weighs the same: W ranks x A micro-steps,
  W*A ranks x 1 and 1 rank x W*A micro-steps give one loss and one gradient;
- with `contrastive_batch="step"` and several micro-steps, InfoNCE covers every pair of the step
  (gradient caching, as GradCache / VLM2Vec): embed each micro-batch without gradient, take the loss over
  the whole step and its gradients with respect to the embeddings (and the logit scale), then re-run each
  micro-batch with gradient and back-propagate those cached gradients with its LM loss. Memory is that of
  one micro-batch plus the step's embeddings; the cost is one more forward per micro-batch.
Logged values are the step's: token-weighted LM loss, the step's InfoNCE (or the micro-steps' mean), their
weighted sum, averaged over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from cafe_core.loss import CachedContrastive, JointLoss, info_nce
from cafe_core.model.inputs import Batch
from cafe_core.model.joint import CafeModel
from cafe_core.train.distributed import mean_over_ranks, sum_over_ranks


class OptimizerStep:
    def __init__(self, engine: Any, loss: JointLoss, device: torch.device, contrastive_batch: str = "step",
                 log_scale: Callable[[], Tensor] | None = None):
        self.engine, self.loss, self.device, self.contrastive_batch = engine, loss, device, contrastive_batch
        # The logit scale's current value (the trainer gathers it where ZeRO-3 partitions it).
        self.log_scale = log_scale or (lambda: loss.infonce.log_scale.detach())

    def __call__(self, batches: Sequence[Batch]) -> dict[str, float]:
        """One step over this rank's micro-batches, each moved to the device only for its own passes."""
        micro_steps = len(batches)
        step_tokens = None
        if self.loss.uses_lm:
            local = sum(CafeModel.lm_target_count(b) for b in batches)
            step_tokens = torch.tensor(sum_over_ranks([local], self.device)[0], device=self.device)
        cached = self._cached_contrastive(batches) if self._caches(micro_steps) else [None] * micro_steps
        lm = con = 0.0
        for batch, share in zip(batches, cached):
            parts = self.engine(batch.to(self.device), step_tokens=step_tokens, micro_steps=micro_steps, cached=share)
            self.engine.backward(parts["loss"])
            self.engine.step()
            lm += float(parts["loss_lm"].detach()) / micro_steps if "loss_lm" in parts else 0.0
            con += float(parts["loss_con"].detach()) / micro_steps if "loss_con" in parts else 0.0
        logged = {}
        if self.loss.uses_lm:
            logged["loss_lm"] = lm
        if self.loss.uses_con:
            logged["loss_con"] = con
        logged = mean_over_ranks(logged, self.device)
        loss = self.loss.a_lm * logged.get("loss_lm", 0.0) + self.loss.a_con * logged.get("loss_con", 0.0)
        return {"loss": loss, **logged}

    def _caches(self, micro_steps: int) -> bool:
        return self.loss.uses_con and self.contrastive_batch == "step" and micro_steps > 1

    def _cached_contrastive(self, batches: Sequence[Batch]) -> list[CachedContrastive]:
        """The step's InfoNCE and its gradients per micro-batch, from embeddings taken without gradient."""
        with torch.no_grad():
            pairs = [self.engine(b.to(self.device), mode="pairs") for b in batches]
        sizes = [p["a"].shape[0] for p in pairs]
        a = torch.cat([p["a"] for p in pairs]).float().requires_grad_()
        b = torch.cat([p["b"] for p in pairs]).float().requires_grad_()
        # Hard negatives: every batch of the run has their slot or none has (InputBuilder.interleaved_pairs_batch).
        n = torch.cat([p["n"] for p in pairs]).float().requires_grad_() if "n" in pairs[0] else None
        n_mask = torch.cat([p["n_mask"] for p in pairs]) if n is not None else None
        learnable = self.loss.infonce.log_scale.requires_grad
        log_scale = self.log_scale().detach().clone().float().to(self.device).requires_grad_(learnable)
        wrt = [a, b] + ([n] if n is not None else []) + ([log_scale] if learnable else [])
        with torch.enable_grad():
            loss = info_nce(a, b, self.loss.infonce.logit_scale(log_scale), n, n_mask)
            # The gather's backward sums every rank's gradient for these rows: the gradient of the sum of
            # the ranks' losses, which the engine's averaging over ranks turns into the mean's.
            grads = torch.autograd.grad(loss, wrt)
        grad_a, grad_b = grads[0].split(sizes), grads[1].split(sizes)
        grad_n = grads[2].split(sizes) if n is not None else [None] * len(sizes)
        grad_scale = grads[-1] if learnable else None
        return [
            CachedContrastive(loss.detach(), ga, gb, grad_scale if m == 0 else None, len(batches), gn)
            for m, (ga, gb, gn) in enumerate(zip(grad_a, grad_b, grad_n))
        ]
