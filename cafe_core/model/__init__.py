"""LLaVA-OneVision for CAFe: the project tokenizer, model/processor building, checkpoint loading and saving."""

from cafe_core.model.build import (
    LlavaOnevisionImageTextProcessor,
    ModelLoadError,
    build,
    fetch_checkpoint,
    image_token_count,
    load,
    preset_config,
    processor_for,
    save,
)
from cafe_core.model.tokenizer import build_tokenizer

__all__ = [
    "LlavaOnevisionImageTextProcessor",
    "ModelLoadError",
    "build",
    "build_tokenizer",
    "fetch_checkpoint",
    "image_token_count",
    "load",
    "preset_config",
    "processor_for",
    "save",
]
