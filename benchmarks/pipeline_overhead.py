"""Pipeline overhead: the CAFe pipeline through kfp.local against the same steps called in one process.

    .venv/bin/python benchmarks/pipeline_overhead.py                     # 100 training steps, local storage
    .venv/bin/python benchmarks/pipeline_overhead.py --max-steps 400     # the `make run` amount of training

Both runs do the same work on the same synthetic data (generated once before timing, local folder as S3
stand-in): convert, validate, train (2 processes), export, six evaluation families, merge, gate, promote.
The pipeline run starts a process per task (interpreter, imports of torch/transformers, KFP executor,
artifact files); the in-process run imports once. The difference is the pipeline's overhead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cafe_core import steps  # noqa: E402
from cafe_core.config import load_config  # noqa: E402
from cafe_core.kfp_local import run_pipeline  # noqa: E402
from cafe_core.storage import Storage  # noqa: E402
from pipelines.common import FAMILIES  # noqa: E402


def in_process(run_config: str) -> float:
    started = time.monotonic()
    for step in (steps.convert, steps.validate, steps.train_local, steps.export):
        step(run_config)
    for family in FAMILIES:
        steps.evaluate_family(run_config, family)
    steps.merge_evaluation(run_config)
    _, decision, _ = steps.gate(run_config)
    if decision == "PASS":
        steps.promote(run_config)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=100)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="cafe-overhead-")
    overrides = [f"train.max_steps={args.max_steps}"]
    direct_cfg = load_config("configs/local.yaml", [f"root={root}", "run_id=direct", *overrides])
    steps.prepare_data(direct_cfg.to_yaml())  # shared data, outside both timings
    direct = in_process(direct_cfg.to_yaml())
    pipe_cfg = load_config("configs/local.yaml", [f"root={root}", "run_id=pipeline", *overrides])
    timing = run_pipeline(pipe_cfg, Storage(), "configs/local.yaml", overrides)
    print(f"\n{args.max_steps} training steps, local storage ({root})")
    print(f"  steps in one process:      {direct:6.1f} s")
    print(f"  pipeline through kfp.local: {timing['wall']:6.1f} s  (resolve-config and prepare-data tasks included)")
    print(f"  overhead: {timing['wall'] - direct:.1f} s ({(timing['wall'] - direct) / timing['wall']:.0%} of the pipeline run)")
    print(f"  kfp.local log: {timing['log']}  ({Path(timing['log']).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
