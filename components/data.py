from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def prepare_data(run_config: str, synthetic: Output[Dataset]):
    """The synthetic shapes sets (training split and evaluation sets), reused when already committed."""
    from cafe_core.steps import prepare_data as step

    result = step(run_config)
    synthetic.metadata.update(result.metadata())
    with open(synthetic.path, "w") as f:
        f.write(result.uri + "\n")
