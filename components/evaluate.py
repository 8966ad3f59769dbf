from typing import List

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(run_config: str, family: str, model: Input[Model], embeddings: Input[Dataset], metrics: Output[Metrics]):
    """One benchmark family; its metrics are logged so the KFP UI shows them."""
    from cafe_core.steps import evaluate_family

    result, values = evaluate_family(run_config, family)
    for name, value in sorted(values.items()):
        metrics.log_metric(name, value)
    metrics.metadata.update({"cafe_output": result.metadata()})


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def merge_evaluation(run_config: str, retrieval: Input[Metrics], mmeb: Input[Metrics], pope: Input[Metrics],
                     caption: Input[Metrics], mc: Input[Metrics], gap: Input[Metrics], metrics: Output[Metrics],
                     report: Output[HTML]):
    """All families in one metrics.json and the HTML report (visible in the KFP UI)."""
    from cafe_core.steps import merge_evaluation as step

    result, record, html = step(run_config)
    for name, value in record["metrics"].items():
        metrics.log_metric(name, value)
    metrics.metadata.update({"cafe_output": result.metadata()})
    with open(report.path, "w") as f:
        f.write(html)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate_all(run_config: str, families: list, model: Input[Model], embeddings: Input[Dataset],
                 metrics: Output[Metrics]):
    """Several families in one step, merged (the ablation's per-variant evaluation)."""
    from cafe_core.steps import evaluate_family, merge_evaluation as merge

    for family in families:
        evaluate_family(run_config, family)
    result, record, _ = merge(run_config, families=list(families))
    for name, value in record["metrics"].items():
        metrics.log_metric(name, value)
    metrics.metadata.update({"cafe_output": result.metadata(), "run_id": record["run_id"]})


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def compare_ablation(run_config: str, variants: Input[List[Metrics]], table: Output[Markdown], report: Output[HTML]):
    """One comparison table of the a_lm:a_con variants: retrieval against understanding."""
    from cafe_core.steps import compare_ablation as step

    markdown, html = step(run_config, [dict(v.metadata) for v in variants])
    with open(table.path, "w") as f:
        f.write(markdown)
    with open(report.path, "w") as f:
        f.write(html)
