from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def export(run_config: str, model: Input[Model], embeddings: Output[Dataset]):
    """Embeddings of every evaluation item: sharded safetensors + index in S3."""
    from cafe_core.steps import export as step

    result = step(run_config)
    embeddings.metadata.update(result.metadata())
    with open(embeddings.path, "w") as f:
        f.write(result.uri + "\n")
