from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.image import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def promote(run_config: str, decision_record: Input[Artifact], model: Input[Model], champion: Output[Model]):
    """The model behind a PASS decision becomes the registry's champion (checks sha256 and re-embeds)."""
    from cafe_core.steps import promote as step

    result = step(run_config)
    champion.metadata.update(result.metadata())
    with open(champion.path, "w") as f:
        f.write(result.uri + "\n")
