"""`cafe pretrain` (`make base`): the tiny base model that the embedded default fine-tunes with CAFe.

The recipe is a configuration (configs/base.yaml): the shapes world's instruction split, `cafe train` with
the LM loss only (a_con = 0), the generative evaluation and retrieval from the base's own last-token
embeddings. The stages are the pipeline's, run one after another in this process; the result is a Hugging
Face folder written into the repository (models/shapes-base) with a model card that records the recipe,
the data seed, the code version and the metrics.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cafe_core.config import CafeConfig
from cafe_core.errors import BadInput
from cafe_core.layout import METRICS_FILE
from cafe_core.stages.base import Result, stage
from cafe_core.stages.evaluate import gap_png
from cafe_core.storage import Storage
from cafe_core.uris import check_relative, join, relative_to

# The metrics the card shows (all of them are in metrics.json next to it).
CARD_METRICS = ("pope/random/accuracy", "pope/popular/accuracy", "pope/adversarial/accuracy",
                "pope/average/yes_ratio", "pope/average/f1", "mc/mmstar/accuracy", "caption/classwise/f0.5",
                "retrieval/shapes/i2t_R@1", "retrieval/shapes/t2i_R@1")


def check_recipe(cfg: CafeConfig) -> None:
    """A base is pretrained on the instruction split with the LM loss only."""
    if cfg.synth.instruct_size < 1:
        raise BadInput("pretrain: synth.instruct_size is 0: the base is trained on the instruction split; set it "
                       "(configs/base.yaml: 20000)")
    if cfg.train.loss.a_con != 0:  # (and a_lm > 0: the config refuses both 0)
        raise BadInput(f"pretrain: train.loss is a_lm={cfg.train.loss.a_lm}, a_con={cfg.train.loss.a_con}: the "
                       "base learns generation only (a_lm > 0, a_con = 0); CAFe adds the contrastive loss later")


@stage("pretrain", lambda cfg: cfg.train.output)
def pretrain(cfg: CafeConfig, store: Storage, out: str | Path, progress: bool = False) -> Result:
    """Pretrain the tiny base model (configs/base.yaml: the instruction split, the LM loss only), evaluate
    it and write it with its model card into a local folder (models/shapes-base)."""
    from cafe_core.stages import data, evaluate, train

    check_recipe(cfg)
    out = Path(out)
    steps = [data.synth, data.convert, data.validate, train.train, evaluate.export]
    lines = [fn(cfg, store).summary for fn in steps]
    scored = evaluate.evaluate(cfg, store, progress=progress)
    lines.append(scored.summary)
    record = json.loads(store.read_bytes(join(cfg.evaluate.output, METRICS_FILE)))
    write_folder(cfg, store, out, record)
    lines.append(f"pretrain: the base model and its card are in {out}/ (model.checkpoint: {out})")
    result = Result("pretrain", str(out), "\n".join(lines), {"metrics_uri": join(cfg.evaluate.output, METRICS_FILE)})
    result.metrics = dict(record["metrics"])
    return result


def write_folder(cfg: CafeConfig, store: Storage, out: Path, record: dict) -> None:
    """The trained model's files and the card, swapped in whole: a reader sees the old folder or the new."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model = join(cfg.train.output, "final", "model")
    for obj in store.list(model):
        name = check_relative(relative_to(obj.uri, model))
        if not name.startswith("_"):  # the output's own manifest and markers are not the model's
            store.download(obj.uri, staging / name)
    gap = join(cfg.evaluate.output, "gap", gap_png(cfg))  # before fine-tuning: the ablation's "before" picture
    if store.exists(gap):
        store.download(gap, staging / gap_png(cfg))
    (staging / "README.md").write_text(model_card(cfg, record))
    (staging / METRICS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def card_metrics(cfg: CafeConfig, store: Storage) -> dict[str, float] | None:
    """The metrics that the starting checkpoint's card records (a base written by `cafe pretrain`), or None
    (a preset, or a checkpoint without them)."""
    from cafe_core.model.build import checkpoint_location

    if cfg.model.checkpoint is None:
        return None
    uri = join(checkpoint_location(cfg.model.checkpoint), METRICS_FILE)
    record = store.read_json(uri) if store.exists(uri) else None
    metrics = record.get("metrics") if isinstance(record, dict) else None  # another tool's file: no card
    return dict(metrics) if isinstance(metrics, dict) else None


def model_card(cfg: CafeConfig, record: dict) -> str:
    from cafe_core.version import code_version

    metrics = record["metrics"]
    rows = "\n".join(f"| {name} | {metrics[name]:.4f} |" for name in CARD_METRICS if name in metrics)
    recipe = {"synth": cfg.synth.model_dump(mode="json", include={"seed", "image_size", "instruct_size",
                                                                   "instruct_describe_fraction", "instruct_questions"}),
              "model": cfg.model.model_dump(mode="json", include={"preset", "init_seed", "tiny"}),
              "train": cfg.train.model_dump(mode="json", include={"global_batch_size", "max_steps", "max_length",
                                                                  "optim", "loss", "seed", "nproc_per_node"})}
    return f"""# shapes-base: the embedded default's pretrained tiny LLaVA-OneVision

The real `LlavaOnevisionForConditionalGeneration` class at CPU size, pretrained by `make base`
(`cafe pretrain --config configs/base.yaml`) with the LM loss only on the shapes world's instruction split
(descriptions; presence questions with POPE's instruction; count, colour, shape and position multiple choice;
grounding; binding: "What colour is the star?"). `make run` fine-tunes it with CAFe (`model.checkpoint`).

- code: {code_version()}
- run: {cfg.run_id}, data seed {cfg.synth.seed}, training seed {cfg.train.seed}

## Metrics (the default evaluation sets)

| metric | value |
|---|---|
{rows}

All metrics: `metrics.json`. Retrieval here uses the base's own last-token embeddings (CAFe's prompts,
no contrastive training): the reference point CAFe improves on.

## Recipe

```json
{json.dumps(recipe, indent=2, sort_keys=True)}
```
"""
