"""`cafe pretrain` (`make base`): the recipe is checked before any work, and a short run of it writes a
loadable Hugging Face folder with its model card and metrics, swapped in whole."""

from __future__ import annotations

import json

import pytest

from cafe_core.cli import metrics_summary
from cafe_core.config import load_config
from cafe_core.errors import BadInput
from cafe_core.evaluate.report import side_by_side_markdown
from cafe_core.stages.pretrain import card_metrics, check_recipe
from cafe_core.storage import Storage

SMALL = ["synth.train_size=4", "synth.retrieval_images=6", "synth.pope_images=2", "synth.mmeb_rows_per_dataset=1",
         "synth.mc_questions=4", "synth.caption_images=2", "synth.instruct_size=40", "validate.min_rows=10",
         "data.workers=0", "train.nproc_per_node=1", "train.max_steps=3", "train.global_batch_size=4",
         "train.max_length=256", "train.checkpoint_every=50", "export.batch_size=8",
         "evaluate.families=[pope,retrieval,gap]"]  # generative and embedding families; gap: the folder's scatter


@pytest.mark.parametrize("override, says", [
    ("synth.instruct_size=0", "synth.instruct_size is 0"),
    ("train.loss.a_con=10", "the base learns generation only"),  # (a_lm = a_con = 0 the config refuses)
])
def test_the_recipe_is_checked_first(override, says, tmp_path):
    cfg = load_config("configs/base.yaml", [f"root={tmp_path}", override])
    with pytest.raises(BadInput, match=says):
        check_recipe(cfg)


def test_side_by_side_shows_the_change_and_what_either_lacks():
    table = side_by_side_markdown({"pope/average/accuracy": 0.875, "retrieval/s/i2t_R@1": 0.5, "other": 1.0},
                                  {"pope/average/accuracy": 0.9, "mc/x/accuracy": 0.7}, ("pope/", "retrieval/"))
    assert table.splitlines() == ["| metric | base | fine-tuned | change |", "|---|---|---|---|",
                                  "| pope/average/accuracy | 0.9000 | 0.8750 | -0.0250 |",
                                  "| retrieval/s/i2t_R@1 | n/a | 0.5000 | n/a |"]


@pytest.mark.slow
def test_a_short_pretraining_writes_the_folder_and_its_card(tmp_path, cafe_main, capsys):
    from cafe_core.config import ModelConfig
    from cafe_core.model.build import build

    out = tmp_path / "models" / "shapes-base"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an older base")
    assert cafe_main("pretrain", "--config", "configs/base.yaml", "--out", str(out), f"root={tmp_path / 'cafe'}",
                     *SMALL) == 0, capsys.readouterr().err[-3000:]
    printed = capsys.readouterr().out
    assert f"the base model and its card are in {out}/" in printed and "| pope/average/accuracy |" in printed
    assert not (out / "stale.txt").exists() and not list(out.parent.glob(".shapes-base*"))  # swapped in whole
    assert (out / "gap_shapes.png").read_bytes()[:4] == b"\x89PNG"  # the ablation's "before" picture
    card = (out / "README.md").read_text()
    assert "| pope/random/accuracy |" in card and '"instruct_size": 40' in card and '"a_con": 0.0' in card
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"pope/adversarial/accuracy", "pope/average/yes_ratio", "retrieval/shapes/i2t_R@1"} <= set(metrics)
    # A run that starts from the folder finds the base's metrics for its side-by-side summary; a preset has none.
    start = load_config("configs/local.yaml", ["model.preset=null", f"model.checkpoint={out}"])
    preset = load_config("configs/local.yaml", ["model.checkpoint=null", "model.preset=tiny"])
    assert card_metrics(start, Storage()) == metrics and card_metrics(preset, Storage()) is None
    tuned = {"pope/average/accuracy": metrics["pope/average/accuracy"] + 0.25, "retrieval/shapes/i2t_R@1": 0.5}
    summary = metrics_summary(start, Storage(), tuned, "s3://b/metrics.json")
    assert f"the base {out} (from its card)" in summary and "| metric | base | fine-tuned | change |" in summary
    assert "| pope/average/accuracy |" in summary and "| +0.2500 |" in summary
    assert "| metric | value |" in metrics_summary(preset, Storage(), tuned, "s3://b/metrics.json")
    model, _ = build(ModelConfig(preset=None, checkpoint=str(out)), Storage())  # the folder loads as a checkpoint
    assert model.config.text_config.hidden_size == load_config("configs/base.yaml").model.tiny.text_hidden
