"""Typed configuration for every stage, loaded from YAML with dotted command-line overrides.

    cafe convert --config configs/local.yaml data.max_samples=500 data.sources.0.name=shapes

Unknown keys are rejected (``extra="forbid"``); errors name the key, what was given and what is allowed.
String values may use ``{root}`` and ``{run_id}``; they are filled in after overrides are applied, so one
override of ``root`` moves every output.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cafe_core.cluster.settings import ClusterConfig
from cafe_core.errors import BadInput
from cafe_core.evaluate.directions import UnknownDirection, direction_of
from cafe_core.layout import TEMPLATE
from cafe_core.prompts import (
    DESCRIBE,
    IM_END,
    IMAGE_PROMPT,
    IMAGE_TOKEN,
    MC_SUFFIX,
    SHORT_ANSWER_SUFFIX,
    SYSTEM,
    TEXT_PROMPT,
)

PROJECT_DIR = Path(__file__).resolve().parents[1]  # where configs/ ships


class ConfigError(BadInput, ValueError):
    """A configuration problem the user can fix; the message says which key and how."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- storage -----------------------------------------------------------------------------------------


class S3Config(Strict):
    """S3 access. Endpoint, region and credentials otherwise come from boto3's standard settings
    (AWS_ENDPOINT_URL, AWS_PROFILE, ~/.aws/config, instance roles, ...)."""

    endpoint_url: str | None = None
    region: str | None = None
    # auto: start the embedded SeaweedFS when no endpoint is configured anywhere.
    # always: always use the embedded server. never: use boto3's settings as they are (AWS itself).
    embedded: Literal["auto", "always", "never"] = "auto"
    embedded_dir: str = ".cafe/s3"
    multipart_threshold_mb: int = Field(16, ge=5)
    multipart_chunk_mb: int = Field(16, ge=5)
    max_attempts: int = Field(6, ge=1, le=20)

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials_in_url(cls, v: str | None) -> str | None:
        if v and "@" in v.split("//", 1)[-1].split("/", 1)[0]:
            raise ValueError("endpoint_url must not carry credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        return v


# --- synthetic data ----------------------------------------------------------------------------------


class SynthConfig(Strict):
    output: str = TEMPLATE.synthetic
    seed: int = Field(0, ge=0)
    image_size: int = Field(64, ge=16, le=1024)
    train_size: int = Field(2000, ge=1)
    train_shard_rows: int = Field(500, ge=1)
    # Fraction of training rows deliberately broken (corrupt image, empty caption, duplicate, ...) so the
    # conversion's reject accounting is exercised on every run. 0 disables.
    bad_fraction: float = Field(0.02, ge=0.0, le=0.5)
    retrieval_images: int = Field(100, ge=1)
    captions_per_image: int = Field(5, ge=1)
    pope_images: int = Field(50, ge=1)
    pope_questions_per_image: int = Field(3, ge=1, le=3)
    mmeb_rows_per_dataset: int = Field(40, ge=1)
    mmeb_candidates: int = Field(8, ge=2)
    mc_questions: int = Field(100, ge=1)
    caption_images: int = Field(50, ge=1)
    # The instruction split the tiny base is pretrained on (cafe_core/data/instruct.py); 0: not written.
    instruct_size: int = Field(0, ge=0)
    instruct_describe_fraction: float = Field(0.3, ge=0.0, le=1.0)  # rows that are one detailed description
    instruct_questions: int = Field(4, ge=1, le=16)  # questions in each other row


# --- conversion --------------------------------------------------------------------------------------


class SourceConfig(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._()-]*$")
    # onevision_parquet: a folder or S3 prefix of LLaVA-OneVision-Data parquet shards.
    # llava_next: a LLaVA-NeXT JSON/JSONL list or a dataset YAML (json_path + sampling_strategy).
    # mmeb_train: VLM2Vec's MMEB-train layout, <Subset>/<split>-*.parquet|jsonl or <Subset>.parquet|jsonl under
    # uri (or one such file), rows qry, qry_image_path, pos_text, pos_image_path[, neg_text, neg_image_path].
    format: Literal["onevision_parquet", "llava_next", "mmeb_train"]
    uri: str
    # llava_next: defaults to the JSON file's folder. mmeb_train: the image root that the rows' image paths
    # (images/<Subset>/...) are relative to; defaults to uri's folder.
    image_folder: str | None = None
    subsets: list[str] | None = None  # mmeb_train only: the subsets to read (default: every one found)
    split: str | None = None  # mmeb_train only: which split's files of a subset folder (e.g. original)

    @model_validator(mode="after")
    def _fields_of_the_format(self) -> "SourceConfig":
        if self.image_folder is not None and self.format == "onevision_parquet":
            raise ValueError("image_folder is only used with formats 'llava_next' and 'mmeb_train'")
        for name in ("subsets", "split"):
            if getattr(self, name) is not None and self.format != "mmeb_train":
                raise ValueError(f"{name} is only used with format 'mmeb_train'")
        if self.subsets is not None and not self.subsets:
            raise ValueError("subsets is an empty list: leave it out to read every subset")
        return self


class DataConfig(Strict):
    """`cafe convert`: raw training data -> image-text pairs."""

    sources: list[SourceConfig] = Field(min_length=1)
    output: str = TEMPLATE.convert
    caption_rule: Literal["joined", "first", "last"] = "joined"
    max_samples: int | None = Field(None, ge=1)  # per run, across sources, counted on input records
    max_caption_chars: int = Field(8000, ge=1)
    max_id_chars: int = Field(256, ge=1, le=1024)
    max_image_pixels: int = Field(64_000_000, ge=1)
    min_image_side: int = Field(1, ge=1)
    max_reject_rate: float = Field(0.05, ge=0.0, le=1.0)
    shard_rows: int = Field(1000, ge=1)
    workers: int = Field(2, ge=0)  # 0 = in-process
    chunk_records: int = Field(64, ge=1)
    seed: int = 0  # for random:N sampling


# --- validation --------------------------------------------------------------------------------------


class Bounds(Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "Bounds":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


Severity = Literal["hard", "soft"]
Check = Literal[
    "unique_ids", "caption_length", "image_size", "images_decode", "duplicate_rate", "reject_rate", "source_mix",
    "row_count",
]
CHECKS: tuple[str, ...] = get_args(Check)


class ValidateConfig(Strict):
    """`cafe validate`: great-expectations checks of a converted dataset."""

    input: str = TEMPLATE.convert
    output: str = TEMPLATE.validate
    caption_chars: Bounds = Bounds(min=1, max=8000)
    image_width: Bounds = Bounds(min=1, max=16384)
    image_height: Bounds = Bounds(min=1, max=16384)
    max_duplicate_rate: float = Field(0.05, ge=0, le=1)
    max_reject_rate: float = Field(0.05, ge=0, le=1)
    # Expected share of each source in the accepted pairs, e.g. {shapes: {min: 0.9, max: 1.0}}.
    source_mix: dict[str, Bounds] = Field(default_factory=dict)
    min_rows: int = Field(1, ge=0)
    # Which checks fail the stage (hard) and which only warn (soft).
    severity: dict[Check, Severity] = Field(default_factory=dict)

    def severity_of(self, check: str) -> Severity:
        return self.severity.get(check, "soft" if check == "source_mix" else "hard")  # type: ignore[arg-type]


# --- model -----------------------------------------------------------------------------------------


class TinyModelConfig(Strict):
    """Shapes of the embedded default: the real LLaVA-OneVision class, small enough for a CPU."""

    vision_hidden: int = Field(64, ge=8)
    vision_layers: int = Field(2, ge=1)
    vision_heads: int = Field(2, ge=1)
    image_size: int = Field(32, ge=8)
    patch_size: int = Field(8, ge=1)
    text_hidden: int = Field(128, ge=8)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    text_kv_heads: int = Field(2, ge=1)
    intermediate: int = Field(256, ge=8)
    vocab_size: int = Field(1024, ge=300, le=1500)  # the project-built BPE tokenizer's size, special tokens included
    # The random init's normal std (transformers' initializer_range) of the language model and the projector
    # (SigLIP's layers keep their own init). None: 0.02, chosen for widths near 768; at these widths attention
    # starts flatter and learns to look later (docs/base-model.md).
    init_std: float | None = Field(None, gt=0, le=1)


ModelPreset = Literal["tiny", "llava-onevision-qwen2-0.5b-si", "llava-onevision-qwen2-7b-si"]


class ModelConfig(Strict):
    """Either a preset (random init) or a Hugging Face checkpoint folder (local or s3://, safetensors)."""

    preset: ModelPreset | None = "tiny"
    checkpoint: str | None = None
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    init_seed: int = Field(0, ge=0)
    cache_dir: str = ".cafe/models"  # where s3:// checkpoints are fetched to

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError("set exactly one of model.preset and model.checkpoint (e.g. model.preset=null)")
        return self


# --- training --------------------------------------------------------------------------------------


class PromptConfig(Strict):
    """Embedding instructions. Defaults are the reference strings (SPEC section 1), so a released
    checkpoint reproduces its numbers. `{text}` is replaced by the caption / query text."""

    system: str = SYSTEM
    image: str = f"{IMAGE_TOKEN}\n{IMAGE_PROMPT}"
    text: str = "{text}" + TEXT_PROMPT
    interleaved: str = "{text}"  # MMEB-style query/target: the user text itself, with <image> where it has one
    # The query side of a pair in interleaved mode (train.loss.mode=interleaved); the caption is the target.
    pair_query: str = f"{IMAGE_TOKEN}\nRepresent the given image."
    # Appended after the generation prompt "<|im_start|>assistant\n"; the reference ends with <|im_end|>.
    assistant_suffix: str = IM_END

    @model_validator(mode="after")
    def _placeholders(self) -> "PromptConfig":
        for name in ("image", "pair_query"):
            if IMAGE_TOKEN not in getattr(self, name):
                raise ValueError(f"prompts.{name} must contain {IMAGE_TOKEN}")
        for name in ("text", "interleaved"):
            if "{text}" not in getattr(self, name):
                raise ValueError(f"prompts.{name} must contain {{text}}")
        return self


# InfoNCE temperatures allowed (fixed, or a learnable one's initial value). 0.01 is open_clip's bound for a
# learned one (logit scale clamped at 100) and is below the reference's 0.05 and VLM2Vec's 0.02; at 1 the
# logits of unit embeddings span only [-1, 1] and the loss can hardly separate pairs.
TEMPERATURE_RANGE = (0.01, 1.0)


class LossConfig(Strict):
    a_lm: float = Field(1.0, ge=0)
    a_con: float = Field(10.0, ge=0)
    temperature: float = 0.05  # within TEMPERATURE_RANGE; a learnable one starts here
    learnable_temperature: bool = False  # learnt at train.optim.lr_temperature, clamped at >= 0.01
    # pairs: "Compress this image/sentence" prompts for image and caption. interleaved: MMEB-style inputs,
    # the query (image + prompts.pair_query text) against the target (the caption as plain user text); an
    # MMEB-train pair brings its own query and target (text and/or image).
    mode: Literal["pairs", "interleaved"] = "pairs"
    # Interleaved mode: a pair's hard negative (MMEB-train neg_text/neg_image_path) joins the candidates of
    # the query->target InfoNCE, as VLM2Vec does. false: negatives stay in the data and are not used.
    hard_negatives: bool = True

    @field_validator("temperature")
    @classmethod
    def _temperature_range(cls, v: float) -> float:
        low, high = TEMPERATURE_RANGE
        if not low <= v <= high:
            raise ValueError(f"temperature must be within [{low}, {high}] (the reference uses 0.05, VLM2Vec 0.02)")
        return v

    @model_validator(mode="after")
    def _something_to_learn(self) -> "LossConfig":
        if self.a_lm == 0 and self.a_con == 0:
            raise ValueError("a_lm and a_con are both 0: nothing to train")
        return self


class TrainParts(Strict):
    vision: bool = True
    projector: bool = True
    llm: bool = True


class OptimConfig(Strict):
    lr_llm: float = Field(1e-5, ge=0)
    lr_projector: float = Field(1e-5, ge=0)
    lr_vision: float = Field(2e-6, ge=0)
    # A learnable temperature's own group (no weight decay), on the same schedule. Adam moves its parameter,
    # log(1/temperature), by about lr per step: 1e-3 lets it change ~10% in 100 steps; lr_llm would not.
    lr_temperature: float = Field(1e-3, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    clip_grad: float = Field(1.0, ge=0)  # 0 disables
    betas: tuple[float, float] = (0.9, 0.999)


class CacheConfig(Strict):
    """The node-local cache of training shards (cafe_core.cache): the ranks of one machine share one copy,
    fetched from S3 once, lazily (when a batch first needs a row of it)."""

    dir: str = ".cafe/cache"  # relative to the working directory; in a cluster mount a node-local volume here
    max_gb: float = Field(100.0, gt=0)  # GiB; least recently used shards not in use are evicted to stay below

    @field_validator("dir")
    @classmethod
    def _local_dir(cls, v: str) -> str:
        if "://" in v:
            raise ValueError(f"{v!r}: the cache is a local folder (a node-local volume in a cluster), not a URI")
        return v


class TrainConfig(Strict):
    """`cafe train`: CAFe fine-tuning under torchrun + DeepSpeed."""

    data: str = TEMPLATE.convert
    # In-training retrieval accuracy: "pairs" holds out heldout_size pairs drawn from every source of the data
    # (same distribution, never trained on); a URI names a retrieval set (image + caption list parquet).
    heldout: str | None = "pairs"
    output: str = TEMPLATE.train
    global_batch_size: int = Field(16, ge=1)  # per optimizer step, over all ranks and accumulation steps
    grad_accum: int = Field(1, ge=1)
    # The pairs InfoNCE contrasts. "step": every pair of the optimizer step (all ranks, all accumulation
    # micro-steps): with grad_accum > 1 the step embeds its micro-batches without gradient first, then
    # re-runs each with the cached embedding gradients (GradCache), so the contrastive batch grows past
    # memory at the cost of one more forward. "micro": each micro-step's pairs over all ranks only.
    contrastive_batch: Literal["step", "micro"] = "step"
    # torch.distributed backend, per device if needed ("cpu:gloo,cuda:nccl"); null: that on GPUs, gloo on CPU.
    dist_backend: str | None = None
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; overrides epochs
    max_length: int = Field(512, ge=16)
    zero_stage: Literal[0, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    parts: TrainParts = TrainParts()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    prompts: PromptConfig = PromptConfig()
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1)
    heldout_size: int = Field(100, ge=2)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    resume: str = "latest"  # latest | none | a checkpoint URI
    seed: int = Field(0, ge=0)
    nproc_per_node: int = Field(1, ge=1)  # `cafe train` starts torchrun itself when > 1
    prefetch_batches: int = Field(2, ge=0)  # micro-batches a background thread builds ahead; 0 = in the loop
    peak_tflops: float | None = Field(None, gt=0)  # per device, for the MFU estimate; known GPUs by name
    cache: CacheConfig = CacheConfig()  # where and how much of the training data each node keeps


# --- evaluation, gate, promotion ---------------------------------------------------------------------

EVAL_DATA = TEMPLATE.eval_data
Family = Literal["retrieval", "mmeb", "pope", "caption", "mc", "gap"]
FAMILIES: tuple[str, ...] = get_args(Family)


class EvalSetsConfig(Strict):
    """Where the evaluation sets are, each in its real benchmark's file format (the synthetic shapes
    sets by default). A family whose location is empty is skipped."""

    # name -> folder of Flickr30K/MSCOCO-test-style parquet (image, caption list); metrics retrieval/<name>/...
    retrieval: dict[str, str] = Field(default_factory=lambda: {"shapes": f"{EVAL_DATA}/retrieval"})
    mmeb: str | None = f"{EVAL_DATA}/mmeb"  # MMEB-eval layout: <Dataset>/test.parquet + images/
    pope: str | None = f"{EVAL_DATA}/pope"  # POPE JSON lines per split + images/
    caption: str | None = f"{EVAL_DATA}/caption_hallucination"  # images/, annotations.jsonl, vocabulary.json
    # name -> folder of MMStar-style parquet (index, question, image, answer, category)
    mc: dict[str, str] = Field(default_factory=lambda: {"mmstar": f"{EVAL_DATA}/mmstar"})
    max_items: int | None = Field(None, ge=1)  # per set (images / questions / rows), for quick runs

    @field_validator("retrieval", "mc")
    @classmethod
    def _safe_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not name or not all(c.isalnum() or c in "._-" for c in name):
                raise ValueError(f"set name {name!r}: use letters, digits, '.', '_' or '-' (it becomes a metric name)")
        return v


class ExportConfig(Strict):
    """`cafe export`: embed every item of `eval_sets` once, written as sharded safetensors + an index."""

    checkpoint: str = TEMPLATE.final  # `cafe train` output (model/ inside) or an HF folder
    output: str = TEMPLATE.export
    batch_size: int = Field(32, ge=1)
    shard_size: int = Field(2048, ge=1)  # embeddings per safetensors shard (the unit of resume)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU, fp32 on CPU
    prompts: PromptConfig = PromptConfig()
    max_length: int = Field(2048, ge=16)
    # Processes embedding at once, each its share of the shards on its own GPU (torchrun; `cafe export`
    # starts it itself). 0: one per visible GPU, one on a CPU machine.
    nproc_per_node: int = Field(0, ge=0)

    def processes(self) -> int:
        import torch

        return self.nproc_per_node or max(1, torch.cuda.device_count())


class GenerationConfig(Strict):
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(8, ge=1)  # POPE and multiple-choice answers
    caption_max_new_tokens: int = Field(96, ge=1)
    # LLaVA-style suffixes and the description prompt (SPEC section 5)
    pope_suffix: str = SHORT_ANSWER_SUFFIX
    mc_suffix: str = MC_SUFFIX
    caption_prompt: str = DESCRIBE


class EvaluateConfig(Strict):
    """`cafe evaluate`: one module per benchmark family; retrieval-type families read `export`'s files."""

    checkpoint: str = TEMPLATE.final  # `cafe train` output (model/ inside) or an HF folder
    embeddings: str = TEMPLATE.export
    output: str = TEMPLATE.evaluate
    families: list[Family] = Field(default_factory=lambda: list(FAMILIES))
    generation: GenerationConfig = GenerationConfig()
    gap_pairs: int = Field(250, ge=2)  # pairs in the modality-gap scatter (the paper's Figure 3 uses 250)
    # Memory of the embedding families, whatever the sets' size: exported shards kept in memory at once, and
    # the candidate embeddings one MMEB scoring block holds (16,384 x dim 3,584 x 4 bytes = 235 MB).
    embedding_cache_mb: int = Field(512, ge=1)
    block_slots: int = Field(16384, ge=1)
    # Retrieval's score blocks: images x captions (16 MiB of float32 scores at the defaults), whatever the corpus.
    block_rows: int = Field(1024, ge=1)
    block_cols: int = Field(4096, ge=1)


class GateRule(Strict):
    """A bound on one metric, or on every metric a glob matches (each slice checked on its own)."""

    metric: str = Field(min_length=1)  # e.g. "retrieval/*/i2t_R@1", "pope/*/f1"
    # Which way is better: known for every metric the evaluation writes (cafe_core/evaluate/directions.py);
    # a rule on any other name must state it to compare with the champion.
    direction: Literal["higher", "lower"] | None = None
    min: float | None = None
    max: float | None = None
    max_drop: float | None = Field(None, ge=0)  # allowed change for the worse against the champion, absolute
    max_drop_relative: float | None = Field(None, ge=0)  # ... as a fraction of the champion's value
    # Compare with a champion scored on other items (a re-released benchmark, another max_items): the drop
    # checks otherwise fail closed, naming the set. The verdict's reason records the difference.
    allow_other_sets: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> "GateRule":
        if all(v is None for v in (self.min, self.max, self.max_drop, self.max_drop_relative)):
            raise ValueError(f"gate rule for {self.metric!r} has no bound: set min, max, max_drop or max_drop_relative")
        try:
            known, listed = direction_of(self.metric), True
        except UnknownDirection:
            known, listed = self.direction, False
        if listed and self.direction not in (None, known):
            better = f"{known} is better" if known else "it has no better side"
            raise ValueError(f"gate rule for {self.metric!r} says direction {self.direction!r}, but {better} for "
                             "this metric (cafe_core/evaluate/directions.py): remove direction")
        if (self.max_drop is not None or self.max_drop_relative is not None) and known is None:
            if listed:
                raise ValueError(f"gate rule for {self.metric!r}: the metric has no better side, so a drop against "
                                 "the champion means nothing; bound it with min and max only")
            raise ValueError(f"gate rule for {self.metric!r}: which way is better is not known for this name; "
                             "state direction: higher or direction: lower to compare with the champion")
        if self.direction != known:  # (the assignment validates again, and then finds them equal)
            self.direction = known
        return self


def _plain_http_url(v: str, field: str) -> str:
    """An http(s) address without credentials in it (tokens come from the environment, never the config)."""
    scheme, sep, rest = v.partition("://")
    if scheme not in ("http", "https") or not sep or not rest.split("/", 1)[0]:
        raise ValueError(f"{field} must be an http:// or https:// address, got {v!r}")
    if "@" in rest.split("/", 1)[0]:
        raise ValueError(f"{field} must not carry credentials; the token comes from the environment")
    return v.rstrip("/")


class KubeflowRegistryConfig(Strict):
    """The Kubeflow Model Registry that a promotion also registers its version in (name, version, S3 URI,
    format, metrics and the decision record as metadata). The S3 registry stays the source of truth for
    which version is champion."""

    url: str  # e.g. https://model-registry-service.kubeflow.svc.cluster.local:8443, http://localhost:8080
    author: str = Field("cafe", min_length=1)
    # The environment variable holding a bearer token for the registry (filled from a Secret). null: the
    # client reads the pod's service-account token (KF_PIPELINES_SA_TOKEN_PATH or the default path).
    token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    is_secure: bool | None = None  # TLS; null: from the URL's scheme
    custom_ca: str | None = None  # a CA bundle file for a registry behind a private CA
    model_format_name: str = "safetensors"
    model_format_version: str = "1"
    # KServe's data-connection Secret for the S3 bucket, recorded on the artifact for deployments.
    storage_key: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _plain_http_url(v, "registry.kubeflow.url")


class RegistryConfig(Strict):
    """The model registry kept in S3: versions with their decision records, aliases champion/previous."""

    uri: str = TEMPLATE.registry
    model_name: str = Field("cafe-llava-onevision", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    kubeflow: KubeflowRegistryConfig | None = None  # also register promoted versions there


class GateConfig(Strict):
    """`cafe gate`: the candidate's metrics against bounds and the current champion; fails closed."""

    metrics: str = TEMPLATE.evaluate
    checkpoint: str = TEMPLATE.final  # `cafe train` output (model/ inside) or an HF folder
    output: str = TEMPLATE.gate
    rules: list[GateRule] = Field(default_factory=list)
    # A YAML file (local path or s3://) whose `rules:` list is checked as well: the shipped defaults are
    # configs/gate.yaml; a pipeline passes its own file's URI.
    rules_from: str | None = None


class AblationVariant(Strict):
    """Set on each variant of the a_lm:a_con ablation (the paper's Table 7) by the ablation pipeline."""

    lm_ratio: float | None = Field(ge=0)  # a_lm / a_con; None: the LM-only variant (a_con = 0)
    base_run_id: str  # the run whose converted pairs every variant trains on


class CiConfig(Strict):
    """Where request_promotion asks for a promotion: a GitHub Actions workflow started by workflow_dispatch
    (token in the environment variable CAFE_CI_TOKEN, never in the config)."""

    provider: Literal["github"] = "github"
    api_url: str = "https://api.github.com"  # GitHub Enterprise Server: https://HOST/api/v3
    repository: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9._-]+$")  # owner/name
    workflow: str = Field("promote.yml", pattern=r"^[A-Za-z0-9._-]+\.ya?ml$")  # its file name in .github/workflows
    ref: str = Field("main", min_length=1)  # the branch or tag whose workflow file and code run
    config: str = Field("configs/cluster.yaml", min_length=1)  # the cafe config file in the repository it loads

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, v: str) -> str:
        return _plain_http_url(v, "promote.ci.api_url")


class PromoteConfig(Strict):
    """`cafe promote` / `cafe rollback`."""

    # auto: the pipeline promotes a PASS itself (a laptop, a sandbox). ci: the pipeline checks parity and asks
    # the CI to promote, so that only the CI's identity may write the registry's aliases (a shared cluster).
    mode: Literal["auto", "ci"] = "auto"
    decision: str = TEMPLATE.decision
    reembed_sample: int = Field(16, ge=0)  # evaluation items re-embedded from the files being promoted
    reembed_tolerance: float = Field(1e-3, gt=0)  # max |cosine - 1| between re-embedded and exported
    # The CI whose promote workflow request_promotion starts; null: it prints the `gh workflow run` command.
    ci: CiConfig | None = None


# --- root --------------------------------------------------------------------------------------------


class CafeConfig(Strict):
    root: str = "s3://cafe"
    run_id: str = Field("auto", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    s3: S3Config = S3Config()
    synth: SynthConfig = SynthConfig()
    data: DataConfig | None = None
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    eval_sets: EvalSetsConfig = EvalSetsConfig()
    export: ExportConfig = ExportConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    promote: PromoteConfig = PromoteConfig()
    ablation: AblationVariant | None = None
    cluster: ClusterConfig = ClusterConfig()  # the train step's training job (cafe_core.cluster.settings)

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @field_validator("root")
    @classmethod
    def _root_has_no_trailing_slash(cls, v: str) -> str:
        return v.rstrip("/")

    def require_data(self) -> DataConfig:
        if self.data is None:
            raise ConfigError("config has no 'data' section: add data.sources (see configs/local.yaml)")
        return self.data

    def uris(self) -> list[str]:
        """Every location this configuration reads or writes (to know whether S3 is needed)."""
        out = [self.root, self.synth.output, self.validate_.input, self.validate_.output, self.train.data,
               self.train.output, self.export.checkpoint, self.export.output, self.evaluate.output,
               self.evaluate.embeddings, self.gate.output, self.registry.uri, *self.eval_sets.retrieval.values(),
               *self.eval_sets.mc.values()]
        out += [u for u in (self.eval_sets.mmeb, self.eval_sets.pope, self.eval_sets.caption) if u]
        if self.data:
            out += [self.data.output, *(s.uri for s in self.data.sources)]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)

    def digest(self) -> str:
        """Stable hash of the resolved config (for decision records and cache keys)."""
        blob = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --- loading -----------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (["a", "b", "0", "c"], parsed value). Values are read as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value (e.g. data.max_samples=500)")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return key.split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        else:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            node = nxt
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {'.'.join(path)}: {where} is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(path))] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {where}: {part!r} is not an index of a list with {len(node)} items")
    return int(part)


def _fill_placeholders(tree: Any, values: dict[str, str]) -> Any:
    if isinstance(tree, str):
        for k, v in values.items():
            tree = tree.replace("{" + k + "}", v)
        return tree
    if isinstance(tree, dict):
        return {k: _fill_placeholders(v, values) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fill_placeholders(v, values) for v in tree]
    return tree


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The config model that a validation error's location points into (for listing its keys)."""
    model: Any = CafeConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        if part not in fields:
            return model
        model = _first_model(fields[part].annotation)
    return model


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _first_model(arg)
        if found:
            return found
    return None


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            model = _model_at(e["loc"][:-1])
            keys = sorted(f.alias or n for n, f in model.model_fields.items()) if model else []
            close = difflib.get_close_matches(str(e["loc"][-1]), keys, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            lines.append(f"- {key}: unknown key; {hint}allowed keys here: {', '.join(keys)}")
            continue
        given = e.get("input")
        given_s = "" if isinstance(given, (dict, list)) else f" (given: {given!r})"
        lines.append(f"- {key}: {e['msg']}{given_s}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> CafeConfig:
    """Read YAML (or start from defaults), apply overrides, fill placeholders, validate."""
    tree: dict[str, Any] = {}
    if path is not None and str(path).startswith("env:"):  # the YAML itself, in an environment variable (cluster jobs)
        text = os.environ.get(str(path)[4:])
        if text is None:
            raise ConfigError(f"--config {path}: the environment variable {str(path)[4:]} is not set")
        tree = yaml.safe_load(text) or {}
        path = None
    if path is not None:
        p = Path(path)
        if not p.is_file() and not p.is_absolute() and (PROJECT_DIR / p).is_file():
            p = PROJECT_DIR / p  # configs/... from any working directory (components, images)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (pass --config with a YAML file)")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections, not {type(tree).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    run_id = tree.get("run_id", "auto")
    if run_id in (None, "auto"):
        tree["run_id"] = run_id = new_run_id()
    root = str(tree.get("root", CafeConfig.model_fields["root"].default)).rstrip("/")
    # Defaults with placeholders must be filled too: validate once, dump, fill, validate again.
    try:
        first = CafeConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    dumped = first.model_dump(mode="json", by_alias=True)
    filled = _fill_placeholders(dumped, {"root": root, "run_id": str(run_id)})
    return CafeConfig.model_validate(filled)
