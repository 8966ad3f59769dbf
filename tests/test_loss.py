"""The joint loss on hand-computed cases, and its invariance to how the batch is split across ranks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cafe_core.loss import IGNORE_INDEX, InfoNCE, JointLoss, lm_loss
from cafe_core.ports import free_port

EYE = torch.eye(2)
SWAP = torch.tensor([[0.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize(
    "a, b, temperature, expected",
    [
        (EYE, EYE, 1.0, math.log(1 + math.exp(-1))),  # matched: logits [1, 0]
        (EYE, EYE, 0.5, math.log(1 + math.exp(-2))),  # scale 2: logits [2, 0]
        (EYE, SWAP, 1.0, math.log(1 + math.exp(1))),  # every positive scores 0, its negative 1
        (torch.ones(2, 2) / math.sqrt(2), torch.ones(2, 2) / math.sqrt(2), 1.0, math.log(2)),  # ties: chance
    ],
)
def test_infonce_hand_computed(a, b, temperature, expected):
    assert InfoNCE(temperature)(a, b).item() == pytest.approx(expected, abs=1e-6)


def test_infonce_is_symmetric_mean_of_both_directions():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    logits = a @ b.T / 0.05
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert InfoNCE(0.05)(a, b).item() == pytest.approx(expected.item(), rel=1e-6)
    assert InfoNCE(0.05)(b, a).item() == pytest.approx(expected.item(), rel=1e-6)


def test_hard_negatives_join_the_query_candidates_only():
    """a = b = I, temperature 1. Pair 0's negative is a's own row 0 (scores 1), pair 1's is masked out:
    query 0 scores [1, 0 | 1], query 1 [0, 1 | 0] (its column for negative 1 is -inf); the target->query
    direction is unchanged, log(1 + e^-1) per row."""
    a = EYE.clone().requires_grad_()
    negatives = torch.stack([EYE[0], torch.tensor([5.0, 5.0])]).requires_grad_()  # row 1: masked, any value
    mask = torch.tensor([True, False])
    got = InfoNCE(1.0)(a, EYE, negatives, mask)
    e = math.e
    q0, q1 = math.log(2 * e + 1) - 1, math.log(e + 2) - 1
    assert got.item() == pytest.approx(((q0 + q1) / 2 + math.log(1 + 1 / e)) / 2, abs=1e-6)
    got.backward()
    assert torch.equal(negatives.grad[1], torch.zeros(2)) and negatives.grad[0].abs().sum() > 0
    assert InfoNCE(1.0)(EYE, EYE, torch.zeros(2, 2), torch.tensor([False, False])).item() == pytest.approx(
        InfoNCE(1.0)(EYE, EYE).item(), abs=1e-7)  # all masked: plain InfoNCE
    with pytest.raises(ValueError, match="mask"):
        InfoNCE(1.0)(EYE, EYE, torch.zeros(2, 2))


def test_infonce_computes_in_fp32_and_learns_its_temperature():
    loss = InfoNCE(0.05, learnable=True)
    a = F.normalize(torch.randn(4, 8), dim=-1).bfloat16()
    out = loss(a, a)
    assert out.dtype == torch.float32
    out.backward()
    assert loss.log_scale.grad is not None and loss.temperature == pytest.approx(0.05)
    assert not list(InfoNCE(0.05).parameters())  # fixed temperature: nothing to train


def test_infonce_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        InfoNCE(0.0)
    for temperature, learnable in ((0.005, False), (1.5, False), (0.005, True)):
        with pytest.raises(ValueError, match=r"within \[0\.01, 1\.0\]"):
            InfoNCE(temperature, learnable)
    with pytest.raises(ValueError, match="same shape|one shape"):
        InfoNCE()(torch.ones(2, 3), torch.ones(3, 3))


# Unit rows at cosine c to their own pair and s to the other: each direction's loss is log(1 + e^(-scale (c - s))).
NEAR = F.normalize(torch.tensor([[1.0, 0.9], [0.9, 1.0]]), dim=-1)
C, S = float(NEAR[0, 0]), float(NEAR[0, 1])


def test_fixed_temperature_is_used_as_given():
    """A fixed temperature is not clamped: 0.02 (VLM2Vec's) scores at logit scale 50, 0.01 at 100."""
    for temperature, scale in ((0.02, 50.0), (0.01, 100.0), (1.0, 1.0)):
        loss = InfoNCE(temperature)
        assert loss.logit_scale().item() == pytest.approx(scale, rel=1e-6) and loss.temperature == pytest.approx(temperature)
        expected = math.log1p(math.exp(-scale * (C - S)))
        assert loss(EYE, NEAR).item() == pytest.approx(expected, abs=2e-5)  # fp32 logits of up to 100


def test_learnable_temperature_survives_deepspeeds_broadcast():
    """deepspeed.initialize broadcasts every parameter as `p.data.view(torch.uint8)`, which a 0-d tensor
    refuses: `train.loss.learnable_temperature=true` crashed before the first step."""
    loss = JointLoss(learnable_temperature=True)
    for p in loss.parameters():
        assert p.data.view(torch.uint8).numel() == 4 * p.numel()


def test_learnable_temperature_is_clamped_at_0_01():
    loss = InfoNCE(0.05, learnable=True)
    assert loss(EYE, NEAR).item() == pytest.approx(math.log1p(math.exp(-20 * (C - S))), abs=2e-5)
    with torch.no_grad():
        loss.log_scale.fill_(math.log(1000.0))  # learnt past the clamp
    out = loss(EYE, NEAR)
    assert out.item() == pytest.approx(math.log1p(math.exp(-100 * (C - S))), abs=2e-5)
    assert loss.temperature == pytest.approx(0.01)  # the temperature in use, not 0.001
    out.backward()
    # Past the clamp, a gradient that would push the scale further out is dropped (here the loss wants
    # sharper logits: no drift)...
    assert loss.log_scale.grad.item() == 0.0
    # ...and one that pulls it back passes: with the pairs mismatched the loss wants softer logits.
    loss.log_scale.grad = None
    loss(EYE, NEAR.flip(0)).backward()
    margin = 100 * (C - S)  # the matching pair now scores S, the other C
    assert loss.log_scale.grad.item() == pytest.approx(margin / (1 + math.exp(-margin)), rel=1e-3)


def test_learnable_temperature_learns_at_its_own_rate():
    """The trainer's parameter groups give the temperature train.optim.lr_temperature and no weight decay:
    a few AdamW steps move it visibly, where the LLM's learning rate (1e-5) would barely move it."""
    from types import SimpleNamespace

    from cafe_core.config import ModelConfig, TrainConfig
    from cafe_core.model.build import build
    from cafe_core.model.joint import CafeModel
    from cafe_core.train.trainer import Trainer

    t = TrainConfig(loss={"temperature": 0.05, "learnable_temperature": True}, optim={"weight_decay": 0.1})
    assert t.optim.lr_temperature == 1e-3 and t.optim.lr_llm == 1e-5
    hf, _ = build(ModelConfig())
    a = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    b = F.normalize(a + 0.5 * torch.randn(8, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    moved = {}
    for lr in (t.optim.lr_temperature, t.optim.lr_llm):
        model = CafeModel(hf, JointLoss(a_lm=0.0, a_con=1.0, temperature=0.05, learnable_temperature=True))
        optim = t.optim.model_copy(update={"lr_temperature": lr})
        groups = Trainer._param_groups(SimpleNamespace(t=t.model_copy(update={"optim": optim}), model=model), hf)
        temp = next(g for g in groups if g["name"] == "temperature")
        assert temp["params"] == [model.loss.infonce.log_scale] and temp["lr"] == lr and temp["weight_decay"] == 0.0
        assert next(g for g in groups if g["name"] == "llm")["weight_decay"] == 0.1
        opt = torch.optim.AdamW(groups)
        for _ in range(20):
            opt.zero_grad()
            model.loss(emb_a=a, emb_b=b).total.backward()
            opt.step()
        moved[lr] = abs(model.loss.infonce.temperature / 0.05 - 1)
    # Adam moves log(1/T) by about lr a step: ~2% in 20 steps at 1e-3, ~0.02% at 1e-5
    assert moved[1e-3] > 0.01 and moved[1e-5] < 0.001


def test_lm_loss_hand_computed():
    logits = torch.zeros(4, 5)  # uniform over 5 tokens: log 5 each
    targets = torch.tensor([1, IGNORE_INDEX, 3, IGNORE_INDEX])
    assert lm_loss(logits, targets).item() == pytest.approx(math.log(5))
    logits[0, 1] = 10.0  # one confident correct token
    expected = (-F.log_softmax(logits[0], -1)[1] + math.log(5)) / 2
    assert lm_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    assert lm_loss(logits, torch.full((4,), IGNORE_INDEX)).item() == 0.0


def test_joint_loss_weights_and_switches():
    torch.manual_seed(0)
    logits, targets = torch.randn(6, 7), torch.randint(0, 7, (6,))
    a, b = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(3, 4), dim=-1)
    lm, con = lm_loss(logits, targets), InfoNCE(0.05)(a, b)
    both = JointLoss(a_lm=1, a_con=10)(logits, targets, a, b)
    assert both.total.item() == pytest.approx(lm.item() + 10 * con.item(), rel=1e-6)
    assert both.as_floats().keys() == {"loss", "loss_lm", "loss_con"}
    con_only = JointLoss(a_lm=0, a_con=1)(None, None, a, b)
    assert con_only.lm is None and con_only.total.item() == pytest.approx(con.item())
    lm_only = JointLoss(a_lm=1, a_con=0)(logits, targets)
    assert lm_only.con is None and lm_only.total.item() == pytest.approx(lm.item())
    with pytest.raises(ValueError):
        JointLoss(a_lm=0, a_con=0)


# --- world-size invariance ---------------------------------------------------------------------------

GLOBAL_BATCH, DIM, VOCAB = 8, 6, 11


def _problem():
    """A tiny 'model' (two linear encoders + an LM head) and a fixed global batch."""
    torch.manual_seed(1)
    model = torch.nn.ModuleDict(
        {"img": torch.nn.Linear(DIM, DIM), "txt": torch.nn.Linear(DIM, DIM), "head": torch.nn.Linear(DIM, VOCAB)}
    )
    x_img, x_txt = torch.randn(GLOBAL_BATCH, DIM), torch.randn(GLOBAL_BATCH, DIM)
    tokens = torch.randn(GLOBAL_BATCH, 5, DIM)
    targets = torch.randint(0, VOCAB, (GLOBAL_BATCH, 5))
    targets[torch.rand(GLOBAL_BATCH, 5) < 0.4] = IGNORE_INDEX  # uneven target counts per row
    return model, x_img, x_txt, tokens, targets


def _loss_and_grads(rows: slice):
    model, x_img, x_txt, tokens, targets = _problem()
    loss_fn = JointLoss(a_lm=1.0, a_con=10.0, temperature=0.05)
    img = F.normalize(model["img"](x_img[rows]), dim=-1)
    txt = F.normalize(model["txt"](x_txt[rows]), dim=-1)
    logits = model["head"](tokens[rows]).flatten(0, 1)
    parts = loss_fn(logits, targets[rows].flatten(), img, txt)
    parts.total.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return parts, grads


def _rank_main(rank: int, world: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    per = GLOBAL_BATCH // world
    parts, grads = _loss_and_grads(slice(rank * per, (rank + 1) * per))
    for g in grads:  # what DDP / DeepSpeed do: average gradients over ranks
        dist.all_reduce(g)
        g /= world
    values = torch.tensor([parts.total.item(), parts.lm.item(), parts.con.item()])
    dist.all_reduce(values)
    queue.put((rank, (values / world).tolist(), [g.tolist() for g in grads]))
    dist.destroy_process_group()



def test_two_ranks_equal_one_rank_holding_the_global_batch():
    single, single_grads = _loss_and_grads(slice(None))
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_rank_main, args=(2, free_port(), queue), nprocs=2, join=True)
    by_rank = {rank: (values, grads) for rank, values, grads in (queue.get() for _ in range(2))}
    losses, grads = by_rank[0]
    assert losses == pytest.approx([single.total.item(), single.lm.item(), single.con.item()], rel=1e-5)
    for g2, g1 in zip(grads, single_grads):
        torch.testing.assert_close(torch.tensor(g2), g1, rtol=1e-5, atol=1e-6)
