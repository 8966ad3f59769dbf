"""The process group and the trainer's own collectives: right for the device a rank trains on.

A GPU job's group serves CUDA tensors through NCCL; a collective of a CPU tensor there fails on the first
step. These tests cannot run NCCL, so they check both halves of the rule on CPU: the backend string chosen
for a GPU serves CPU tensors too, and every reduction the trainer makes itself puts its tensor on the
training device (a spy stands in for the collective and reports the device; the "meta" device stands in
for a GPU).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from cafe_core.config import ConfigError
from cafe_core.loss import JointLoss
from cafe_core.train import distributed
from cafe_core.train.distributed import backend_map, process_group_backend, training_device
from cafe_core.train.step import OptimizerStep
from cafe_core.train.trainer import Trainer

CUDA, CPU, META = torch.device("cuda", 0), torch.device("cpu"), torch.device("meta")


def test_the_default_gpu_backend_serves_both_devices():
    assert backend_map(process_group_backend(CUDA)) == {"cpu": "gloo", "cuda": "nccl"}
    assert process_group_backend(CPU) == "gloo"
    # What a GPU acceptance check runs: two ranks on one GPU, gloo serving CUDA tensors only.
    assert process_group_backend(CUDA, "cuda:gloo") == "cuda:gloo"


@pytest.mark.parametrize("device, backend, message", [
    (CPU, "nccl", "serves no cpu tensors"),
    (CPU, "cuda:gloo", "serves no cpu tensors"),
    (CUDA, "cpu:gloo", "serves no cuda tensors"),
    (CPU, "cpu:glo", "unknown backend glo"),
])
def test_a_backend_that_cannot_serve_the_training_device_is_refused(device, backend, message):
    with pytest.raises(ConfigError, match=message) as e:
        process_group_backend(device, backend)
    assert "train.dist_backend" in str(e.value)


def test_ranks_share_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert [training_device(r) for r in (0, 1)] == [CUDA, CUDA]


class Collective(Exception):
    """Raised by the spy instead of reducing: carries the tensor's device."""


@pytest.fixture
def spy(monkeypatch):
    """A world of two whose all_reduce reports the device of the tensor it is given."""
    def all_reduce(tensor, *args, **kwargs):
        raise Collective(tensor.device)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)


def device_of_collective(call) -> torch.device:
    with pytest.raises(Collective) as e:
        call()
    return e.value.args[0]


def test_the_trainers_reductions_run_on_the_training_device(spy):
    assert device_of_collective(lambda: distributed.sum_over_ranks([1.0, 2.0], META)) == META
    assert device_of_collective(lambda: distributed.mean_over_ranks({"loss": 1.0}, META)) == META
    # The throughput figures of a trainer whose rank trains on the (stand-in) GPU.
    trainer = Trainer.__new__(Trainer)
    trainer.device, trainer.world, trainer.n_params = META, 2, 10
    trainer.t = types.SimpleNamespace(peak_tflops=None)
    trainer.optimizer = types.SimpleNamespace(param_groups=[{"name": "llm", "lr": 1e-5}])
    assert device_of_collective(lambda: trainer._throughput(8, 100, 1.0)) == META
    # The step's target-token count, reduced before the first micro-batch's forward.
    step = OptimizerStep(engine=None, loss=JointLoss(a_lm=1.0, a_con=1.0), device=META)
    batch = types.SimpleNamespace(targets=torch.tensor([[-100, 5, 6]]))
    assert device_of_collective(lambda: step([batch])) == META
