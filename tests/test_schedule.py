"""Linear warmup then cosine decay (cafe_core/train/schedule.py), at hand-computed steps."""

from __future__ import annotations

import math

import pytest
import torch

from cafe_core.train.schedule import cosine_factor, cosine_with_warmup

COS_QUARTER = 0.5 * (1 + math.cos(math.pi / 4))  # 0.853553...: a quarter of the way through the decay


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0),  # warmup 4: (step + 1) / 4, the peak on the last warmup step
        (4, 1.0),  # decay starts at the peak
        (6, COS_QUARTER),  # progress (6 - 4) / (12 - 4) = 1/4
        (8, 0.5),  # halfway
        (10, 0.5 * (1 + math.cos(3 * math.pi / 4))),  # 0.146447
        (12, 0.0), (13, 0.0), (100, 0.0),  # past the end it stays at the floor
    ],
)
def test_warmup_then_cosine(step, expected):
    assert cosine_factor(step, warmup=4, total=12) == pytest.approx(expected, abs=1e-12)


def test_min_ratio_is_the_floor():
    assert cosine_factor(8, warmup=4, total=12, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # 0.55
    assert cosine_factor(12, warmup=4, total=12, min_ratio=0.1) == pytest.approx(0.1)
    assert cosine_factor(50, warmup=4, total=12, min_ratio=0.1) == pytest.approx(0.1)
    assert cosine_factor(4, warmup=4, total=12, min_ratio=0.1) == pytest.approx(1.0)
    assert cosine_factor(0, warmup=4, total=12, min_ratio=0.1) == pytest.approx(0.25)  # warmup ignores the floor


def test_no_warmup_and_degenerate_lengths():
    assert cosine_factor(0, warmup=0, total=10) == 1.0
    assert cosine_factor(5, warmup=0, total=10) == pytest.approx(0.5)
    assert cosine_factor(0, warmup=0, total=1) == 1.0  # a one-step run trains at the peak
    assert cosine_factor(3, warmup=3, total=3) == 1.0  # all warmup: no division by zero afterwards
    assert cosine_factor(4, warmup=3, total=3) == pytest.approx(0.0)


def test_scheduler_scales_every_group_from_its_own_peak():
    w = torch.nn.Parameter(torch.zeros(1))
    v = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "lr": 1e-3}, {"params": [v], "lr": 2e-6}], lr=1.0)
    sched = cosine_with_warmup(opt, warmup=2, total=6, min_ratio=0.0)
    seen = []
    for _ in range(7):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    # warmup 2 steps, then the cosine over progress 0, 1/4, 1/2, 3/4, 1 (total - warmup = 4 steps)
    factors = [0.5, 1.0, 1.0, COS_QUARTER, 0.5, 1 - COS_QUARTER, 0.0]
    assert [lr for lr, _ in seen] == pytest.approx([1e-3 * f for f in factors], abs=1e-15)
    assert [lr for _, lr in seen] == pytest.approx([2e-6 * f for f in factors], abs=1e-18)
