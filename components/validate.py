from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def validate(run_config: str, pairs: Input[Dataset], summary: Output[Markdown]):
    """great-expectations checks of the pairs; fails the step on a hard failure."""
    from cafe_core.steps import config_of, store_of, validate as step

    result = step(run_config)
    summary.metadata.update(result.metadata())
    cfg = config_of(run_config)
    with store_of(cfg) as store:
        text = store.read_text(f"{cfg.validate_.output}/summary.txt")
    with open(summary.path, "w") as f:
        f.write(f"# Validation of {pairs.metadata.get('uri')}\n\n```\n{text}\n```\n")
