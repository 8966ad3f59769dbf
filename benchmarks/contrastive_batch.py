"""Peak memory and step time against the contrastive batch, with and without gradient caching.

    .venv/bin/python benchmarks/contrastive_batch.py                  # batches 8..64, micro-batch 8, 3 steps
    .venv/bin/python benchmarks/contrastive_batch.py --batches 8 16 32 64 128 --micro 8

For each global batch B: "one pass" runs B pairs as one micro-batch (InfoNCE over B, all activations
at once); "cached" runs B/micro micro-batches under train.contrastive_batch=step (InfoNCE over the same B
pairs by gradient caching). Both do forward + backward + AdamW through the trainer's OptimizerStep on the
tiny model at the 0.5B model's proportions, one process. Every configuration runs in a fresh process;
its peak is the growth of the process's peak RSS over its RSS before the first step (CPU: no allocator
statistics), so it counts activations and gradients, not the model. Batches are built before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(batch: int, micro: int, steps: int, threads: int) -> dict:
    import torch

    from benchmarks.train_step import PROPORTIONS_0_5B, make_data
    from cafe_core.config import ModelConfig, PromptConfig
    from cafe_core.loss import JointLoss
    from cafe_core.model.build import build
    from cafe_core.model.inputs import InputBuilder
    from cafe_core.model.joint import CafeModel
    from cafe_core.train.step import OptimizerStep

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf, processor = build(ModelConfig(tiny=PROPORTIONS_0_5B))
    model = CafeModel(hf, JointLoss(a_lm=1.0, a_con=10.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    builder = InputBuilder(processor, PromptConfig(), 1024)
    images, captions, convs = make_data(batch)
    batches = [builder.pairs_batch(images[i:i + micro], captions[i:i + micro], convs[i:i + micro])
               for i in range(0, batch, micro)]

    class Engine:  # DeepSpeed's contract on one process: backward / micro-steps, update at the boundary
        def __init__(self):
            self.calls = 0

        def __call__(self, *a, **k):
            return model(*a, **k)

        def backward(self, loss):
            (loss / len(batches)).backward()

        def step(self):
            self.calls += 1
            if self.calls % len(batches) == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    step = OptimizerStep(Engine(), model.loss, torch.device("cpu"), "step")
    before = rss_mb()
    seconds, logged = [], {}
    for _ in range(steps):
        start = time.perf_counter()
        logged = step(batches)
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mb": peak - before, "step_s": statistics.median(seconds), "loss_con": logged["loss_con"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=int, nargs=2, metavar=("BATCH", "MICRO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.steps, args.threads)))
        return

    def run(batch: int, micro: int) -> dict:
        cmd = [sys.executable, __file__, "--one", str(batch), str(micro), "--steps", str(args.steps),
               "--threads", str(args.threads)]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    print(f"tiny model at the 0.5B proportions, micro-batch {args.micro}, {args.steps} steps (median), "
          f"{args.threads} threads; peak = activation/gradient memory over the model's")
    print(f"{'batch':>5} {'one pass MB':>12} {'cached MB':>10} {'mem ratio':>9} {'one pass s':>11} {'cached s':>9} "
          f"{'time ratio':>10} {'InfoNCE one/cached':>19}")
    for batch in args.batches:
        whole, cached = run(batch, batch), run(batch, args.micro)
        print(f"{batch:>5} {whole['peak_mb']:>12.0f} {cached['peak_mb']:>10.0f} "
              f"{cached['peak_mb'] / max(whole['peak_mb'], 1e-9):>9.2f} {whole['step_s']:>11.2f} {cached['step_s']:>9.2f} "
              f"{cached['step_s'] / whole['step_s']:>10.2f} {whole['loss_con']:>9.4f}/{cached['loss_con']:.4f}")


if __name__ == "__main__":
    main()
