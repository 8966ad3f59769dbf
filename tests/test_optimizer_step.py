"""One optimizer step is the same whatever the split of its global batch into ranks and micro-steps.

A small stand-in for the LLaVA model (CafeModel with linear layers for its hidden states, embeddings and
LM logits; the real forward, loss and step code) and an engine with DeepSpeed's contract (backward divided
by the micro-steps, gradients averaged over ranks at the boundary). The global batch of 8 pairs is split
as BatchPlan splits it: W ranks x A micro-steps. The real model under the real engine:
test_train.py::test_accumulation_reproduces_the_golden_steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from cafe_core.loss import IGNORE_INDEX, JointLoss
from cafe_core.model.joint import CafeModel
from cafe_core.ports import free_port
from cafe_core.train.data import BatchPlan
from cafe_core.train.step import OptimizerStep

GLOBAL_BATCH, DIM, VOCAB, LENGTH = 8, 6, 11, 7


@dataclass
class ToyBatch:
    x_img: torch.Tensor
    x_txt: torch.Tensor
    tokens: torch.Tensor
    targets: torch.Tensor
    x_neg: torch.Tensor | None = None  # hard negatives (text side), used where neg_mask is True
    neg_mask: torch.Tensor | None = None

    def to(self, device):
        return self


class ToyCafe(CafeModel):
    """CafeModel's forward and loss over linear stand-ins for the LLaVA parts."""

    def hidden_states(self, batch):
        return None

    def embeddings(self, hidden, batch, name):
        return F.normalize(self.hf["img"](batch.x_img) if name == "a" else self.hf["txt"](batch.x_txt), dim=-1)

    def negatives(self, hidden, batch, a):
        if batch.x_neg is None:
            return None
        n = F.normalize(self.hf["txt"](batch.x_neg), dim=-1)
        return torch.where(batch.neg_mask[:, None], n, a * 0.0), batch.neg_mask

    def lm_logits(self, hidden, batch):
        targets = batch.targets[:, 1:]
        keep = targets != IGNORE_INDEX
        return self.hf["head"](batch.tokens)[:, :-1][keep], targets[keep]


def problem(a_lm: float, a_con: float) -> tuple[ToyCafe, ToyBatch]:
    g = torch.Generator().manual_seed(0)
    hf = nn.ModuleDict({"img": nn.Linear(5, DIM), "txt": nn.Linear(4, DIM), "head": nn.Linear(3, VOCAB)})
    for p in hf.parameters():
        p.data = torch.randn(p.shape, generator=g)
    targets = torch.randint(0, VOCAB, (GLOBAL_BATCH, LENGTH), generator=g)
    targets[torch.rand(GLOBAL_BATCH, LENGTH, generator=g) < 0.5] = IGNORE_INDEX  # uneven counts per row
    data = ToyBatch(torch.randn(GLOBAL_BATCH, 5, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g),
                    torch.randn(GLOBAL_BATCH, LENGTH, 3, generator=g), targets,
                    torch.randn(GLOBAL_BATCH, 4, generator=g), torch.rand(GLOBAL_BATCH, generator=g) < 0.5)
    loss = JointLoss(a_lm=a_lm, a_con=a_con, temperature=0.1, learnable_temperature=True)
    return ToyCafe(hf, loss), data


class Engine:
    """DeepSpeed's contract: each backward is divided by the micro-steps; at the step boundary the
    gradients are averaged over ranks (no update: the test compares gradients)."""

    def __init__(self, module: nn.Module, micro_steps: int):
        self.module, self.micro_steps, self.calls = module, micro_steps, 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        (loss / self.micro_steps).backward()

    def step(self):
        self.calls += 1
        if self.calls % self.micro_steps == 0 and dist.is_initialized():
            for p in (p for p in self.module.parameters() if p.grad is not None):
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


def one_step(world: int, rank: int, micro_steps: int, a_lm: float, a_con: float, contrastive_batch: str,
             negatives: bool = False):
    model, data = problem(a_lm, a_con)
    plan = BatchPlan(GLOBAL_BATCH, micro_steps, world)
    order = np.arange(GLOBAL_BATCH)
    batches = []
    parts = (data.x_img, data.x_txt, data.tokens, data.targets) + ((data.x_neg, data.neg_mask) if negatives else ())
    for m in range(micro_steps):
        rows = torch.as_tensor(plan.rows(order, m, rank))
        batches.append(ToyBatch(*(t[rows] for t in parts)))
    logged = OptimizerStep(Engine(model, micro_steps), model.loss, torch.device("cpu"), contrastive_batch)(batches)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logged, grads


CASES = [  # (a_lm, a_con, contrastive_batch[, hard negatives])
    (1.0, 10.0, "step"),  # the joint loss, InfoNCE over the whole step (gradient caching)
    (1.0, 0.0, "micro"),  # LM only: the token normalisation alone
    (0.0, 1.0, "step", True),  # hard negatives (half the pairs have one) among the step's candidates
]
SPLITS = {1: [1, 2, 4, 8], 2: [1, 2, 4], 4: [1, 2]}  # world -> micro-steps


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {(case, a): one_step(world, rank, a, *case) for case in CASES for a in SPLITS[world]}
    if rank == 0:  # a file, not a queue: a full pipe would block the child while the parent joins
        torch.save(results, out)
    dist.destroy_process_group()


def assert_same(got, ref, what: str) -> None:
    (logged, grads), (ref_logged, ref_grads) = got, ref
    assert logged.keys() == ref_logged.keys() and logged == pytest.approx(ref_logged, rel=1e-5), what
    assert grads.keys() == ref_grads.keys(), what
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}, {name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=["joint-step", "lm-only", "hard-negatives"])
def test_one_process_any_accumulation_equals_one_big_batch(case):
    ref = one_step(1, 0, 1, *case)
    assert ref[0]["loss"] == pytest.approx(case[0] * ref[0].get("loss_lm", 0) + case[1] * ref[0].get("loss_con", 0))
    assert ("loss.infonce.log_scale" in ref[1]) == (case[1] > 0)  # the learnable temperature's gradient too
    for a in SPLITS[1][1:]:
        assert_same(one_step(1, 0, a, *case), ref, f"1 process x {a} micro-steps")


def test_micro_contrastive_batches_are_smaller():
    """Without caching, 2 micro-steps contrast 4 pairs each: a different loss and gradient (so the
    equalities above are not vacuous)."""
    (big, _), (small, _) = one_step(1, 0, 1, 1.0, 10.0, "micro"), one_step(1, 0, 2, 1.0, 10.0, "micro")
    assert small["loss_lm"] == pytest.approx(big["loss_lm"], rel=1e-6)
    assert abs(small["loss_con"] - big["loss_con"]) > 1e-3


@pytest.mark.slow
def test_ranks_times_micro_steps_equal_one_big_batch(tmp_path):
    """W ranks x A micro-steps == W*A ranks x 1 == 1 rank x W*A micro-steps, loss and gradients, for
    W in 2, 4 (processes over gloo) and every A that splits the batch of 8."""
    refs = {case: one_step(1, 0, 1, *case) for case in CASES}
    for world in (2, 4):
        out = tmp_path / f"world{world}.pt"
        mp.spawn(_rank_main, args=(world, free_port(), str(out)), nprocs=world, join=True)
        for (case, a), got in torch.load(out).items():
            assert_same(got, refs[case], f"{world} ranks x {a} micro-steps, {case}")


def test_hard_negatives_change_the_loss():
    """The negatives are used (so the hard-negatives case above is not vacuous)."""
    (plain, _), (hard, _) = one_step(1, 0, 1, 0.0, 1.0, "step"), one_step(1, 0, 1, 0.0, 1.0, "step", True)
    assert hard["loss_con"] > plain["loss_con"] + 1e-3
