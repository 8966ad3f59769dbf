"""CAFe's joint loss: L = a_lm * L_lm + a_con * L_con.

Both parts are written so that the loss and its gradients do not depend on how the global batch is split
across ranks (with gradients averaged over ranks, as DDP and DeepSpeed do):
- InfoNCE gathers the embeddings of every rank *with* gradient and scores the local rows against all
  columns (open_clip's gather_with_grad + local_loss); the gather's backward sums the column gradients back
  to the rank that owns them. The reference gathers without gradient, which shrinks the contrastive
  gradient as 1/world_size.
- The LM loss is normalised by the global number of target tokens, not each rank's own count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.nn.functional import all_gather as all_gather_autograd

from cafe_core.config import TEMPERATURE_RANGE

IGNORE_INDEX = -100
MIN_TEMPERATURE, MAX_TEMPERATURE = TEMPERATURE_RANGE
MAX_LOGIT_SCALE = 1.0 / MIN_TEMPERATURE  # 100: open_clip's clamp for a learnable temperature


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate x from every rank along dim 0; gradients flow back to each rank's own rows."""
    _, world = _world()
    if world == 1:
        return x
    # The synchronous autograd all-gather (its backward reduce-scatters the gradients). A long 2-process
    # CPU run with the asynchronous functional collective once aborted on heap corruption in gloo.
    return torch.cat(all_gather_autograd(x.contiguous(), group=dist.group.WORLD), dim=0)


def gather(x: Tensor) -> Tensor:
    """Concatenate x (no gradient) from every rank along dim 0."""
    _, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def global_sum(x: Tensor) -> Tensor:
    """Sum of a (no-grad) tensor over ranks."""
    _, world = _world()
    if world == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


class _ClampTowardRange(torch.autograd.Function):
    """min(x, high), with a gradient that can only bring x back: past the clamp, a gradient that would push
    x further out is dropped and one that pulls it back passes. A plain clamp has no gradient there (a
    learnt scale past it freezes); a straight-through one lets the parameter drift on unseen while the
    loss wants sharper logits (open_clip clamps the parameter in place instead, which DeepSpeed's fp32
    master copy would undo)."""

    @staticmethod
    def forward(ctx, x: Tensor, high: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.high = high
        return x.clamp(max=high)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        # Gradient descent moves x by -grad: grad < 0 past the clamp would move it further out.
        return torch.where((x > ctx.high) & (grad < 0), torch.zeros_like(grad), grad), None


class InfoNCE(nn.Module):
    """Symmetric InfoNCE over the global batch: mean of CE(a->b) and CE(b->a), logits in fp32.

    Inputs are L2-normalised embeddings of the local rows, row i of `a` matching row i of `b`; every
    rank must hold the same number of rows.

    A fixed temperature (within TEMPERATURE_RANGE) is used as given. A learnable one starts there and is
    learnt as log(1/temperature); its logit scale is clamped at MAX_LOGIT_SCALE (temperature >= 0.01).
    """

    def __init__(self, temperature: float = 0.05, learnable: bool = False):
        super().__init__()
        if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be within [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] (given {temperature})")
        self.learnable = learnable
        # Shape (1,), not a 0-d scalar: DeepSpeed's initial broadcast views every parameter as bytes,
        # which a 0-d tensor refuses (a learnable temperature crashed deepspeed.initialize).
        log_scale = torch.tensor([math.log(1.0 / temperature)])
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)

    @property
    def temperature(self) -> float:
        """The temperature the loss uses (a learnt one past the clamp reads 0.01)."""
        return 1.0 / float(self.logit_scale().detach())

    def logit_scale(self, log_scale: Tensor | None = None) -> Tensor:
        """exp(log_scale), clamped if learnable; `log_scale` stands in for the module's own (gradient
        caching differentiates a detached copy, outside any module call)."""
        log_scale = (self.log_scale if log_scale is None else log_scale).float()
        if self.learnable:
            log_scale = _ClampTowardRange.apply(log_scale, math.log(MAX_LOGIT_SCALE))
        return log_scale.exp()

    def forward(
        self, a: Tensor, b: Tensor, negatives: Tensor | None = None, negative_mask: Tensor | None = None
    ) -> Tensor:
        return info_nce(a, b, self.logit_scale(), negatives, negative_mask)


def info_nce(
    a: Tensor, b: Tensor, scale: Tensor, negatives: Tensor | None = None, negative_mask: Tensor | None = None
) -> Tensor:
    """This rank's symmetric InfoNCE: its rows of `a` against every rank's `b` and the reverse, at logit
    scale `scale`; the mean over ranks is the global batch's loss.

    Hard negatives (VLM2Vec): `negatives` row i is pair i's negative target, used where `negative_mask` is
    True (shape (batch,)); every rank's are gathered (with gradient) and join the candidates of a->b only:
    each query is scored against all targets and all negatives, its own target the label."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"expected two (batch, dim) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    rank, _ = _world()
    a, b = a.float(), b.float()
    all_a, all_b = gather_with_grad(a), gather_with_grad(b)
    labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
    logits_ab = scale * a @ all_b.T
    if negatives is not None:
        if negatives.shape != a.shape or negative_mask is None or negative_mask.shape != a.shape[:1]:
            raise ValueError(f"negatives {tuple(negatives.shape)} need the shape of a {tuple(a.shape)} and a mask "
                             f"of shape ({a.shape[0]},)")
        used = gather(negative_mask.to(torch.float32)) > 0.5  # (gloo gathers no bool tensors)
        scores = (scale * a @ gather_with_grad(negatives.float()).T).masked_fill(~used, float("-inf"))
        logits_ab = torch.cat([logits_ab, scores], dim=1)
    loss_ab = F.cross_entropy(logits_ab, labels)
    loss_ba = F.cross_entropy(scale * b @ all_a.T, labels)
    return (loss_ab + loss_ba) / 2


def lm_loss(logits: Tensor, targets: Tensor, step_tokens: Tensor | None = None, micro_steps: int = 1) -> Tensor:
    """Next-token cross-entropy over target tokens (IGNORE_INDEX elsewhere), averaged over the global
    number of target tokens so that every token weighs the same whatever rank and micro-step holds it.

    `logits[i]` predicts `targets[i]`: the caller has already shifted (and may have kept only the
    positions that have a target). Shapes (N, vocab) and (N,). `step_tokens` is the target count of the
    whole optimizer step (all `micro_steps` micro-batches on all ranks); without it, this micro-batch's
    global count.
    """
    _, world = _world()
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if step_tokens is None:
        step_tokens, micro_steps = global_sum((targets != IGNORE_INDEX).sum().to(logits.device, torch.float32)), 1
    # Gradients are averaged over ranks and micro-steps afterwards (DDP, DeepSpeed), hence the factors.
    return total * (world * micro_steps) / step_tokens.to(logits.device, torch.float32).clamp(min=1.0)


@dataclass
class CachedContrastive:
    """One micro-batch's share of a contrastive loss computed over the whole optimizer step (GradCache):
    the loss's gradients with respect to this micro-batch's embeddings (and the log logit scale), taken
    over the step's global batch with the model's output held fixed."""

    loss: Tensor  # this rank's InfoNCE over the step's global batch (for logging)
    grad_a: Tensor
    grad_b: Tensor
    grad_log_scale: Tensor | None  # on one micro-batch of the step only
    micro_steps: int
    grad_negatives: Tensor | None = None  # when the step has hard negatives

    def surrogate(self, a: Tensor, b: Tensor, log_scale: Tensor, negatives: Tensor | None = None) -> Tensor:
        """A scalar whose gradient through (a, b, log_scale, negatives) is the cached one, scaled by
        micro_steps since the engine divides each micro-step's backward by their number."""
        s = (a.float() * self.grad_a).sum() + (b.float() * self.grad_b).sum()
        if self.grad_negatives is not None:
            s = s + (negatives.float() * self.grad_negatives).sum()
        if self.grad_log_scale is not None:
            s = s + (log_scale.float() * self.grad_log_scale).sum()  # log_scale has shape (1,)
        return s * self.micro_steps


@dataclass
class LossParts:
    total: Tensor
    lm: Tensor | None
    con: Tensor | None

    def as_dict(self) -> dict[str, Tensor]:
        """Named tensors (a plain dict: DeepSpeed ZeRO-3 hooks the tensors of dicts, not of dataclasses)."""
        named = {"loss": self.total, "loss_lm": self.lm, "loss_con": self.con}
        return {k: v for k, v in named.items() if v is not None}

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in self.as_dict().items()}


class JointLoss(nn.Module):
    """a_lm * L_lm + a_con * L_con; a weight of 0 switches its part off (LM-only, contrastive-only)."""

    def __init__(self, a_lm: float = 1.0, a_con: float = 10.0, temperature: float = 0.05, learnable_temperature: bool = False):
        super().__init__()
        if a_lm < 0 or a_con < 0 or a_lm + a_con == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0 (a_lm={a_lm}, a_con={a_con})")
        self.a_lm, self.a_con = a_lm, a_con
        self.infonce = InfoNCE(temperature, learnable_temperature)

    @property
    def uses_lm(self) -> bool:
        return self.a_lm > 0

    @property
    def uses_con(self) -> bool:
        return self.a_con > 0

    def forward(
        self,
        lm_logits: Tensor | None = None,
        lm_targets: Tensor | None = None,
        emb_a: Tensor | None = None,
        emb_b: Tensor | None = None,
        step_tokens: Tensor | None = None,
        micro_steps: int = 1,
        cached: CachedContrastive | None = None,
        negatives: Tensor | None = None,
        negative_mask: Tensor | None = None,
    ) -> LossParts:
        """The loss of one micro-batch. With `cached`, the contrastive part's value is the step's and its
        gradient the cached one (`total` is then the objective to differentiate, not the loss's value).
        `negatives`, `negative_mask`: hard negatives of the contrastive part (info_nce)."""
        lm = lm_loss(lm_logits, lm_targets, step_tokens, micro_steps) if self.uses_lm else None
        if not self.uses_con:
            con = objective = None
        elif cached is not None:
            con, objective = cached.loss, cached.surrogate(emb_a, emb_b, self.infonce.log_scale, negatives)
        else:
            con = objective = self.infonce(emb_a, emb_b, negatives, negative_mask)
        parts = [w * p for w, p in ((self.a_lm, lm), (self.a_con, objective)) if p is not None]
        return LossParts(total=sum(parts[1:], parts[0]), lm=lm, con=con)
