"""`cafe run`: the whole KFP pipeline on this machine through kfp.local, then a summary.

Every task runs as a subprocess in this Python environment (kfp.local's SubprocessRunner without a venv),
the same component code that runs in the cluster; S3 is the configured endpoint or the embedded SeaweedFS,
whose address and placeholder keys reach the tasks through the environment. kfp.local's own log (every
task's executor input and output) goes to `.cafe/logs/run-<run_id>.log`; the terminal shows the tasks'
progress and the stages' own lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from cafe_core.config import CafeConfig
from cafe_core.layout import DECISION_FILE, METRICS_FILE, WHY_FILE, RunLayout
from cafe_core.records import registry_root
from cafe_core.registry import ALIASES
from cafe_core.storage import Storage
from cafe_core.train.torchrun import child_env

KFP_ROOT = Path(".cafe/kfp-local")
LOG_DIR = Path(".cafe/logs")
# Lines worth showing live: kfp.local's task status, and the stages' own summary lines (with the command that
# requests a promotion by hand, in promote.mode ci without a CI configured).
SHOWN = re.compile(r"(Executing task|finished with status|Pipeline .* finished|"
                   r"^\s*((synth|convert|validate|train|export|evaluate|gate|promote|verify-release|request-promotion|"
                   r"rollback|compare): \S|step \d+:|gh workflow run |FAILED|error:|Traceback))")


class _Filter:
    """A stdout that writes everything to the log and echoes the interesting lines."""

    def __init__(self, log: TextIO, echo: TextIO):
        self.log, self.echo, self._buf = log, echo, ""

    def write(self, text: str) -> int:
        self.log.write(text)
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
            if SHOWN.search(plain):
                self.echo.write(plain.strip() + "\n")
                self.echo.flush()
        return len(text)

    def flush(self) -> None:
        self.log.flush()


def run_pipeline(cfg: CafeConfig, store: Storage, config_path: str | None, overrides: list[str],
                 pipeline: str = "cafe", **params: Any) -> dict[str, Any]:
    """Run a pipeline ("cafe" or "cafe-ablation") locally for `cfg`, the configuration resolved here from
    `config_path` and `overrides`: the pipeline's parameters are the ones that reproduce it
    (cafe_core.params.of_config), plus `params` (e.g. ratios for the ablation). The cafe pipeline is built
    for the configuration's promote.mode, both without retries (a failure here should show at once).
    Returns the seconds of the run and of its steps, and the log's path."""
    from kfp import local

    from cafe_core.params import PARAMS_OF, RunParams, of_config
    from pipelines import ablation, cafe

    arguments = of_config(cfg, config_path or RunParams().config, list(overrides), PARAMS_OF[pipeline],
                          train_mode="local", **params)
    os.environ.update(child_env(store))  # the tasks' S3 endpoint and placeholder keys, when embedded
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    KFP_ROOT.mkdir(parents=True, exist_ok=True)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = log_path(cfg.run_id)
    built = cafe.build(cfg.promote.mode, local=True) if pipeline == "cafe" else ablation.build(local=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(KFP_ROOT.resolve()))
    started = time.monotonic()
    before = set(KFP_ROOT.iterdir())
    with open(log, "w") as out, contextlib.redirect_stdout(_Filter(out, sys.stdout)), \
            contextlib.redirect_stderr(_Filter(out, sys.stderr)):
        built(**arguments.model_dump())
    wall = time.monotonic() - started
    run_dirs = sorted(set(KFP_ROOT.iterdir()) - before)
    return {"wall": wall, "steps": step_seconds(run_dirs[-1]) if run_dirs else {}, "log": str(log)}


def log_path(run_id: str) -> Path:
    """kfp.local's own log of a local run (every task's executor input and output)."""
    return LOG_DIR / f"run-{run_id}.log"


def where_everything_went(cfg: CafeConfig) -> list[str]:
    """The run summary's list of outputs (cafe_core/layout.py names them; the config may have moved some)."""
    run = RunLayout(cfg.root, cfg.run_id)
    data = cfg.data.output if cfg.data else run.convert
    return [
        f"  synthetic data     {cfg.synth.output}/  (train/, eval/)",
        f"  converted pairs    {data}/pairs/  {data}/rejects.jsonl  {data}/stats.json",
        f"  validation         {cfg.validate_.output}/summary.txt  {cfg.validate_.output}/data_docs/index.html",
        f"  checkpoints        {cfg.train.output}/checkpoints/  (latest.json)",
        f"  trained model      {cfg.train.output}/final/model/  {cfg.train.output}/final/loss_curve.png",
        f"  embeddings         {cfg.export.output}/index.parquet  {cfg.export.output}/shards/",
        f"  evaluation         {cfg.evaluate.output}/{METRICS_FILE}  {cfg.evaluate.output}/report.html",
        f"  gate decision      {cfg.gate.output}/{DECISION_FILE}  {cfg.gate.output}/{WHY_FILE}",
        f"  registry           {registry_root(cfg)}/{ALIASES}",
        f"  KFP artifacts      {KFP_ROOT}/  (kfp.local's pipeline root)",
    ]


# A task's last words: the stage's one-line error (`error: ...` / `FAILED: ...`), else a traceback's last line.
STAGE_ERROR = re.compile(r"^\s*((?:error|FAILED): .+)$")
FAILURE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Failed|Exceeded|Exception)): (.+)$")


def failure_reason(log_path: str | Path) -> str | None:
    """What made the run fail: the last stage error a task printed, else the last exception message."""
    stage = found = None
    for line in Path(log_path).read_text(errors="replace").splitlines():
        plain = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if match := STAGE_ERROR.match(plain):
            stage = match[1]
        elif match := FAILURE.match(plain):
            found = f"{match[1]}: {match[2]}"
    return stage or found


def step_seconds(run_dir: Path) -> dict[str, float]:
    """Each task's own working time, from the `seconds` its artifacts' metadata carries."""
    out: dict[str, float] = {}
    for path in run_dir.glob("*/executor_output.json"):
        data = json.loads(path.read_text())
        for group in data.get("artifacts", {}).values():
            for artifact in group.get("artifacts", []):
                seconds = _find(artifact.get("metadata", {}), "seconds")
                if seconds is not None:
                    out[path.parent.name] = max(out.get(path.parent.name, 0.0), float(seconds))
    return out


def _find(tree: Any, key: str) -> Any:
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None
