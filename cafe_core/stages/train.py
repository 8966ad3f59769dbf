"""Training: on this machine (torchrun with train.nproc_per_node processes, or this process), or as a
training job in the cluster that the step creates and follows."""

from __future__ import annotations

import os

from cafe_core.config import CafeConfig
from cafe_core.errors import StageFailed
from cafe_core.stages.base import Result, committed, stage
from cafe_core.storage import Storage


def _trained(store: Storage, final: str, **meta) -> Result:
    """The final output, with its steps and held-out accuracy (from its manifest)."""
    from cafe_core.commit import read_manifest

    m = read_manifest(store, final).meta
    heldout = {k: v for k, v in m.items() if k.startswith("heldout/")}
    line = f"train: {final}"
    if "heldout/i2t_top1" in heldout:
        line = (f"train: held-out image->text top-1 {heldout['heldout/i2t_top1']:.3f} (chance "
                f"{heldout.get('heldout/chance', float('nan')):.3f}) after {m.get('steps')} steps\n{line}")
    result = committed(store, "train", final, line, steps=m.get("steps"), **heldout, **meta)
    result.metrics = {k: float(v) for k, v in heldout.items()}
    return result


@stage("train", lambda cfg: cfg.train.output)
def train(cfg: CafeConfig, store: Storage) -> Result:
    """Fine-tune with CAFe (torchrun + DeepSpeed), resumable from the checkpoints under train.output. With
    train.nproc_per_node > 1 outside torchrun, checks everything once and starts torchrun."""
    from cafe_core.train.preflight import preflight
    from cafe_core.train.torchrun import in_torchrun, torchrun

    final = f"{cfg.train.output}/final"
    if cfg.train.nproc_per_node > 1 and not in_torchrun():
        preflight(cfg, store, world=cfg.train.nproc_per_node)  # fail here once, not in every child
        print(f"train: {cfg.train.nproc_per_node} processes under torchrun", flush=True)
        if torchrun(cfg, store, ["train"]) != 0:
            raise StageFailed(f"a training process failed; checkpoints under {cfg.train.output}/checkpoints")
        result = _trained(store, final)
        result.summary = ""  # rank 0 has printed it
        return result
    from cafe_core.train.trainer import run

    result = run(cfg, store)
    if os.environ.get("RANK", "0") != "0":  # a torchrun child: rank 0 reports
        return Result("train", result.output, "")
    return _trained(store, result.output)


@stage("train", lambda cfg: cfg.train.output)
def train_in_cluster(cfg: CafeConfig, store: Storage) -> Result:
    """Train as a training job in the cluster, everything from cfg.cluster: a Training Operator PyTorchJob
    (Master + Workers) or a Kubeflow Trainer TrainJob (cluster.api), followed until it ends; fails when the job
    fails, times out or cannot be scheduled. `cafe job render` prints the same job."""
    from cafe_core.cluster.jobs import run_training_job
    from cafe_core.cluster.spec import current_namespace, job_spec, kfp_step_owner

    # In multi-user Kubeflow a step may only create jobs in its profile's namespace, where the S3 Secret is.
    namespace = cfg.cluster.namespace or current_namespace()
    owner = kfp_step_owner()  # the job goes when the step's pod goes (cancelled, evicted, cleaned up)
    if owner is not None and owner.namespace != namespace:
        print(f"train: the job goes to namespace {namespace}, the step runs in {owner.namespace}: the job cannot be "
              "owned by the step's pod, so a cancelled run leaves it to its TTL; use the step's namespace", flush=True)
        owner = None
    spec = job_spec(cfg, owner=owner, namespace=namespace)
    run_training_job(spec)
    return _trained(store, f"{cfg.train.output}/final", job=spec.name)
