"""Pipeline overhead: the CAFe pipeline through kfp.local against the same stages called in one process.

    .venv/bin/python benchmarks/pipeline_overhead.py                     # 100 training steps, local storage
    .venv/bin/python benchmarks/pipeline_overhead.py --max-steps 400     # the `make run` amount of training

Both runs do the same work on the same synthetic data (generated once before timing, local folder as S3
stand-in): convert, validate, train (2 processes), export, six evaluation families, merge, gate, promote.
The pipeline run starts a process per task (interpreter, imports, KFP executor, artifact files); the
in-process run imports once. The difference is the pipeline's overhead (orchestration + imports).

Also measured in the same run: what a task that needs no model (resolve config, merge, gate, ...) spends
on imports now, against importing the model stack (torch, transformers, deepspeed) as every task did before.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cafe_core import stages  # noqa: E402
from cafe_core.config import FAMILIES, load_config  # noqa: E402
from cafe_core.kfp_local import run_pipeline  # noqa: E402
from cafe_core.storage import Storage  # noqa: E402

LIGHT_TASK = "import kfp.dsl.executor_main, components, cafe_core.stages.step, cafe_core.gate, cafe_core.evaluate.merge"
MODEL_STACK = "import torch, transformers, deepspeed"


def in_process(cfg) -> float:
    store = Storage()
    started = time.monotonic()
    for stage in (stages.data.convert, stages.data.validate, stages.train.train, stages.evaluate.export):
        stage(cfg, store)
    for family in FAMILIES:
        stages.evaluate.evaluate_family(cfg, store, family)
    stages.evaluate.merge_evaluation(cfg, store)
    if not stages.release.gate(cfg, store).failure:
        stages.release.promote(cfg, store)
    return time.monotonic() - started


def import_seconds(code: str, repeats: int = 3) -> float:
    """The best of `repeats` fresh interpreters (the file cache warm, as for consecutive tasks)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True)
        best = min(best, time.monotonic() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=100)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="cafe-overhead-")
    overrides = [f"root={root}", f"train.max_steps={args.max_steps}"]
    direct_cfg = load_config("configs/local.yaml", [*overrides, "run_id=direct"])
    stages.data.synth(direct_cfg, Storage())  # shared data, outside both timings
    direct = in_process(direct_cfg)
    pipe_cfg = load_config("configs/local.yaml", [*overrides, "run_id=pipeline"])
    timing = run_pipeline(pipe_cfg, Storage(), "configs/local.yaml", [*overrides, "run_id=pipeline"])
    light, heavy = import_seconds(LIGHT_TASK), import_seconds(f"{LIGHT_TASK}; {MODEL_STACK}")
    overhead = timing["wall"] - direct
    print(f"\n{args.max_steps} training steps, local storage ({root})")
    print(f"  stages in one process:      {direct:6.1f} s")
    print(f"  pipeline through kfp.local: {timing['wall']:6.1f} s  (resolve-config and prepare-data tasks included)")
    print(f"  overhead (orchestration + imports): {overhead:.1f} s = {overhead / timing['wall']:.0%} of the pipeline run"
          f"  (target < 20%)")
    print(f"  imports of a task that needs no model: {light:.1f} s, with the model stack {heavy:.1f} s "
          f"({heavy / light:.1f}x)")
    print(f"  kfp.local log: {timing['log']}  ({Path(timing['log']).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
