"""Build LLaVA-OneVision models and processors: a seeded preset, or a saved Hugging Face folder.

Presets (random init, seeded by ``model.init_seed``):

- ``tiny``: the real ``LlavaOnevisionForConditionalGeneration`` class at CPU size (SigLIP + Qwen2 shapes from
  ``model.tiny``), with the project tokenizer (``cafe_core.model.tokenizer``).
- ``llava-onevision-qwen2-0.5b-si`` / ``-7b-si``: the published shapes and vocabulary size, for throughput
  measurements only. No weights are downloaded: the text still goes through the project tokenizer, whose
  ids are a small subset of the vocabulary, so real text needs a real ``model.checkpoint``.

Checkpoints are Hugging Face folders (local, or ``s3://`` fetched into ``model.cache_dir``) with safetensors
weights; pickle weights are refused because loading them can run arbitrary code.

No torchvision: images go through ``LlavaOnevisionImageProcessorPil``, and the processor is a
``LlavaOnevisionProcessor`` without a video processor (see ``LlavaOnevisionImageTextProcessor``).
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import get_args

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoTokenizer,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    PreTrainedTokenizerBase,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging as hf_logging

from cafe_core.cache import folder_lock
from cafe_core.config import PROJECT_DIR, ModelConfig, ModelPreset, TinyModelConfig
from cafe_core.errors import BadInput
from cafe_core.model.tokenizer import CHAT_TEMPLATE, build_tokenizer
from cafe_core.prompts import IMAGE_TOKEN, VIDEO_TOKEN
from cafe_core.storage import Storage, StorageError
from cafe_core.uris import check_relative, is_s3, relative_to, safe_name

# Loading and saving a few files needs no progress bars of their own (the stages print their progress).
hf_logging.disable_progress_bar()

CAFE_CONFIG_FILE = "cafe_config.yaml"
MODEL_CARD_FILE = "README.md"
PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".ckpt")
# SigLIP normalises pixels to [-1, 1].
SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)
# anyres grids: (1x1)..(NxN) crops of the vision tower's input size. The tiny preset stops at 2x2 so that a
# 64x64 shapes image costs 88 image tokens rather than hundreds.
TINY_MAX_GRID = 2
ONEVISION_MAX_GRID = 6
ANYRES = "anyres_max_9"


class ModelLoadError(BadInput, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the folder and the fix."""


# --- configs -----------------------------------------------------------------------------------------


def grid_pinpoints(image_size: int, max_grid: int) -> list[list[int]]:
    """[[h, w], ...] for every grid of 1..max_grid rows and columns of ``image_size`` crops."""
    grids = range(1, max_grid + 1)
    return [[rows * image_size, cols * image_size] for rows in grids for cols in grids]


def _llava_config(
    vision: SiglipVisionConfig, text: Qwen2Config, max_grid: int, image_token_id: int, video_token_id: int
) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        projector_hidden_act="gelu",
        # SigLIP has no CLS token: every patch is a feature ("default" would drop the first patch).
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio=ANYRES,
        image_grid_pinpoints=grid_pinpoints(vision.image_size, max_grid),
        tie_word_embeddings=text.tie_word_embeddings,
    )


def tiny_config(tiny: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaOnevisionConfig:
    """The CPU-sized model; its vocabulary and image/video token ids come from ``tokenizer``."""
    _require_multiple(tiny, "image_size", "patch_size")
    _require_multiple(tiny, "vision_hidden", "vision_heads")
    _require_multiple(tiny, "text_hidden", "text_heads")
    _require_multiple(tiny, "text_heads", "text_kv_heads")
    vision = SiglipVisionConfig(
        hidden_size=tiny.vision_hidden,
        intermediate_size=4 * tiny.vision_hidden,
        num_hidden_layers=tiny.vision_layers,
        num_attention_heads=tiny.vision_heads,
        image_size=tiny.image_size,
        patch_size=tiny.patch_size,
        vision_use_head=False,  # LLaVA takes patch features; the pooling head would be dead weight
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=tiny.text_hidden,
        intermediate_size=tiny.intermediate,
        num_hidden_layers=tiny.text_layers,
        num_attention_heads=tiny.text_heads,
        num_key_value_heads=tiny.text_kv_heads,
        max_position_embeddings=tokenizer.model_max_length,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = _llava_config(
        vision,
        text,
        TINY_MAX_GRID,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
    )
    if tiny.init_std is not None:  # the LM's and projector's init read these (SigLIP's layers have their own)
        for part in (config, config.text_config, config.vision_config):
            part.initializer_range = tiny.init_std
    return config


def _require_multiple(tiny: TinyModelConfig, key: str, divisor_key: str) -> None:
    value, divisor = getattr(tiny, key), getattr(tiny, divisor_key)
    if value % divisor:
        raise ValueError(f"model.tiny.{key} ({value}) must be a multiple of model.tiny.{divisor_key} ({divisor})")


def _siglip_so400m_384() -> SiglipVisionConfig:
    # SigLIP-so400m/14-384 has 27 layers; LLaVA-OneVision reads the penultimate one, so (as in the Hugging
    # Face conversion) the last layer is dropped and the feature layer is -1 of 26.
    return SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )


def _qwen2(
    hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, tied: bool
) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        bos_token_id=151643,
        eos_token_id=151645,
    )


def preset_config(name: ModelPreset, tiny: TinyModelConfig | None = None) -> LlavaOnevisionConfig:
    """The configuration of a preset. ``tiny`` shapes the tiny preset (defaults: ``TinyModelConfig()``)."""
    if name == "tiny":
        tiny = tiny or TinyModelConfig()
        return tiny_config(tiny, build_tokenizer(tiny.vocab_size))
    # Published shapes. The vocabularies reach past the added <image>=151646 and <video>=151647 (the
    # Hugging Face conversions' sizes); 0.5B ties its input and output embeddings, 7B does not.
    if name == "llava-onevision-qwen2-0.5b-si":
        text = _qwen2(896, 24, 14, 2, 4864, vocab=152000, tied=True)
    elif name == "llava-onevision-qwen2-7b-si":
        text = _qwen2(3584, 28, 28, 4, 18944, vocab=152064, tied=False)
    else:
        raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(get_args(ModelPreset))}")
    return _llava_config(_siglip_so400m_384(), text, ONEVISION_MAX_GRID, image_token_id=151646, video_token_id=151647)


# --- processor ---------------------------------------------------------------------------------------


class LlavaOnevisionImageTextProcessor(LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without its video processor.

    The stock class requires a video processor, and every video processor needs torchvision. Processors
    declare their sub-processors by the names of their ``__init__`` arguments, so this signature (no
    ``video_processor``) makes a processor of tokenizer + image processor, saved and loaded as such. Text and
    images are processed exactly as by the parent; passing ``videos`` is not supported.
    """

    def __init__(
        self,
        image_processor: LlavaOnevisionImageProcessorPil,
        tokenizer: PreTrainedTokenizerBase,
        num_image_tokens: int,
        vision_feature_select_strategy: str,
        chat_template: str | None = None,
        image_token: str = IMAGE_TOKEN,
        video_token: str = VIDEO_TOKEN,
        vision_aspect_ratio: str = ANYRES,
    ):
        # The parent's attribute set-up, minus the video processor that it would pass on to ProcessorMixin.
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = image_token
        self.video_token = video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        self.vision_aspect_ratio = vision_aspect_ratio
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def image_processor_for(config: LlavaOnevisionConfig) -> LlavaOnevisionImageProcessorPil:
    """The image processor matching a model config: crop size and anyres grids must agree with the model's,
    or the processor expands ``<image>`` to a different number of tokens than the model produces."""
    side = config.vision_config.image_size
    return LlavaOnevisionImageProcessorPil(
        size={"height": side, "width": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=[list(p) for p in config.image_grid_pinpoints],
        image_mean=list(SIGLIP_MEAN_STD),
        image_std=list(SIGLIP_MEAN_STD),
    )


def processor_for(
    config: LlavaOnevisionConfig,
    tokenizer: PreTrainedTokenizerBase,
    image_processor: LlavaOnevisionImageProcessorPil | None = None,
) -> LlavaOnevisionImageTextProcessor:
    vision = config.vision_config
    return LlavaOnevisionImageTextProcessor(
        image_processor=image_processor or image_processor_for(config),
        tokenizer=tokenizer,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,  # one crop's patches
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=tokenizer.chat_template,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )


def image_token_count(processor: LlavaOnevisionImageTextProcessor, height: int, width: int) -> int:
    """How many ``<image>`` tokens one (single-image) picture of this size expands to: the processor's own
    count, the one it uses when it expands the placeholder."""
    return int(processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0])


# --- build -------------------------------------------------------------------------------------------


def _dtype(cfg: ModelConfig) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def _init_model(config: LlavaOnevisionConfig, cfg: ModelConfig) -> LlavaOnevisionForConditionalGeneration:
    # A private RNG stream: the same seed gives the same weights, and the caller's RNG state is untouched.
    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        model = AutoModelForImageTextToText.from_config(
            config, dtype=_dtype(cfg), attn_implementation=cfg.attn_implementation
        )
    return model


def build(
    cfg: ModelConfig, store: Storage | None = None
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageTextProcessor]:
    """The model and its processor, from ``cfg.preset`` (seeded random init) or ``cfg.checkpoint``."""
    if cfg.checkpoint is not None:
        if is_s3(cfg.checkpoint):
            return load(fetch_checkpoint(cfg.checkpoint, Path(cfg.cache_dir), store or Storage()), cfg)
        return load(Path(checkpoint_location(cfg.checkpoint)), cfg)
    tokenizer = build_tokenizer(cfg.tiny.vocab_size)
    if cfg.preset == "tiny":
        config = tiny_config(cfg.tiny, tokenizer)
    else:
        config = preset_config(cfg.preset)
        # The project tokenizer drives the throughput stand-in: point the placeholders at its ids.
        config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        config.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    return _init_model(config, cfg), processor_for(config, tokenizer)


# --- checkpoints -------------------------------------------------------------------------------------


def checkpoint_location(checkpoint: str) -> str:
    """Where ``model.checkpoint`` is: an s3:// URI as it is; a relative folder that is not in the working
    directory but in the project (models/shapes-base, from a pipeline step's directory) there."""
    folder = Path(checkpoint)
    if not is_s3(checkpoint) and not folder.is_absolute() and not folder.exists() and (PROJECT_DIR / folder).is_dir():
        return str(PROJECT_DIR / folder)
    return checkpoint


def fetch_checkpoint(uri: str, cache_dir: Path, store: Storage) -> Path:
    """Mirror a checkpoint folder (any URI ``store`` reads) into ``cache_dir/<safe name>/``.

    Files already there with the remote size are kept, so a second build does not download again; local
    files that the remote folder no longer has are removed, so stale weights never mix with new ones. The
    ranks of a node share ``cache_dir``: one mirrors at a time (a lock on the folder), so the first
    downloads and the others wait, then find every file in place: one download per node.
    """
    base = uri.rstrip("/") if is_s3(uri) else str(Path(uri))  # the spelling store.list uses for object URIs
    objects = store.list(base)
    if not objects:
        raise ModelLoadError(f"checkpoint {uri} is empty or does not exist: point model.checkpoint at a model folder")
    target = cache_dir / safe_name(base)
    with folder_lock(target):
        wanted: dict[Path, int] = {}
        for obj in objects:
            local = target / _name_inside(obj.uri, base)
            wanted[local] = obj.size
            if not (local.is_file() and local.stat().st_size == obj.size):
                partial = target.parent / f".{target.name}-{uuid.uuid4().hex}.part"
                _download_whole(store, obj.uri, local, partial)
        for stale in (p for p in target.rglob("*") if p.is_file() and p not in wanted):
            stale.unlink()
    return target


def _name_inside(object_uri: str, base: str) -> str:
    if object_uri == base:
        raise ModelLoadError(f"checkpoint {base} is a single file: point model.checkpoint at its folder")
    try:  # refuses names with '..' that would land outside the cache folder
        return check_relative(relative_to(object_uri, base))
    except StorageError as e:
        raise ModelLoadError(f"checkpoint {base}: cannot mirror {object_uri}: {e}") from None


def _download_whole(store: Storage, uri: str, local: Path, partial: Path) -> None:
    # Download outside the mirrored folder, then rename: another rank reading or sweeping the folder never
    # sees (or deletes) a partial file.
    try:
        store.download(uri, partial)
        local.parent.mkdir(parents=True, exist_ok=True)
        partial.replace(local)
    finally:
        partial.unlink(missing_ok=True)


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ModelLoadError(f"checkpoint folder {folder} does not exist: check model.checkpoint")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"checkpoint folder {folder} has no config.json: it is not a Hugging Face model folder "
            "(write one with cafe_core.model.build.save or model.save_pretrained)"
        )
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"checkpoint folder {folder} has only pickle weights ({', '.join(pickles)}); they are refused because "
            "loading a pickle can run arbitrary code. Convert once, in a trusted environment: "
            "model = LlavaOnevisionForConditionalGeneration.from_pretrained(folder); "
            "model.save_pretrained(new_folder, safe_serialization=True)"
        )
    raise ModelLoadError(f"checkpoint folder {folder} has no weights (*.safetensors): the save did not finish?")


def load(
    folder: Path, cfg: ModelConfig
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageTextProcessor]:
    """Load a local Hugging Face folder (model + tokenizer + image processor) with ``cfg``'s dtype and
    attention implementation."""
    _check_folder(folder)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        folder,
        use_safetensors=True,
        local_files_only=True,
        dtype=_dtype(cfg),
        attn_implementation=cfg.attn_implementation,
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"checkpoint folder {folder} lacks a usable tokenizer or image processor config ({e}); "
            "save the processor next to the weights (cafe_core.model.build.save does)"
        ) from None
    if tokenizer.chat_template is None:  # llava-hf folders keep it with the processor; CAFe prompts are qwen_1_5
        tokenizer.chat_template = CHAT_TEMPLATE
    _check_processor_matches(folder, model.config, image_processor)
    return model, processor_for(model.config, tokenizer, image_processor)


def _check_processor_matches(
    folder: Path, config: LlavaOnevisionConfig, image_processor: LlavaOnevisionImageProcessorPil
) -> None:
    side = config.vision_config.image_size
    size = (image_processor.size.get("height"), image_processor.size.get("width"))
    grids = [list(p) for p in image_processor.image_grid_pinpoints]
    if size != (side, side) or grids != [list(p) for p in config.image_grid_pinpoints]:
        raise ModelLoadError(
            f"checkpoint folder {folder}: the image processor (size {size}, grid pinpoints {grids}) does not match "
            f"the model (image size {side}, grid pinpoints {config.image_grid_pinpoints}); image token counts "
            "would disagree. Re-save the processor from the model config"
        )


# --- save --------------------------------------------------------------------------------------------


def save(
    model: LlavaOnevisionForConditionalGeneration,
    processor: LlavaOnevisionImageTextProcessor,
    folder: Path,
    *,
    cafe_config_yaml: str,
    metrics: dict[str, float],
) -> None:
    """Write a complete Hugging Face folder: safetensors weights, config, tokenizer, image processor and
    chat template, the CAFe config that produced it, and a model card."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / CAFE_CONFIG_FILE).write_text(cafe_config_yaml, encoding="utf-8")
    (folder / MODEL_CARD_FILE).write_text(model_card(model, metrics), encoding="utf-8")


def model_card(model: LlavaOnevisionForConditionalGeneration, metrics: dict[str, float]) -> str:
    params = sum(p.numel() for p in model.parameters())
    rows = "\n".join(f"| {name} | {_format_metric(value)} |" for name, value in sorted(metrics.items()))
    table = f"| metric | value |\n|---|---|\n{rows}" if metrics else "No metrics were recorded."
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- cafe
- llava-onevision
---

# CAFe LLaVA-OneVision

A `LlavaOnevisionForConditionalGeneration` ({params / 1e6:.1f}M parameters) trained with CAFe: a contrastive
loss on last-token embeddings together with the language-modelling loss, so one model both embeds and
generates. The configuration that produced it is in `{CAFE_CONFIG_FILE}`.

## Metrics

{table}

## Loading

```python
from cafe_core.config import ModelConfig
from cafe_core.model.build import build

model, processor = build(ModelConfig(preset=None, checkpoint="path/to/this/folder"))
```

Weights are safetensors only. The processor is a tokenizer plus `LlavaOnevisionImageProcessorPil` (no video
processor, no torchvision needed); the chat template is `qwen_1_5`.

## Embedding prompts

- image: `<image>\\nCompress this image in one word:` as the user turn
- text: the caption followed by `Compress this sentence in one word:` as the user turn

The embedding is the final-norm hidden state of the last real token, L2-normalised.
"""


def _format_metric(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"
