"""KFP v2 components: one per stage, thin wrappers of cafe_core.steps (no stage logic lives here).

Each is a lightweight Python-function component on the project's base image (which has cafe installed,
so `install_kfp_package=False`); the pipeline may replace the image per task (`set_container_image`).
"""

from components.config import resolve_config
from components.convert import convert
from components.data import prepare_data
from components.evaluate import compare_ablation, evaluate, evaluate_all, merge_evaluation
from components.export import export
from components.gate import gate
from components.image import BASE_IMAGE
from components.promote import promote
from components.train import train
from components.validate import validate


__all__ = ["resolve_config", "prepare_data", "convert", "validate", "train", "export", "evaluate",
           "merge_evaluation", "evaluate_all", "compare_ablation", "gate", "promote", "BASE_IMAGE"]
