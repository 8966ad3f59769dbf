from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from cafe_core.params import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def prepare_data(run_config: str, synthetic: Output[Dataset]):
    """The synthetic shapes sets (training split and evaluation sets), reused when already committed."""
    from cafe_core.stages.data import synth
    from cafe_core.stages.step import publish, run_step

    publish(run_step(synth, run_config), synthetic)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def convert(run_config: str, synthetic: Input[Dataset], pairs: Output[Dataset]):
    """Raw training data -> image-text pair shards in S3, with rejects and stats."""
    from cafe_core.stages.data import convert as stage
    from cafe_core.stages.step import publish, run_step

    publish(run_step(stage, run_config), pairs)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def validate(run_config: str, pairs: Input[Dataset], summary: Output[Markdown]):
    """great-expectations checks of the pairs; fails the step on a hard failure."""
    from cafe_core.stages.data import validate as stage
    from cafe_core.stages.step import publish, run_step

    result = run_step(stage, run_config)
    publish(result, summary, documents={"summary.md": summary})
