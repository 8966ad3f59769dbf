"""Learning-rate schedule: linear warmup, then cosine decay to min_lr_ratio of each group's peak."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def cosine_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """The multiplier of the peak learning rate for the optimizer step about to be taken."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def cosine_with_warmup(optimizer: Optimizer, warmup: int, total: int, min_ratio: float = 0.0) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: cosine_factor(step, warmup, total, min_ratio))
