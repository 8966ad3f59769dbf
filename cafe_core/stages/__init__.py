"""The stage layer: one function per stage, `fn(cfg, store, ...) -> Result`, that owns the stage's work, its
error mapping (bad input: exit 2, the stage failed: exit 1) and its summary. The `cafe <stage>` commands
(cli.py) and the KFP components (components/, through `step.run_step`) are thin adapters over these.

Importing this package is cheap: each stage imports what it needs (torch, great-expectations) when it runs.
"""

from __future__ import annotations

from typing import Callable

from cafe_core.stages import data, evaluate, pretrain, release, train
from cafe_core.stages.base import Result

# The main job's stages, in order: `cafe <name>` runs one; `cafe run` runs them all as the KFP pipeline.
STAGES: dict[str, Callable[..., Result]] = {
    "synth": data.synth,
    "convert": data.convert,
    "validate": data.validate,
    "train": train.train,
    "export": evaluate.export,
    "evaluate": evaluate.evaluate,
    "gate": release.gate,
    "promote": release.promote,
}
# Not in the local pipeline's order: promotion through CI (promote.mode: ci: the cluster pipeline verifies
# and requests, the CI job promotes), rollback (by hand or CI), and the tiny base model (`make base`).
OTHER_STAGES: dict[str, Callable[..., Result]] = {
    "verify-release": release.verify_release, "request-promotion": release.request_promotion,
    "rollback": release.rollback, "pretrain": pretrain.pretrain,
}
PIPELINE_ORDER = " -> ".join(STAGES) + " (on PASS)"


def help_of(fn: Callable[..., Result]) -> str:
    """A stage's help text: its docstring's first sentence."""
    doc = " ".join((fn.__doc__ or "").split()).split(". ")[0].rstrip(".")
    return doc[:1].lower() + doc[1:]


__all__ = ["OTHER_STAGES", "PIPELINE_ORDER", "Result", "STAGES", "help_of"]
