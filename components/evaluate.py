from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from cafe_core.params import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def export(run_config: str, model: Input[Model], embeddings: Output[Dataset]):
    """Embeddings of every evaluation item: sharded safetensors + index in S3."""
    from cafe_core.stages.evaluate import export as stage
    from cafe_core.stages.step import publish, run_step

    publish(run_step(stage, run_config), embeddings)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(run_config: str, family: str, model: Input[Model], embeddings: Input[Dataset], metrics: Output[Metrics]):
    """One benchmark family; its metrics are logged so the KFP UI shows them."""
    from cafe_core.stages.evaluate import evaluate_family
    from cafe_core.stages.step import publish, run_step

    publish(run_step(evaluate_family, run_config, family=family), metrics=metrics)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def merge_evaluation(run_config: str, retrieval: Input[Metrics], mmeb: Input[Metrics], pope: Input[Metrics],
                     caption: Input[Metrics], mc: Input[Metrics], gap: Input[Metrics], metrics: Output[Metrics],
                     report: Output[HTML]):
    """All families in one metrics.json and the HTML report (visible in the KFP UI)."""
    from cafe_core.stages.evaluate import merge_evaluation as stage
    from cafe_core.stages.step import publish, run_step

    publish(run_step(stage, run_config), metrics=metrics, documents={"report.html": report})


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate_all(run_config: str, families: list, model: Input[Model], embeddings: Input[Dataset],
                 metrics: Output[Metrics]):
    """Several families in one step, merged (the ablation's per-variant evaluation)."""
    from cafe_core.stages.evaluate import evaluate as stage
    from cafe_core.stages.step import publish, run_step

    publish(run_step(stage, run_config, families=[str(f) for f in families]), metrics=metrics)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def compare_ablation(run_config: str, variants: Input[List[Metrics]], lm_only: Input[Metrics], table: Output[Markdown],
                     report: Output[HTML]):
    """One comparison table and plot of the a_lm:a_con variants and the LM-only one, the base as a reference:
    retrieval against understanding; the modality gap before and after fine-tuning."""
    from cafe_core.stages.evaluate import compare_ablation as stage
    from cafe_core.stages.step import publish, run_step

    result = run_step(stage, run_config, variants=[dict(v.metadata) for v in [*variants, lm_only]])
    publish(result, documents={"comparison.md": table, "comparison.html": report})
