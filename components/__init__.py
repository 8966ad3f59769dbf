"""KFP v2 components: thin adapters over the stage layer (cafe_core.stages); no stage logic lives here.

Each is a lightweight Python-function component on the project's base image (which has cafe installed, so
`install_kfp_package=False`); `cafe_core.stages.step.run_step` runs the stage with the same errors and
summary as `cafe <stage>`, and `publish` fills the typed output artifacts. The pipelines set each task's
image (`base_image`, or `train_image` for the tasks that run the model on GPUs) and resources.
"""

from components.config import resolve_config
from components.data import convert, prepare_data, validate
from components.evaluate import compare_ablation, evaluate, evaluate_all, export, merge_evaluation
from components.release import gate, promote, request_promotion, verify_release
from components.train import train

__all__ = ["resolve_config", "prepare_data", "convert", "validate", "train", "export", "evaluate",
           "merge_evaluation", "evaluate_all", "compare_ablation", "gate", "promote", "verify_release",
           "request_promotion"]
