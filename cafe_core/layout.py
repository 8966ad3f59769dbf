"""Where a run's outputs go: the one place that names every stage's output under a root.

    {root}/datasets/shapes-v1/           synthetic sets (shared by runs; train/ and eval/)
    {root}/runs/{run_id}/convert/        pairs, rejects, stats
    {root}/runs/{run_id}/validate/       summary, result, Data Docs
    {root}/runs/{run_id}/train/          checkpoints/, final/ (model/, loss curve)
    {root}/runs/{run_id}/export/         embeddings (safetensors shards + index)
    {root}/runs/{run_id}/evaluate/       one folder per family, metrics.json, report.html
    {root}/runs/{run_id}/gate/           decision.json, why.md
    {root}/runs/{run_id}/ablation/       the a_lm:a_con comparison
    {root}/registry/<model>/             versions and aliases

The configuration's defaults are `RunLayout.template()`'s strings (`{root}` and `{run_id}` filled in when a
config is loaded); the pipelines, the ablation comparison and the run summary read the same properties.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNS = "runs"
SYNTHETIC = "datasets/shapes-v1"
METRICS_FILE = "metrics.json"  # evaluate/ and each evaluate/<family>/
DECISION_FILE = "decision.json"
WHY_FILE = "why.md"


@dataclass(frozen=True)
class RunLayout:
    root: str
    run_id: str

    @classmethod
    def template(cls) -> "RunLayout":
        """The layout with placeholders, for configuration defaults."""
        return cls("{root}", "{run_id}")

    @property
    def run(self) -> str:
        return f"{self.root.rstrip('/')}/{RUNS}/{self.run_id}"

    @property
    def synthetic(self) -> str:
        return f"{self.root.rstrip('/')}/{SYNTHETIC}"

    @property
    def eval_data(self) -> str:
        return f"{self.synthetic}/eval"

    @property
    def registry(self) -> str:
        return f"{self.root.rstrip('/')}/registry"

    @property
    def convert(self) -> str:
        return f"{self.run}/convert"

    @property
    def validate(self) -> str:
        return f"{self.run}/validate"

    @property
    def train(self) -> str:
        return f"{self.run}/train"

    @property
    def final(self) -> str:
        return f"{self.train}/final"

    @property
    def export(self) -> str:
        return f"{self.run}/export"

    @property
    def evaluate(self) -> str:
        return f"{self.run}/evaluate"

    @property
    def metrics(self) -> str:
        return f"{self.evaluate}/{METRICS_FILE}"

    @property
    def gate(self) -> str:
        return f"{self.run}/gate"

    @property
    def decision(self) -> str:
        return f"{self.gate}/{DECISION_FILE}"

    @property
    def why(self) -> str:
        return f"{self.gate}/{WHY_FILE}"

    @property
    def ablation(self) -> str:
        return f"{self.run}/ablation"


def run_prefix(root: str, run_id: str) -> str:
    """`{root}/runs/{run_id}`: what `cafe artifacts` looks under for a bare run id."""
    return RunLayout(root, run_id).run


TEMPLATE = RunLayout.template()
