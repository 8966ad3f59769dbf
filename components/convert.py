from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def convert(run_config: str, synthetic: Input[Dataset], pairs: Output[Dataset]):
    """Raw training data -> image-text pair shards in S3, with rejects and stats."""
    from cafe_core.steps import convert as step

    result = step(run_config)
    pairs.metadata.update(result.metadata())
    with open(pairs.path, "w") as f:
        f.write(result.uri + "\n")
